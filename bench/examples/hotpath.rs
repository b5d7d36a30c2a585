//! A fixed amount of hot-path work for a profiler (`valgrind --tool=callgrind`, `perf record`):
//! `hotpath translate [N [KERNEL]]` runs N commands of a guest's mix through `translate` as a
//! worker does (pin per 256, batches of 64), with the widest kernel the CPU has or KERNEL
//! (`scalar`, `avx2`, `avx512`; valgrind's CPU has no AVX-512), over an input of `LEN` (65,536
//! unless the environment says) commands round and round: a branch predictor learns a few
//! thousand commands repeated, so a short `LEN` measures a stream no guest sends;
//! `translate-atc` and `translate-tlbi` run only ATC_INVs or only TLBIs. `hotpath e2e RINGS
//! BATCH [N]` runs N commands through the end-to-end vcmdq pipeline (`vcmdq_bench::e2e`),
//! `e2e-copy` and `e2e-naive` through its baselines, `e2e-vmm` through vcmdq with the rings in
//! guest RAM behind register pages.

use std::hint::black_box;
use std::sync::Arc;
use vcmdq::command::RawCommand;
use vcmdq::translate::{translate_with, Kernel};
use vcmdq::viommu::{DeviceId, Devices, GraceDomain, Viommu, ViommuConfig};
use vcmdq_bench::e2e::{Backend, Backing, Pipeline};
use vcmdq_bench::{guest_mix, psid_of, vsids, Rng};

fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .nth(i)
        .map_or(default, |s| s.parse().expect("a number"))
}

fn main() {
    match std::env::args().nth(1).as_deref() {
        Some(which @ ("translate" | "translate-atc" | "translate-tlbi")) => {
            let n = arg(2, 1 << 20);
            let kernel = match std::env::args().nth(3) {
                None => Kernel::best(),
                Some(k) => *Kernel::ALL
                    .iter()
                    .find(|c| c.name() == k)
                    .expect("a kernel: scalar, avx2 or avx512"),
            };
            println!("kernel {kernel}");
            let mut rng = Rng::new(16);
            let keys = vsids(16, true, 24, &mut rng);
            let len = std::env::var("LEN")
                .map_or(65_536, |v| v.parse().expect("LEN: a number of commands"));
            let input = match which {
                "translate-atc" => vcmdq_bench::atc_only(len, &keys, &mut rng),
                "translate-tlbi" => guest_mix(len * 2, &keys, &mut rng)
                    .into_iter()
                    .filter(|c| {
                        c.opcode() != vcmdq::command::opcode::ATC_INV
                            && c.opcode() != vcmdq::command::opcode::CFGI_CD
                    })
                    .cycle()
                    .take(len)
                    .collect(),
                _ => guest_mix(len, &keys, &mut rng),
            };
            let grace = GraceDomain::new();
            let devices = Devices::new();
            let v = Viommu::new(ViommuConfig::new(1, 7, 0), devices.clone(), grace.clone())
                .expect("valid");
            for (i, &k) in keys.iter().enumerate() {
                devices
                    .add_device(DeviceId(i as u32), 0, psid_of(k))
                    .unwrap();
                v.set_dev_id(DeviceId(i as u32), k).unwrap();
            }
            let _ = Arc::strong_count(&devices);
            let mut reader = grace.register();
            let mut out = [RawCommand::default(); 64];
            let mut prov = [0u32; 64];
            let mut total = 0u64;
            let t = std::time::Instant::now();
            for _ in 0..n / input.len() as u64 {
                for pass in input.chunks(256) {
                    let _pin = reader.pin();
                    let mut start = 0;
                    while start < pass.len() {
                        let end = translate_with(kernel, &v, &pass[start..], &mut out, &mut prov)
                            .expect("a kernel this CPU supports");
                        start += end.consumed;
                        total += end.produced as u64;
                        black_box(&out);
                    }
                }
            }
            let t = t.elapsed();
            println!(
                "translated {total} in {t:?}: {:.2} ns/cmd",
                t.as_nanos() as f64 / total as f64
            );
        }
        Some(which @ ("e2e" | "e2e-copy" | "e2e-naive" | "e2e-vmm")) => {
            let rings = arg(2, 1) as usize;
            let batch = arg(3, 64);
            let n = arg(4, 1 << 20);
            let backend = match which {
                "e2e-copy" => Backend::CopyLimit,
                "e2e-naive" => Backend::Naive,
                _ => Backend::Vcmdq,
            };
            let backing = match which {
                "e2e-vmm" => Backing::GuestRam,
                _ => Backing::Memfd,
            };
            let mut p = Pipeline::with_backing(backend, backing, rings, batch as usize);
            let t = p.run(n / batch);
            let d = p.finish();
            println!(
                "e2e: {} commands in {t:?}: {:.1} Mcmd/s; {:?}",
                d.entries,
                d.entries as f64 / t.as_secs_f64() / 1e6,
                d.engine
            );
        }
        _ => eprintln!(
            "usage: [LEN=n] hotpath translate|translate-atc|translate-tlbi [N [KERNEL]] | \
             hotpath e2e|e2e-copy|e2e-naive|e2e-vmm RINGS BATCH [N]"
        ),
    }
}
