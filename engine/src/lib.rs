//! vcmdq: a software VCMDQ.
//!
//! Guests write SMMUv3 commands into command queues in shared memory; vcmdq reads them, checks
//! them against the policy of the guest's vIOMMU, turns virtual StreamIDs into physical ones and
//! the guest's VMID into the VM's, batches them and pushes them into a modelled physical VCMDQ.
//! See `docs/architecture.md` for the pipeline and `docs/rules.md` for the rules it keeps.

pub mod command;
pub mod engine;
pub mod oracle;
pub mod pqueue;
pub mod queue;
pub mod replay;
pub mod ring;
pub mod soak;
pub mod sync;
pub mod trace;
pub mod translate;
pub mod viommu;
