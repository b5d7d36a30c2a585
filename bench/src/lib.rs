//! Baselines the benchmarks compare vcmdq with: the copy limit and the naive floor.
