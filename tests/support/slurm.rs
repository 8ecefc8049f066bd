//! A real one-node Slurm cluster on 127.0.0.1 (Debian's slurm-wlm and munge,
//! installed by `scripts/bootstrap --slurm`): munged, slurmctld and slurmd
//! started in a temporary folder with their own ports, stopped (jobs
//! cancelled, daemons and any leftover job processes killed) when dropped,
//! panics included.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{alive, children_of, Proc};

/// Finds a Slurm or munge program on PATH or in the sbin folders.
pub fn program(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = path.split(':').map(PathBuf::from).chain(["/usr/sbin", "/usr/bin", "/sbin"].map(PathBuf::from));
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is missing: run ./scripts/bootstrap --slurm (./scripts/test does this), which installs Debian's slurm-wlm and munge")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct SlurmCluster {
    pub dir: PathBuf,
    pub conf: PathBuf,
    daemons: Vec<Proc>,
}

impl SlurmCluster {
    /// Starts munged, slurmctld and slurmd under `dir` and waits until the
    /// node takes jobs.
    pub fn start(dir: &Path) -> SlurmCluster {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the Slurm tests start slurmd, which launches jobs as root: run them as root"
        );
        // Job steps are daemons of slurmd: whatever of them outlives the
        // cluster is reparented to this process, so that drop finds it.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let dir = dir.join("slurm");
        for d in ["munge", "state", "spool"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(dir.join("munge"), std::fs::Permissions::from_mode(0o700)).unwrap();
        let key = dir.join("munge.key");
        let out = Command::new(program("mungekey")).args(["-c", "-k"]).arg(&key).output().expect("run mungekey");
        assert!(out.status.success(), "mungekey: {}", String::from_utf8_lossy(&out.stderr));
        let socket = dir.join("munge/munge.socket");
        let mut cluster = SlurmCluster { conf: dir.join("slurm.conf"), dir: dir.clone(), daemons: Vec::new() };

        cluster.spawn(
            "munged",
            Command::new(program("munged")).args(["-F", "-f", "--num-threads", "2"]).args([
                format!("--socket={}", socket.display()),
                format!("--key-file={}", key.display()),
                format!("--pid-file={}", dir.join("munged.pid").display()),
                format!("--seed-file={}", dir.join("munged.seed").display()),
                format!("--log-file={}", dir.join("munged.log").display()),
            ]),
        );
        wait_until(
            Duration::from_secs(10),
            || socket.exists(),
            || format!("munged did not start: {}", munged_log(&dir)),
        );

        let (ctld_port, slurmd_port) = (free_port(), free_port());
        let conf = format!(
            "ClusterName=flotillatest\n\
             SlurmctldHost=localhost(127.0.0.1)\n\
             SlurmctldPort={ctld_port}\n\
             SlurmdPort={slurmd_port}\n\
             SlurmUser=root\n\
             SlurmdUser=root\n\
             AuthType=auth/munge\n\
             CredType=cred/munge\n\
             AuthInfo=socket={socket}\n\
             MpiDefault=none\n\
             ProctrackType=proctrack/linuxproc\n\
             TaskPlugin=task/none\n\
             JobAcctGatherType=jobacct_gather/none\n\
             AccountingStorageType=accounting_storage/none\n\
             JobCompType=jobcomp/none\n\
             SchedulerType=sched/builtin\n\
             SelectType=select/cons_tres\n\
             SelectTypeParameters=CR_CPU\n\
             ReturnToService=2\n\
             SlurmdParameters=config_overrides\n\
             MinJobAge=600\n\
             KillWait=10\n\
             StateSaveLocation={state}\n\
             SlurmdSpoolDir={spool}\n\
             SlurmctldPidFile={dir}/slurmctld.pid\n\
             SlurmdPidFile={dir}/slurmd.pid\n\
             SlurmctldLogFile={dir}/slurmctld.log\n\
             SlurmdLogFile={dir}/slurmd.log\n\
             NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=4 RealMemory=2000 State=UNKNOWN\n\
             PartitionName=test Nodes=node1 Default=YES MaxTime=INFINITE State=UP\n",
            socket = socket.display(),
            state = dir.join("state").display(),
            spool = dir.join("spool").display(),
            dir = dir.display(),
        );
        std::fs::write(&cluster.conf, conf).unwrap();
        let c = cluster.conf.clone();
        cluster.spawn("slurmctld", Command::new(program("slurmctld")).arg("-D").arg("-f").arg(&c));
        cluster.spawn("slurmd", Command::new(program("slurmd")).arg("-D").arg("-f").arg(&c).args(["-N", "node1"]));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = cluster.cmd("sinfo", &["-h", "-N", "-o", "%T"]);
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && state == "idle" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the Slurm node did not come up (state {state:?}; {}); logs in {}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                dir.display(),
                std::fs::read_to_string(dir.join("slurmctld.log")).unwrap_or_default(),
                std::fs::read_to_string(dir.join("slurmd.log")).unwrap_or_default(),
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        cluster
    }

    fn spawn(&mut self, name: &str, cmd: &mut Command) -> &Proc {
        let log = self.dir.join(format!("{name}.out"));
        let child = cmd
            .env("SLURM_CONF", &self.conf)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        self.daemons.push(Proc { child, log });
        self.daemons.last().unwrap()
    }

    /// Runs a Slurm client command (sbatch, squeue, scancel, ...) against
    /// this cluster.
    pub fn cmd(&self, program_name: &str, args: &[&str]) -> Output {
        self.cmd_in(&self.dir, program_name, args)
    }

    pub fn cmd_in(&self, cwd: &Path, program_name: &str, args: &[&str]) -> Output {
        Command::new(program(program_name))
            .args(args)
            .env("SLURM_CONF", &self.conf)
            .env("FLOTILLA_TLS_DIR", super::tls_dir())
            .current_dir(cwd)
            .output()
            .unwrap_or_else(|e| panic!("run {program_name}: {e}"))
    }

    /// `sbatch --parsable SCRIPT` in `cwd`; the job id.
    pub fn sbatch(&self, cwd: &Path, script: &Path) -> String {
        let out = self.cmd_in(cwd, "sbatch", &["--parsable", script.to_str().unwrap()]);
        assert!(out.status.success(), "sbatch: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap().to_string()
    }

    /// Whether the job is still queued or running.
    pub fn in_queue(&self, job: &str) -> bool {
        let out = self.cmd("squeue", &["-h", "-j", job, "-o", "%T"]);
        !String::from_utf8_lossy(&out.stdout).trim().is_empty()
    }

    /// Waits for the job to leave the queue; panics with `why` after `timeout`.
    pub fn wait_gone(&self, job: &str, timeout: Duration) {
        wait_until(timeout, || !self.in_queue(job), || format!("Slurm job {job} still queued: {}", self.show_job(job)));
    }

    /// `scontrol show job JOB`.
    pub fn show_job(&self, job: &str) -> String {
        String::from_utf8_lossy(&self.cmd("scontrol", &["show", "job", job]).stdout).to_string()
    }
}

fn munged_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("munged.out")).unwrap_or_default()
}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool, why: impl Fn() -> String) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{}", why());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// All live descendants of `pid`.
fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for c in children_of(p) {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

impl Drop for SlurmCluster {
    fn drop(&mut self) {
        // Jobs first, while slurmd can still end their steps.
        let _ = self.cmd("scancel", &["--full", "--user=root"]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let out = self.cmd("squeue", &["-h"]);
            if !out.status.success() || String::from_utf8_lossy(&out.stdout).trim().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // Then the daemons, newest first (slurmd, slurmctld, munged).
        while let Some(mut d) = self.daemons.pop() {
            unsafe { libc::kill(d.pid(), libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while d.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            d.kill9();
        }
        // Whatever job processes are left were reparented to this process.
        let me = std::process::id() as i32;
        for _ in 0..50 {
            let left: Vec<i32> = descendants(me).into_iter().filter(|p| alive(*p)).collect();
            for p in &left {
                unsafe { libc::kill(*p, libc::SIGKILL) };
            }
            // Reap the zombies of reparented processes.
            while unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } > 0 {}
            if left.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
