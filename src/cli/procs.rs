//! Local worker processes started by `flotilla run`: started with a parent
//! death signal so that they never outlive it, and stopped with SIGINT then
//! SIGKILL.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct LocalWorkers {
    children: Vec<Child>,
}

impl LocalWorkers {
    /// Starts a worker per entry of `gpus` (on that GPU, or on its CPU for
    /// `None`) against `coordinator` with the API token `token` and `extra`
    /// arguments (their TLS flags), logging to `logs/worker-<i>.log`.
    pub fn start(
        gpus: &[Option<usize>],
        coordinator: &str,
        token: &str,
        extra: &[String],
        logs: &Path,
    ) -> std::io::Result<LocalWorkers> {
        std::fs::create_dir_all(logs)?;
        let exe = std::env::current_exe()?;
        let mut children = Vec::with_capacity(gpus.len());
        for (i, gpu) in gpus.iter().enumerate() {
            let log = std::fs::File::create(logs.join(format!("worker-{i}.log")))?;
            let mut cmd = Command::new(&exe);
            cmd.args(["worker", "--coordinator", coordinator, "--data-addr", "127.0.0.1:0"])
                .args(extra)
                .args(gpu.map(|g| ["--gpu".to_string(), g.to_string()]).into_iter().flatten())
                .env(flotilla_proto::auth::TOKEN_ENV, token)
                .env_remove(flotilla_proto::auth::TOKEN_FILE_ENV)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            parent_death_signal(&mut cmd);
            children.push(cmd.spawn()?);
        }
        Ok(LocalWorkers { children })
    }

    /// Whether every worker has exited (they never do on their own).
    pub fn all_exited(&mut self) -> bool {
        self.children.iter_mut().all(|c| !matches!(c.try_wait(), Ok(None)))
    }

    /// SIGINT (a worker's "stop now"; SIGTERM would mean "checkpoint and
    /// leave") to every worker, then SIGKILL to those still alive after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        for c in &self.children {
            // SAFETY: sending a signal to our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
        }
        let deadline = Instant::now() + grace;
        for c in &mut self.children {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        self.children.clear();
    }
}

impl Drop for LocalWorkers {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// The child gets SIGINT when the thread that started it dies, so workers
/// never outlive `flotilla run`, even after `kill -9`.
fn parent_death_signal(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl and getppid are async-signal-safe; nothing else runs
    // between fork and exec.
    unsafe {
        let parent = libc::getpid();
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}
