//! End to end on two cores: N guest rings -> a back end -> the physical side with a consumer
//! that costs nothing. Group `end_to_end`, functions `copy_limit` (the two-thread ring-to-ring
//! copy), `naive` (Mutex + VecDeque + HashMap, one push per command) and `vcmdq` (the engine:
//! one worker, hardware model inline, audit off), parameter `rings<N>_batch<B>`: one guest
//! thread writes batches of B commands, each followed by a CMD_SYNC, round-robin over N rings.
//! An iteration is `ITER_CMDS` commands (CMD_SYNCs not counted) taken by the back end, for
//! vcmdq consumed by the hardware model with every guest CMD_SYNC signalled:
//! `Throughput::Elements(ITER_CMDS)`. See `vcmdq_bench::e2e`.
//!
//! Parameters `vmm_rings<N>_batch<B>` (vcmdq only, N of 1 and 16, B of 64) are the same
//! engine, mix, ring size and batches with the rings in guest RAM behind Tegra241 register
//! pages (`vcmdq_bench::guest_ram`), run right after their memfd-ring twins `rings<N>_batch<B>`:
//! `ratios` puts the two side by side.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use vcmdq_bench::e2e::{Backend, Backing, Pipeline};

/// The (rings, batch) the guest-RAM backing is measured at too.
const GUEST_RAM_CASES: [(usize, usize); 2] = [(1, 64), (16, 64)];

/// Commands per iteration; a multiple of every batch size.
const ITER_CMDS: u64 = 4096;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("end_to_end");
    g.throughput(Throughput::Elements(ITER_CMDS));
    for rings in [1usize, 16, 256] {
        for batch in [1usize, 8, 64, 256] {
            let id = format!("rings{rings}_batch{batch}");
            for backend in Backend::ALL {
                let mut p = Pipeline::new(backend, rings, batch);
                let batches = ITER_CMDS / batch as u64;
                g.bench_function(BenchmarkId::new(backend.name(), &id), |b| {
                    b.iter_custom(|iters| p.run(iters * batches))
                });
                // What it delivered is checked by the harness's own tests; a filtered-out
                // benchmark delivers nothing.
                p.finish();
            }
            if GUEST_RAM_CASES.contains(&(rings, batch)) {
                let backing = Backing::GuestRam;
                let mut p = Pipeline::with_backing(Backend::Vcmdq, backing, rings, batch);
                let batches = ITER_CMDS / batch as u64;
                let id = format!("{}{id}", backing.prefix());
                g.bench_function(BenchmarkId::new(Backend::Vcmdq.name(), id), |b| {
                    b.iter_custom(|iters| p.run(iters * batches))
                });
                p.finish();
            }
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = vcmdq_bench::criterion_config(20);
    targets = bench
}
criterion_main!(benches);
