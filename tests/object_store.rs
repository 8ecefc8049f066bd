//! Checkpoints in a real S3-compatible store (s3s-fs on loopback): shards
//! go up as multipart uploads, a killed worker's job resumes from the
//! bucket, retention keeps the newest K in the bucket, and the final model
//! equals the one of an uninterrupted run on the local file system.

mod support;

use std::time::Duration;

use flotilla::proto::v1 as pb;
use support::*;

fn job(url: &str) -> String {
    format!(
        "
name: s3job
model: {{kind: gpt, layers: 2, d_model: 64, heads: 4, context: 64, vocab: 64}}
data: {{kind: synthetic, seed: 4, samples: 4096}}
train: {{steps: 200, global_batch: 32, micro_batch: 16, seed: 3, optimizer: {{lr: 0.002}}}}
workers: {{min: 2, max: 2}}
checkpoint: {{url: '{url}', every: 20, keep: 2}}
"
    )
}

#[test]
fn checkpoints_in_s3_survive_a_killed_worker_and_match_a_local_run() {
    let reference = tempfile::tempdir().unwrap();
    let file = job_file(reference.path(), "job", &job("runs"));
    let out = flotilla(reference.path(), &["run", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let expected = read_tensors(&reference.path().join("runs/s3job-1/final/model.safetensors"));

    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(dir.path(), &["ckpt"]);
    let env = s3.env();
    let (_coord, url) = coordinator(dir.path());
    let mut a = worker_with_env(dir.path(), &url, "worker-a", &env);
    let b = worker_with_env(dir.path(), &url, "worker-b", &env);
    let file = job_file(dir.path(), "job", &job("s3://ckpt/runs"));
    let out = flotilla(dir.path(), &["submit", file.to_str().unwrap(), "--coordinator", &url]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let replacement = runtime().block_on(async {
        let mut c = client(&url).await;
        let s = wait_for(&mut c, "s3job-1", Duration::from_secs(60), |s| {
            s.latest_checkpoint.as_ref().is_some_and(|c| c.step >= 40) && s.step >= 45
        })
        .await;
        assert_eq!(s.output_dir, "s3://ckpt/runs/s3job-1");
        assert!(s.step < 200);
        a.kill9();
        let replacement = worker_with_env(dir.path(), &url, "worker-c", &env);
        let done = wait_for(&mut c, "s3job-1", Duration::from_secs(120), |s| {
            is_phase(s, pb::JobPhase::Succeeded) || is_phase(s, pb::JobPhase::Failed)
        })
        .await;
        assert!(is_phase(&done, pb::JobPhase::Succeeded), "{done:#?}");
        let resumed = done.generations.iter().skip(1).find(|g| g.world_size == 2).expect("a later generation");
        assert!(resumed.resumed_from_step >= 40, "{done:#?}");
        assert!(done.checkpoints.iter().all(|c| c.location.starts_with("s3://ckpt/runs/s3job-1/step-")), "{done:#?}");
        assert_eq!(done.final_model, "s3://ckpt/runs/s3job-1/final/model.safetensors");
        replacement
    });
    drop(replacement);

    // What is in the bucket: the final model, and exactly the two newest checkpoints.
    let job_dir = s3.root.join("ckpt/runs/s3job-1");
    let got = read_tensors(&job_dir.join("final/model.safetensors"));
    assert_params_close(&got, &expected, 1e-5);
    let mut steps: Vec<String> = std::fs::read_dir(&job_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("step-"))
        .filter(|e| std::fs::read_dir(e.path()).map(|mut d| d.next().is_some()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    steps.sort();
    assert_eq!(steps, vec!["step-00000160", "step-00000180"], "retention in the bucket");
    for s in &steps {
        assert!(job_dir.join(s).join("manifest.json").exists(), "{s} is complete");
    }
    let log = std::fs::read_to_string(&b.log).unwrap();
    assert!(log.contains("checkpoint shard uploaded"), "{log}");
}

/// A shard above the part size goes up in parts (S3's smallest part is
/// 5 MiB) and loads back bit for bit.
#[test]
fn a_large_shard_goes_up_as_a_multipart_upload() {
    use flotilla::trainer::checkpoint::{
        self, even_holding, Dtype, HostArray, Layout, ManifestHead, SamplerState, Snapshot,
    };
    use flotilla::trainer::storage::Storage;

    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(dir.path(), &["big"]);
    for (k, v) in s3.env() {
        // SAFETY: set before any thread of this test reads the environment.
        unsafe { std::env::set_var(k, v) };
    }
    // 1.5 M parameters: each of the two shards holds about 9 MB.
    let layout = Layout::new(vec![("w".into(), vec![1000, 1500]), ("b".into(), vec![7])]);
    let f = |k: f32| (0..layout.total).map(|i| (i as f32 * k).sin()).collect::<Vec<_>>();
    let (params, m, v) = (f(0.1), f(0.2), f(0.3));
    runtime().block_on(async {
        let out = Storage::open("s3://big/runs/j-1").unwrap();
        let step = out.child(&checkpoint::step_name(3));
        let mut shards = Vec::new();
        for rank in 0..2 {
            // Each rank's even share of every tensor, back to back.
            let held = even_holding(&layout, rank, 2);
            let take = |all: &[f32]| -> HostArray {
                let mut part = Vec::new();
                for h in &held {
                    let off = layout.offsets[h.tensor];
                    part.extend_from_slice(&all[off + h.start..off + h.end]);
                }
                HostArray::from_f32(&part)
            };
            let mut local = 0;
            let held: Vec<_> = held
                .iter()
                .map(|h| {
                    let mut h = *h;
                    h.local = local;
                    local += h.end - h.start;
                    h
                })
                .collect();
            let snap = std::sync::Arc::new(Snapshot {
                step: 3,
                optimizer_step: 3,
                params: take(&params),
                m: take(&m),
                v: take(&v),
            });
            let (shard, upload) = checkpoint::write_held(&step, &layout, &snap, rank, held).await.unwrap();
            assert!(upload.bytes > 5 << 20, "{upload:?}");
            assert!(upload.parts >= 2, "a shard above the part size is a multipart upload: {upload:?}");
            shards.push(shard);
        }
        let head = ManifestHead {
            job: "j-1",
            generation: 1,
            step: 3,
            optimizer_step: 3,
            sampler: SamplerState { position: 30, seed: 0, global_batch: 10 },
            torch_seed: 0,
            dtypes: [Dtype::F32; 3],
        };
        checkpoint::write_manifest(&step, &checkpoint::manifest(head, &layout, shards)).await.unwrap();
        let back = checkpoint::load(&step, &layout).await.unwrap();
        assert!(back.params == params && back.m == m && back.v == v, "loads back bit for bit");
    });
    let on_disk = s3.root.join("big/runs/j-1/step-00000003/rank-00001.safetensors");
    assert!(std::fs::metadata(&on_disk).unwrap().len() > 5 << 20);
}
