//! Tools around the vcmdq engine: [`replay`] runs a trace through the real engine and checks it
//! against the sequential oracle; [`soak`] runs hostile guests against an engine for as long as
//! asked and checks every command; [`loadtest`] measures latency under load; [`latency`] reports
//! latency distributions as percentiles and [`plot`] draws them as SVG.

pub mod affinity;
pub mod latency;
pub mod loadtest;
pub mod plot;
pub mod replay;
pub mod soak;
