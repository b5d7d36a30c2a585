//! Translation on one core, commands from memory: group `translate`, functions `copy_limit`
//! (copy the 16-byte records, touching nothing), `naive` (lock + decode + SipHash HashMap +
//! encode per command) and `vcmdq` (the engine's `translate` as a worker runs it: one grace
//! period pin per 256-entry pass, `translate` in 64-entry batches; the widest SIMD kernel the
//! CPU has), `vcmdq_scalar` the same with the scalar kernel forced. Every benchmark moves
//! `LEN` commands per iteration, `Throughput::Elements(LEN)`, so the estimates compare directly,
//! each iteration the next `LEN` of an input of `POOL` commands (see `POOL` for why).
//!
//! Inputs (the benchmark's parameter): `mix` is a guest's invalidation traffic (`guest_mix`:
//! half TLBI_NH_VA, a quarter ATC_INV, TLBI_NH_ASID, CFGI_CD), `atc` only ATC_INVs (a lookup
//! each). `<n>` vSIDs are bound, scattered over 24 bits (sequential 0..16 for 16); `hot` streams
//! name 16 of them (a guest invalidating for the devices it is busy with), `uniform` streams
//! any of them at random (the worst case: a cache miss per lookup once the table outgrows the
//! caches).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::sync::Arc;
use vcmdq::command::RawCommand;
use vcmdq::translate::{translate_with, Kernel};
use vcmdq::viommu::{DeviceId, Devices, GraceDomain, Viommu, ViommuConfig};
use vcmdq_bench::{atc_only, copy_limit, guest_mix, psid_of, vsids, NaiveTranslator, Rng};

/// Commands per iteration.
const LEN: usize = 4096;
/// Commands of each input: an iteration takes the next `LEN` of them, round and round. Not
/// `LEN`: a branch predictor learns 4,096 commands repeated back to back, which no guest sends
/// (the AVX-512 kernel of the performance issue ran the mix at 1.9 ns a command on 4,096
/// repeated and 5.3 ns on 65,536; from about 32,768 on the predictor no longer keeps up).
/// 1 MiB, which stays in L2 for the copy as for the translation.
const POOL: usize = 16 * LEN;

/// The next `LEN` commands of `pool` each time, wrapping.
struct Windows<'a> {
    pool: &'a [RawCommand],
    at: usize,
}

impl<'a> Windows<'a> {
    fn new(pool: &'a [RawCommand]) -> Self {
        Windows { pool, at: 0 }
    }

    fn next(&mut self) -> &'a [RawCommand] {
        let w = &self.pool[self.at..self.at + LEN];
        self.at = (self.at + LEN) % self.pool.len();
        w
    }
}
/// Output room per `translate` call: the engine's default batch limit.
const BATCH: usize = 64;
/// Entries per grace-period pin: the engine's default ring budget (one pin per pass).
const PASS: usize = 256;
const SIDSIZE: u8 = 24;

fn viommu(keys: &[u32], grace: Arc<GraceDomain>) -> Viommu {
    let devices = Devices::new();
    let cfg = ViommuConfig {
        sidsize: SIDSIZE,
        // A million vSIDs scattered over 24 bits: beyond a VM's default limits on purpose.
        max_vsids: u32::MAX,
        max_table_bytes: u64::MAX,
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

/// `input` through `translate` (with `kernel`) in batches of `BATCH`; commands produced.
fn run(
    kernel: Kernel,
    v: &Viommu,
    input: &[RawCommand],
    out: &mut [RawCommand],
    prov: &mut [u32],
) -> usize {
    let mut start = 0;
    let mut total = 0;
    while start < input.len() {
        let end = translate_with(
            kernel,
            v,
            &input[start..],
            &mut out[..BATCH],
            &mut prov[..BATCH],
        )
        .expect("Kernel::best() and the scalar kernel are supported");
        total += end.produced;
        start += end.consumed;
        black_box(&out[..end.produced]);
    }
    total
}

/// One input: its name, its bound vSIDs, and the commands.
struct Input {
    name: String,
    keys: Vec<u32>,
    cmds: Vec<RawCommand>,
}

fn inputs() -> Vec<Input> {
    let mut v = Vec::new();
    for (bound, kinds) in [
        (16usize, &["mix", "atc"][..]),
        (4096, &["mix_hot", "mix_uniform"][..]),
        (1_000_000, &["mix_hot", "mix_uniform", "atc_uniform"][..]),
    ] {
        let mut rng = Rng::new(bound as u64);
        let keys = vsids(bound, bound == 16, SIDSIZE, &mut rng);
        for &kind in kinds {
            let named = if kind.ends_with("hot") {
                &keys[..16]
            } else {
                &keys[..]
            };
            let cmds = if kind.starts_with("atc") {
                atc_only(POOL, named, &mut rng)
            } else {
                guest_mix(POOL, named, &mut rng)
            };
            let (what, how) = kind.split_once('_').unwrap_or((kind, ""));
            let name = match how {
                "" => format!("{what}_{bound}"),
                _ => format!("{what}_{bound}_{how}"),
            };
            v.push(Input {
                name,
                keys: keys.clone(),
                cmds,
            });
        }
    }
    v
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("translate");
    g.throughput(Throughput::Elements(LEN as u64));
    for input in inputs() {
        let grace = GraceDomain::new();
        let v = viommu(&input.keys, grace.clone());
        let naive = NaiveTranslator::new(7, input.keys.iter().map(|&k| (k, psid_of(k))));
        let mut out = vec![RawCommand::default(); POOL];
        let mut prov = vec![0u32; POOL];
        assert_eq!(
            run(Kernel::best(), &v, &input.cmds, &mut out, &mut prov),
            POOL,
            "all forwarded"
        );
        assert_eq!(
            naive.translate(&input.cmds, &mut out),
            POOL,
            "all forwarded"
        );
        let id = &input.name;
        g.bench_with_input(BenchmarkId::new("copy_limit", id), &input.cmds, |b, i| {
            let mut w = Windows::new(i);
            b.iter(|| copy_limit(w.next(), &mut out))
        });
        g.bench_with_input(BenchmarkId::new("naive", id), &input.cmds, |b, i| {
            let mut w = Windows::new(i);
            b.iter(|| naive.translate(w.next(), &mut out))
        });
        let mut reader = grace.register();
        for (name, kernel) in [("vcmdq", Kernel::best()), ("vcmdq_scalar", Kernel::Scalar)] {
            g.bench_with_input(BenchmarkId::new(name, id), &input.cmds, |b, i| {
                let mut w = Windows::new(i);
                b.iter(|| {
                    let mut total = 0;
                    for pass in w.next().chunks(PASS) {
                        let _pin = reader.pin();
                        total += run(kernel, &v, pass, &mut out, &mut prov);
                    }
                    total
                })
            });
        }
        drop(reader);
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = vcmdq_bench::criterion_config(30);
    targets = bench
}
criterion_main!(benches);
