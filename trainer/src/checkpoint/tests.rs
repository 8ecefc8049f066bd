use std::sync::Arc;

use super::*;

fn layout() -> Layout {
    Layout::new(vec![("a".into(), vec![3, 2]), ("b".into(), vec![5]), ("c".into(), vec![1])])
}

fn values(l: &Layout, k: f32) -> Vec<f32> {
    (0..l.total).map(|i| i as f32 * k + 0.5).collect()
}

/// The pieces `held` names of whole arrays, back to back.
fn compact(l: &Layout, held: &[Held], whole: &[f32]) -> Vec<f32> {
    held.iter().flat_map(|h| whole[l.offsets[h.tensor] + h.start..l.offsets[h.tensor] + h.end].to_vec()).collect()
}

fn snapshot(l: &Layout, held: &[Held]) -> Snapshot {
    let arr = |k| HostArray::from_f32(&compact(l, held, &values(l, k)));
    Snapshot { step: 7, optimizer_step: 7, params: arr(1.0), m: arr(-2.0), v: arr(3.0) }
}

fn storage(dir: &std::path::Path) -> Storage {
    Storage::open(dir.to_str().unwrap()).unwrap()
}

fn head(dtypes: [Dtype; 3]) -> ManifestHead<'static> {
    ManifestHead {
        job: "j-1",
        generation: 2,
        step: 7,
        optimizer_step: 7,
        sampler: SamplerState { position: 70, seed: 1, global_batch: 10 },
        torch_seed: 0,
        dtypes,
    }
}

/// Writes a checkpoint whose rank `r` holds `holdings[r]`, listing
/// `listed` in the manifest.
async fn save(dir: &Storage, l: &Layout, holdings: &[Vec<Held>], listed: Option<&[Vec<Held>]>) {
    let mut shards = Vec::new();
    for (r, h) in holdings.iter().enumerate() {
        let snap = Arc::new(snapshot(l, h));
        shards.push(write_held(dir, l, &snap, r, h.clone()).await.unwrap().0);
    }
    if let Some(listed) = listed {
        for (s, h) in shards.iter_mut().zip(listed) {
            s.pieces.retain(|p| h.iter().any(|x| x.tensor == p.tensor && x.start == p.start));
        }
    }
    write_manifest(dir, &manifest(head([Dtype::F32; 3]), l, shards)).await.unwrap();
}

/// Each rank's even share of every tensor, kept back to back.
fn even(l: &Layout, world: usize) -> Vec<Vec<Held>> {
    (0..world)
        .map(|r| {
            let mut local = 0;
            even_holding(l, r, world)
                .into_iter()
                .map(|mut h| {
                    h.local = local;
                    local += h.end - h.start;
                    h
                })
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn round_trips_for_every_world_size() {
    let l = layout();
    for world in 1..=8 {
        let tmp = tempfile::tempdir().unwrap();
        let dir = storage(tmp.path());
        save(&dir, &l, &even(&l, world), None).await;
        let back = load(&dir, &l).await.unwrap();
        assert_eq!(
            (back.params, back.m, back.v),
            (values(&l, 1.0), values(&l, -2.0), values(&l, 3.0)),
            "world {world}"
        );
        assert_eq!(back.manifest.world_size, world);
        assert_eq!(back.manifest.format, FORMAT);
        assert!(back.manifest.tensors.iter().all(|t| t.dtype == Dtype::F32));
    }
}

/// Ranks that hold uneven pieces in compact buffers (a pipeline stage's
/// tensors, a ZeRO partition cutting through a tensor) write a checkpoint
/// that loads back whole; pieces that leave a gap are torn.
#[tokio::test]
async fn uneven_holdings_round_trip_and_a_gap_is_torn() {
    let l = layout();
    let holdings = vec![
        vec![Held { tensor: 0, start: 0, end: 6, local: 0 }, Held { tensor: 1, start: 0, end: 2, local: 6 }],
        vec![Held { tensor: 1, start: 2, end: 5, local: 0 }, Held { tensor: 2, start: 0, end: 1, local: 3 }],
    ];
    let tmp = tempfile::tempdir().unwrap();
    save(&storage(tmp.path()), &l, &holdings, None).await;
    assert_eq!(load(&storage(tmp.path()), &l).await.unwrap().params, values(&l, 1.0));
    let mut listed = holdings.clone();
    listed[1].remove(0);
    let tmp = tempfile::tempdir().unwrap();
    save(&storage(tmp.path()), &l, &holdings, Some(&listed)).await;
    let e = load(&storage(tmp.path()), &l).await.unwrap_err();
    assert!(e.to_string().contains("pieces of param/b cover 2 of 5"), "{e}");
}

/// A rank reads the pieces it asks for and no others: a shard holding none
/// of them can be gone, and the values come in the order asked.
#[tokio::test]
async fn a_rank_reads_only_the_pieces_it_asks_for() {
    let l = layout();
    let tmp = tempfile::tempdir().unwrap();
    let dir = storage(tmp.path());
    save(&dir, &l, &even(&l, 3), None).await;
    // Every piece asked for is in rank 2's shard (the last third of each tensor): rank 0's can be gone.
    std::fs::remove_file(tmp.path().join("rank-00000.safetensors")).unwrap();
    let req = Request { params: vec![(1, 4..5), (0, 4..6)], moments: vec![(2, 0..1)] };
    let got = load_pieces(&dir, &l, &req).await.unwrap();
    let p = values(&l, 1.0);
    assert_eq!(got.params, vec![p[6 + 4], p[4], p[5]]);
    assert_eq!((got.m, got.v), (vec![values(&l, -2.0)[11]], vec![values(&l, 3.0)[11]]));
    let all = load(&dir, &l).await.unwrap_err();
    assert!(matches!(all, CheckpointError::Corrupt { .. }), "the whole state needs the missing shard: {all}");
}

#[tokio::test]
async fn a_changed_piece_is_detected_as_torn() {
    let l = layout();
    let tmp = tempfile::tempdir().unwrap();
    let dir = storage(tmp.path());
    save(&dir, &l, &even(&l, 2), None).await;
    let shard = tmp.path().join("rank-00001.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&shard, bytes).unwrap();
    let err = load(&dir, &l).await.unwrap_err();
    assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("checksum"), "{err}");
}

#[tokio::test]
async fn a_folder_without_manifest_is_not_a_checkpoint_and_shapes_must_match() {
    let l = layout();
    let tmp = tempfile::tempdir().unwrap();
    let dir = storage(tmp.path());
    let held = even(&l, 1).remove(0);
    write_held(&dir, &l, &Arc::new(snapshot(&l, &held)), 0, held).await.unwrap();
    let err = load(&dir, &l).await.unwrap_err();
    assert!(matches!(&err, CheckpointError::Storage(e) if e.is_not_found()), "{err}");
    save(&dir, &l, &even(&l, 1), None).await;
    let other = Layout::new(vec![("a".into(), vec![2, 3]), ("b".into(), vec![5]), ("c".into(), vec![1])]);
    assert!(matches!(load(&dir, &other).await.unwrap_err(), CheckpointError::Mismatch { .. }));
}

/// A group stored as bf16 says so in the manifest and in the shard's
/// header, and loads as the f32 values of its bf16 elements.
#[tokio::test]
async fn each_group_records_its_dtype() {
    let l = layout();
    let tmp = tempfile::tempdir().unwrap();
    let dir = storage(tmp.path());
    let held = even(&l, 1).remove(0);
    let mut snap = snapshot(&l, &held);
    let m: Vec<f32> = values(&l, -2.0);
    snap.m = HostArray {
        dtype: Dtype::BF16,
        bytes: m.iter().flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes()).collect(),
    };
    let (shard, _) = write_held(&dir, &l, &Arc::new(snap), 0, held).await.unwrap();
    write_manifest(&dir, &manifest(head([Dtype::F32, Dtype::BF16, Dtype::F32]), &l, vec![shard])).await.unwrap();
    let text = std::fs::read_to_string(tmp.path().join(MANIFEST)).unwrap();
    assert!(text.contains(r#""dtype": "BF16""#) && text.contains(r#""dtype": "F32""#), "{text}");
    let bytes = std::fs::read(tmp.path().join("rank-00000.safetensors")).unwrap();
    let parsed = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(parsed.tensor("adam.m/b").unwrap().dtype(), safetensors::Dtype::BF16);
    let back = load(&dir, &l).await.unwrap();
    let truncated: Vec<f32> = m.iter().map(|x| f32::from_bits(x.to_bits() & 0xffff_0000)).collect();
    assert_eq!(back.m, truncated);
    assert_eq!(back.params, values(&l, 1.0));
}

#[tokio::test]
async fn prune_regression_never_removes_a_checkpoint_newer_than_the_last_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let out = storage(tmp.path());
    for s in [10, 20, 30, 40] {
        out.child(&step_name(s)).put("manifest.json", b"{}".to_vec()).await.unwrap();
    }
    out.child("final").put("model.safetensors", vec![0]).await.unwrap();
    assert_eq!(prune(&out, &[20, 30]).await.unwrap(), vec![10]);
    assert!(tmp.path().join("final").exists());
    assert!(!tmp.path().join(step_name(10)).exists());
    assert!(tmp.path().join(step_name(30)).exists());
    assert!(tmp.path().join(step_name(40)).exists(), "a newer checkpoint may still be in flight");
}
