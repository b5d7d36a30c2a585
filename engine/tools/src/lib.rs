//! Tools around the vcmdq engine: [`replay`] runs a trace through the real engine and checks it
//! against the sequential oracle; [`soak`] runs hostile guests against an engine for as long as
//! asked and checks every command; [`plot`] draws latency percentiles as SVG.

pub mod plot;
pub mod replay;
pub mod soak;
