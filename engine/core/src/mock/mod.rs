//! What tests, benchmarks, fuzz targets, the soak and the command line drive the engine with
//! (behind the `mock` feature, so an embedding VMM does not compile it): a deterministic random
//! number generator.

mod rng;

pub use rng::Rng;
