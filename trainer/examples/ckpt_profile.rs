use flotilla_trainer::checkpoint::{self, Layout, Snapshot};
use flotilla_trainer::storage::Storage;
use std::sync::Arc;
use std::time::Instant;
fn main() {
    let numel: usize = 24 << 20;
    let layout = Layout::new(vec![("w".into(), vec![numel / 1024, 1024])]);
    let f = |k: f32| (0..numel).map(|i| (i as f32 * k).sin()).collect::<Vec<f32>>();
    let snap = Arc::new(Snapshot { step: 1, params: f(1e-3), m: f(2e-3), v: f(3e-3), optimizer_step: 1 });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = std::env::args().nth(1).unwrap_or("/tmp/ckpt-prof".into());
    for round in 0..3 {
        let t = Instant::now();
        let (pieces, entry) = checkpoint::shard_pieces(&layout, &snap, 0, 1);
        let crc = t.elapsed();
        let path = format!("{dir}/r{round}.bin");
        std::fs::create_dir_all(&dir).unwrap();
        let t = Instant::now();
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&path).unwrap();
            for p in &pieces {
                f.write_all(p).unwrap();
            }
            let w = t.elapsed();
            f.sync_data().unwrap();
            println!("round {round}: crc {:?} write {:?} fsync {:?} ({} bytes)", crc, w, t.elapsed() - w, entry.bytes);
        }
        let out = Storage::open(&format!("{dir}/s{round}")).unwrap();
        let t = Instant::now();
        rt.block_on(checkpoint::write_shard(&out, &layout, &snap, 0, 1)).unwrap();
        println!("round {round}: write_shard {:?}", t.elapsed());
    }
}
