use super::*;

/// An in-memory checkpoint: what `with_checkpoint` hands to a save.
fn snapshot(s: &TrainState) -> (BTreeMap<String, Vec<u8>>, BTreeMap<String, String>) {
    s.with_checkpoint(|tensors, meta| {
        (tensors.iter().map(|t| (t.name.to_string(), t.data.to_vec())).collect(), meta.clone())
    })
}

fn restore(s: &mut TrainState, snap: &(BTreeMap<String, Vec<u8>>, BTreeMap<String, String>)) -> Result<()> {
    s.restore_with(|targets| {
        for (name, buf) in targets.iter_mut() {
            let src = snap.0.get(*name).ok_or_else(|| anyhow!("no tensor {name}"))?;
            ensure!(src.len() == buf.len(), "tensor {name} has another size");
            buf.copy_from_slice(src);
        }
        Ok(snap.1.clone())
    })
}

fn whole() -> Shard {
    Shard::whole(&model_rows(3 << 20).unwrap())
}

fn trained_shard(seed: u64, shard: &Shard, steps: u64, threads: usize) -> TrainState {
    let mut s = TrainState::new(seed, shard, threads);
    for _ in 0..steps {
        s.train_step(threads);
    }
    s
}

fn trained(seed: u64, steps: u64, threads: usize) -> TrainState {
    trained_shard(seed, &whole(), steps, threads)
}

#[test]
fn training_is_deterministic() {
    let a = trained(7, 25, 2);
    let b = trained(7, 25, 2);
    assert_eq!(a.state_hash(), b.state_hash());
    assert_eq!(a.params, b.params);
    // The thread split does not change the result.
    assert_eq!(trained(7, 25, 3).state_hash(), a.state_hash());
    assert_ne!(trained(8, 25, 2).state_hash(), a.state_hash());
    // It trains: the loss goes down.
    let mut s = TrainState::new(7, &whole(), 2);
    let first = s.train_step(2);
    let last = (0..30).map(|_| s.train_step(2)).last().unwrap();
    assert!(last < first, "loss went from {first} to {last}");
}

#[test]
fn shards_partition_the_model_and_compute_what_one_process_would() {
    let rows = model_rows(3 << 20).unwrap();
    let total: usize = rows.iter().sum();
    for world in [1u32, 2, 3, 4, 7] {
        let shards: Vec<Shard> = (0..world).map(|r| Shard::of(&rows, r, world).unwrap()).collect();
        assert_eq!(shards.iter().map(Shard::rows).sum::<usize>(), total);
        let mut next = 0;
        for s in &shards {
            assert_eq!(s.base, next, "contiguous: {s:?}");
            next += s.params();
            assert!(s.rows() >= total / world as usize);
        }
    }
    assert!(Shard::of(&rows, 4, 4).is_err());
    assert!(Shard::of(&[1, 1], 0, 3).is_err());
    assert_eq!(Shard::of(&rows, 0, 1).unwrap(), Shard::whole(&rows));

    // Four ranks trained apart hold, end to end, the state of one process.
    let one = trained(7, 12, 2);
    let mut params = Vec::new();
    let mut m = Vec::new();
    for r in 0..4 {
        let s = trained_shard(7, &Shard::of(&rows, r, 4).unwrap(), 12, 1);
        assert_eq!((s.rng.clone(), s.loader.clone()), (one.rng.clone(), one.loader.clone()));
        params.extend_from_slice(&s.params);
        m.extend_from_slice(&s.exp_avg_sq);
    }
    assert!(params == one.params && m == one.exp_avg_sq);
    let hashes: Vec<String> =
        (0..4).map(|r| trained_shard(7, &Shard::of(&rows, r, 4).unwrap(), 12, 1).state_hash()).collect();
    assert_eq!(combined_hash(&hashes), combined_hash(&hashes.clone()));
    let mut swapped = hashes.clone();
    swapped.swap(0, 1);
    assert_ne!(combined_hash(&hashes), combined_hash(&swapped), "rank order counts");
}

#[test]
fn resuming_from_a_checkpoint_is_bitwise_identical() {
    let rows = model_rows(3 << 20).unwrap();
    for shard in [whole(), Shard::of(&rows, 2, 4).unwrap()] {
        let reference = trained_shard(7, &shard, 23, 2);
        let at_10 = snapshot(&trained_shard(7, &shard, 10, 2));
        // A fresh process: newly initialised, then restored, then trained on.
        let mut resumed = TrainState::new(7, &shard, 2);
        restore(&mut resumed, &at_10).unwrap();
        assert_eq!(resumed.step(), 10);
        while resumed.step() < 23 {
            resumed.train_step(2);
        }
        assert_eq!(resumed.state_hash(), reference.state_hash());

        // Forgetting the RNG and data loader state is caught.
        let mut forgetful = TrainState::new(7, &shard, 2);
        restore(&mut forgetful, &at_10).unwrap();
        forgetful.rng = Rng::seeded(7);
        forgetful.loader = Loader::default();
        while forgetful.step() < 23 {
            forgetful.train_step(2);
        }
        assert_ne!(forgetful.state_hash(), reference.state_hash());

        // A checkpoint of another seed is refused.
        let mut other = TrainState::new(8, &shard, 2);
        assert!(restore(&mut other, &at_10).is_err());
    }
    // Another rank's shard is refused, even one of the same size.
    let at_5 = snapshot(&trained_shard(7, &Shard::of(&rows, 0, 2).unwrap(), 5, 2));
    let mut rank1 = TrainState::new(7, &Shard::of(&rows, 1, 2).unwrap(), 2);
    assert!(restore(&mut rank1, &at_5).is_err());
}

#[test]
fn checkpoint_layout_matches_the_state() {
    let rows = model_rows(3 << 20).unwrap();
    for shard in [whole(), Shard::of(&rows, 1, 3).unwrap()] {
        let s = trained_shard(1, &shard, 3, 2);
        let specs = checkpoint_specs(&s.shard);
        let layout = ShardLayout::new(&specs, &s.metadata()).unwrap();
        assert!(layout.file_len > s.state_bytes());
        let (tensors, meta) = snapshot(&s);
        assert_eq!(tensors.len(), specs.len());
        assert_eq!(tensors.values().map(|t| t.len() as u64).sum::<u64>(), s.state_bytes() + 40);
        assert_eq!(meta["step"], "3");
        assert_eq!(meta["rank"], shard.rank.to_string());
    }
}

#[test]
fn model_sizes() {
    assert!(model_rows(1000).is_err());
    assert_eq!(model_rows(300_000_000).unwrap().iter().sum::<usize>(), 300_000_000 / 12 / HIDDEN);
}
