//! Translation, ns per command: the copy limit, vcmdq's `translate` (alone, and with a grace
//! period pin per 64-command batch as the pipeline does it), and the naive floor
//! (lock + decode + HashMap + encode per command).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::sync::Arc;
use vcmdq::command::RawCommand;
use vcmdq::translate::translate;
use vcmdq::viommu::{DeviceId, Devices, GraceDomain, Viommu, ViommuConfig};
use vcmdq_bench::{atc_only, copy_limit, guest_mix, psid_of, vsids, NaiveTranslator, Rng};

/// Commands per iteration.
const LEN: usize = 4096;
/// Output room per `translate` call: a kernel-sized batch.
const BATCH: usize = 64;
const SIDSIZE: u8 = 24;

fn viommu(keys: &[u32], grace: Arc<GraceDomain>) -> Viommu {
    let devices = Devices::new();
    let cfg = ViommuConfig {
        sidsize: SIDSIZE,
        ..ViommuConfig::new(1, 7, 0)
    };
    let v = Viommu::new(cfg, Arc::clone(&devices), grace).expect("valid config");
    for (i, &k) in keys.iter().enumerate() {
        let d = DeviceId(i as u32);
        devices
            .add_device(d, 0, psid_of(k))
            .expect("distinct pSIDs");
        v.set_dev_id(d, k).expect("distinct vSIDs");
    }
    v
}

fn run(v: &Viommu, input: &[RawCommand], out: &mut [RawCommand], prov: &mut [u32]) -> usize {
    let mut start = 0;
    let mut total = 0;
    while start < input.len() {
        let end = translate(v, &input[start..], &mut out[..BATCH], &mut prov[..BATCH]);
        total += end.produced;
        start += end.consumed;
        black_box(&out[..end.produced]);
    }
    total
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("translate");
    g.throughput(Throughput::Elements(LEN as u64));
    for (bound, sequential) in [(16usize, true), (1_000_000, false)] {
        let mut rng = Rng::new(bound as u64);
        let keys = vsids(bound, sequential, SIDSIZE, &mut rng);
        let grace = GraceDomain::new();
        let v = viommu(&keys, grace.clone());
        let naive = NaiveTranslator::new(7, keys.iter().map(|&k| (k, psid_of(k))));
        for (mix, input) in [
            ("mix", guest_mix(LEN, &keys, &mut rng)),
            ("atc", atc_only(LEN, &keys, &mut rng)),
        ] {
            let id = format!("{mix}/{bound}");
            let mut out = vec![RawCommand::default(); LEN];
            let mut prov = vec![0u32; LEN];
            assert_eq!(run(&v, &input, &mut out, &mut prov), LEN, "all forwarded");
            g.bench_with_input(BenchmarkId::new("copy", &id), &input, |b, i| {
                b.iter(|| copy_limit(i, &mut out))
            });
            g.bench_with_input(BenchmarkId::new("vcmdq", &id), &input, |b, i| {
                b.iter(|| run(&v, i, &mut out, &mut prov))
            });
            let mut reader = grace.register();
            g.bench_with_input(BenchmarkId::new("vcmdq_pinned", &id), &input, |b, i| {
                b.iter(|| {
                    let mut total = 0;
                    for chunk in i.chunks(BATCH) {
                        let _guard = reader.pin();
                        total += run(&v, chunk, &mut out, &mut prov);
                    }
                    total
                })
            });
            drop(reader);
            g.bench_with_input(BenchmarkId::new("naive", &id), &input, |b, i| {
                b.iter(|| naive.translate(i, &mut out))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
