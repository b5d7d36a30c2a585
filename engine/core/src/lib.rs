//! vcmdq: a software VCMDQ.
//!
//! Guests write SMMUv3 commands into command queues in shared memory; vcmdq reads them, checks
//! them against the policy of the guest's vIOMMU, turns virtual StreamIDs into physical ones and
//! the guest's VMID into the VM's, batches them and pushes them into a modelled physical VCMDQ.
//! This crate is the core a VMM embeds: commands, queue arithmetic, guest rings, vIOMMUs,
//! translation, the physical queue model, the engine and the oracle, with no presentation or
//! file-format dependency (traces, tools and the command line are the `vcmdq-trace`,
//! `vcmdq-tools` and `vcmdq-cli` crates). See `docs/architecture.md` for the pipeline and
//! `docs/rules.md` for the rules it keeps.

pub mod command;
pub mod engine;
pub mod hwmodel;
#[cfg(feature = "mock")]
pub mod mock;
pub mod oracle;
pub mod queue;
pub mod ring;
pub mod sync;
pub mod translate;
pub mod viommu;
