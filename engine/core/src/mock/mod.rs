//! What tests, benchmarks, fuzz targets, the soak and the command line drive the engine with
//! (behind the `mock` feature, so an embedding VMM does not compile it): a deterministic random
//! number generator, a guest's command mix, and a guest driver that submits batches ended by a
//! CMD_SYNC and handles ring errors as Linux does.

mod driver;
mod mix;
mod rng;

pub use driver::{
    Awaited, DriverCounters, DriverError, FixPolicy, GuestDriver, Stop, DEFAULT_TIMEOUT, FIX_SYNC,
    MAX_KEPT_STOPS,
};
pub use mix::{guest_command, guest_mix};
pub use rng::Rng;
