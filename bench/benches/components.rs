//! The pipeline's stages one at a time, on one core, `Throughput::Elements` = commands:
//! - `decode`: `decode` (the typed, strict decoder the tools use) and `res0` (the hot path's
//!   two-mask RES0 check) over a guest's mix of invalidations.
//! - `ring_read`: `poll`, the engine's read of a guest ring (PROD once, each entry copied out
//!   once, CONS stored), per ring-budget of entries; the guest moves PROD over slots it wrote
//!   once, so this is the read alone.
//! - `phys_publish`: `publish`, batches of B commands into the physical queue (one PROD store
//!   per batch), each taken by the zero-cost consumer before the next; `publish_modelled`, the
//!   same consumed by the full hardware model (which checks every command's opcode and RES0
//!   bits and counts it).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use vcmdq::command::{decode, res0_bits, RawCommand};
use vcmdq::hwmodel::{HwConfig, PhysQueue};
use vcmdq::ring::heap_pair;
use vcmdq_bench::{guest_mix, vsids, Rng};

const LEN: usize = 4096;

fn decoding(c: &mut Criterion) {
    let mut rng = Rng::new(3);
    let keys = vsids(16, true, 20, &mut rng);
    let input = guest_mix(LEN, &keys, &mut rng);
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(LEN as u64));
    g.bench_function("decode", |b| {
        b.iter(|| {
            black_box(&input)
                .iter()
                .filter(|c| decode(**c).is_ok())
                .count()
        })
    });
    g.bench_function("res0", |b| {
        b.iter(|| {
            black_box(&input)
                .iter()
                .filter(|c| matches!(res0_bits(c), Some([0, 0])))
                .count()
        })
    });
    g.finish();
}

fn ring_read(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_read");
    g.throughput(Throughput::Elements(LEN as u64));
    for chunk in [64usize, 256] {
        let (mut guest, mut host) = heap_pair(12, 0).expect("a valid ring");
        let mut rng = Rng::new(5);
        let keys = vsids(16, true, 20, &mut rng);
        // Fill every slot once; later laps reuse them.
        guest.push(&guest_mix(1 << 12, &keys, &mut rng));
        let shape = guest.shape();
        guest.set_prod(0);
        let mut inbuf = vec![RawCommand::default(); chunk];
        g.bench_function(BenchmarkId::new("poll", chunk), |b| {
            b.iter(|| {
                let mut n = 0;
                while n < LEN {
                    guest.set_prod(shape.advance(guest.prod(), chunk as u32));
                    guest.doorbell();
                    let p = host.poll(&mut inbuf).expect("heap rings never fail");
                    host.complete(host.read_ptr());
                    black_box(&inbuf);
                    n += p.n;
                }
                n
            })
        });
    }
    g.finish();
}

fn phys_publish(c: &mut Criterion) {
    let mut g = c.benchmark_group("phys_publish");
    g.throughput(Throughput::Elements(LEN as u64));
    let mut rng = Rng::new(9);
    let keys = vsids(16, true, 20, &mut rng);
    let cmds = guest_mix(LEN, &keys, &mut rng);
    for (name, cfg) in [
        ("publish", HwConfig::zero_cost()),
        ("publish_modelled", HwConfig::default()),
    ] {
        for batch in [1usize, 8, 64, 256] {
            let (mut producer, mut hw) = PhysQueue::new(12, cfg.clone()).expect("valid");
            g.bench_function(BenchmarkId::new(name, batch), |b| {
                b.iter(|| {
                    for chunk in cmds.chunks(batch) {
                        producer.publish(chunk).expect("consumed before");
                        hw.step(usize::MAX);
                    }
                    hw.position()
                })
            });
            assert_eq!(hw.counters().total_errors(), 0);
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = vcmdq_bench::criterion_config(30);
    targets = decoding, ring_read, phys_publish
}
criterion_main!(benches);
