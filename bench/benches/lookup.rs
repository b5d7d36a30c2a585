//! vSID lookup: the radix table against a std `HashMap` and a flat array indexed by vSID, with
//! 16, 4,096, 65,536 and 1,000,000 bound vSIDs, sequential (vSIDs 0..n, looked up in order) and random
//! (n vSIDs scattered over 24 bits, looked up in random order).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::collections::HashMap;
use std::hint::black_box;
use vcmdq::viommu::SidTable;
use vcmdq_bench::{psid_of, vsids, Rng};

/// vSID bits of the tables; 2^24 entries is what the flat array costs (128 MiB).
const SIDSIZE: u8 = 24;
/// Lookups per iteration.
const LOOKUPS: usize = 1 << 16;
const VALID: u64 = 1 << 32;

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup");
    g.throughput(Throughput::Elements(LOOKUPS as u64));
    for n in [16usize, 4096, 65_536, 1_000_000] {
        for (pattern, sequential) in [("seq", true), ("random", false)] {
            let mut rng = Rng::new(n as u64 * 2 + u64::from(sequential));
            let keys = vsids(n, sequential, SIDSIZE, &mut rng);
            let stream: Vec<u32> = if sequential {
                (0..LOOKUPS).map(|i| keys[i % n]).collect()
            } else {
                (0..LOOKUPS)
                    .map(|_| keys[rng.below(n as u64) as usize])
                    .collect()
            };
            let radix = SidTable::new(SIDSIZE).expect("valid SIDSIZE");
            let mut map = HashMap::with_capacity(n);
            let mut flat = vec![0u64; 1 << SIDSIZE];
            for &k in &keys {
                radix.insert(k, psid_of(k)).expect("distinct vSIDs");
                map.insert(k, psid_of(k));
                flat[k as usize] = VALID | u64::from(psid_of(k));
            }
            let id = format!("{pattern}_{n}");
            g.bench_with_input(BenchmarkId::new("radix", &id), &stream, |b, s| {
                b.iter(|| {
                    let mut acc = 0u64;
                    for &v in s {
                        if let Some(p) = radix.get(black_box(v)) {
                            acc = acc.wrapping_add(u64::from(p));
                        }
                    }
                    acc
                })
            });
            g.bench_with_input(BenchmarkId::new("hashmap", &id), &stream, |b, s| {
                b.iter(|| {
                    let mut acc = 0u64;
                    for &v in s {
                        if let Some(&p) = map.get(&black_box(v)) {
                            acc = acc.wrapping_add(u64::from(p));
                        }
                    }
                    acc
                })
            });
            g.bench_with_input(BenchmarkId::new("flat", &id), &stream, |b, s| {
                b.iter(|| {
                    let mut acc = 0u64;
                    for &v in s {
                        let e = flat.get(black_box(v) as usize).copied().unwrap_or(0);
                        if e & VALID != 0 {
                            acc = acc.wrapping_add(e & 0xffff_ffff);
                        }
                    }
                    acc
                })
            });
            let st = radix.stats();
            eprintln!(
                "lookup {id}: radix {} levels, {} mids, {} leaves, {} KiB ({:.1} B/vSID)",
                st.levels,
                st.mids,
                st.leaves,
                st.bytes >> 10,
                st.bytes as f64 / n as f64
            );
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = vcmdq_bench::criterion_config(30);
    targets = lookup
}
criterion_main!(benches);
