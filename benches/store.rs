//! Shard-side cost of a merge, without the network: a sparse push of N sorted
//! keys (the slot-table walk plus scatter-add), a sparse pull, and a dense range
//! push, each beside a memcpy of the same value bytes in the same run (the
//! floor any merge has to pay). Reported as keys/s and bytes/s.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ps_core::kernels::Kernels;
use ps_core::keys::KeyRange;
use ps_core::rng::SplitMix64;
use ps_core::rules::{RuleRegistry, RuleSpec, UpdateRule};
use ps_core::store::{DenseStore, SparseStore};

fn sum() -> Arc<dyn UpdateRule> {
    RuleRegistry::default().build(&RuleSpec::Sum).unwrap()
}

fn sparse(c: &mut Criterion) {
    let k = Kernels::best();
    let mut g = c.benchmark_group("sparse_store");
    g.sample_size(10);
    for n in [1usize << 14, 1 << 20] {
        let mut r = SplitMix64::new(n as u64);
        let mut keys: Vec<u64> = (0..n).map(|_| r.below(u64::MAX - 1)).collect();
        keys.sort_unstable();
        keys.dedup();
        let vals = vec![1.0f32; keys.len()];
        let mut s = SparseStore::new(1, vec![KeyRange::FULL], sum(), ps_core::limits::SPARSE_SLAB_BLOCKS).unwrap();
        s.push(&keys, &vals, k).unwrap(); // keys exist: the steady state of training
        g.throughput(Throughput::Elements(keys.len() as u64));
        let mut dst = vec![0f32; keys.len()];
        g.bench_with_input(BenchmarkId::new("memcpy-values", n), &n, |b, _| b.iter(|| dst.copy_from_slice(&vals)));
        g.bench_with_input(BenchmarkId::new("push-sum-dim1", n), &n, |b, _| {
            b.iter(|| s.push(&keys, &vals, k).unwrap())
        });
        let mut out = vec![0f32; keys.len()];
        g.bench_with_input(BenchmarkId::new("pull-dim1", n), &n, |b, _| b.iter(|| s.pull(&keys, &mut out).unwrap()));
    }
    // a big model, small minibatches that bring new keys: the insert cost
    let mut r = SplitMix64::new(99);
    let mut keys: Vec<u64> = (0..1usize << 20).map(|_| r.below(u64::MAX - 1)).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut s = SparseStore::new(1, vec![KeyRange::FULL], sum(), ps_core::limits::SPARSE_SLAB_BLOCKS).unwrap();
    s.push(&keys, &vec![1.0f32; keys.len()], k).unwrap();
    g.throughput(Throughput::Elements(64));
    g.bench_function("push-64-new-keys-into-1M", |b| {
        b.iter_batched(
            || {
                let mut batch: Vec<u64> = (0..64).map(|_| r.below(u64::MAX - 1)).collect();
                batch.sort_unstable();
                batch.dedup();
                batch
            },
            |batch| s.push(&batch, &vec![1.0f32; batch.len()], k).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn dense(c: &mut Criterion) {
    let k = Kernels::best();
    let mut g = c.benchmark_group("dense_store");
    g.sample_size(10);
    let n = 1usize << 22; // 16 MiB of f32
    let mut d = DenseStore::new(KeyRange::new(0, n as u64), 1, &[KeyRange::new(0, n as u64)], sum()).unwrap();
    let vals = vec![1.0f32; n];
    d.push(0, &vals, k).unwrap();
    g.throughput(Throughput::Bytes(4 * n as u64));
    let mut dst = vec![0f32; n];
    g.bench_function("memcpy-16MiB", |b| b.iter(|| dst.copy_from_slice(&vals)));
    g.bench_function("push-sum-16MiB", |b| b.iter(|| d.push(0, &vals, k).unwrap()));
    let mut out = vec![0f32; n];
    g.bench_function("pull-16MiB", |b| b.iter(|| d.pull(0, &mut out).unwrap()));
    g.finish();
}

criterion_group!(benches, sparse, dense);
criterion_main!(benches);
