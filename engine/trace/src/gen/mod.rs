//! Workload generators: traces modelled on what real guests send, deterministic from a seed.
//!
//! Each VM of a workload has a role (see `workloads.rs`) and produces its own stream of events
//! from its own random generator (the seed forked by VM index), so VMs are generated in parallel
//! with rayon and merged by timestamp (ties broken by VM index, then by order within the VM).
//! The same parameters give the same bytes on any machine and with any number of threads.
//!
//! What the guests do, and the rules they keep (Linux batching, ring capacity as the guest sees
//! it, error handling), is described in `guest.rs` and in `traces/FORMAT.md`.

mod guest;
pub mod linux;
mod workloads;

pub use vcmdq::mock::Rng;

use super::format::FLAG_SYNTHETIC;
use super::{TraceMeta, TraceWriter, WriteError};
use guest::{Stream, Vm};
use rayon::prelude::*;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{Cursor, Write};
use vcmdq::queue::QueueShape;
use workloads::Role;

/// A kind of guest traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Workload {
    /// Linux strict-mode DMA unmaps: TLBI_NH_VA with range fields on one VM, one per page on the
    /// other (no range support), in batches of up to 63 and a CMD_SYNC.
    DmaUnmap,
    /// ATS devices sharing DMA domains: each unmap is a TLBI batch, then an ATC_INV per device.
    Ats,
    /// SVA: processes bound and unbound (CFGI_CD, TLBI_NH_ASID, ATC_INV with PASID) and their
    /// munmaps.
    SvaChurn,
    /// Many VMs with light traffic next to one that floods its rings.
    NoisyNeighbour,
    /// A device hot-unplugged during traffic, late commands for its vSID (refused), and a new
    /// device plugged in at the same vSID.
    HotUnplug,
    /// Guests mixing attacks into normal traffic: illegal opcodes, unknown vSIDs, RES0 bits,
    /// VMID spoofing, CFGI_STE (trapped), PREFETCH (dropped), forbidden opcodes, and the
    /// guest's GuestFix/GuestAck after each refusal.
    Hostile,
    /// A bit of everything, kernel and tegra241 profiles.
    Mixed,
}

impl Workload {
    /// Every workload, in the order `traces/` lists them.
    pub const ALL: [Workload; 7] = [
        Workload::DmaUnmap,
        Workload::Ats,
        Workload::SvaChurn,
        Workload::NoisyNeighbour,
        Workload::HotUnplug,
        Workload::Hostile,
        Workload::Mixed,
    ];

    /// The command-line name, also the bundled trace's file stem.
    pub fn name(self) -> &'static str {
        match self {
            Workload::DmaUnmap => "dma-unmap",
            Workload::Ats => "ats",
            Workload::SvaChurn => "sva-churn",
            Workload::NoisyNeighbour => "noisy-neighbour",
            Workload::HotUnplug => "hot-unplug",
            Workload::Hostile => "hostile",
            Workload::Mixed => "mixed",
        }
    }

    /// The workload of a name.
    pub fn from_name(name: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| w.name() == name)
    }

    /// The parameters of the bundled trace `traces/<name>.vct`, also the CLI's defaults.
    pub fn defaults(self) -> GenParams {
        let p = |vms, devices, rings, log2size, commands, seed| GenParams {
            vms,
            devices,
            rings,
            log2size,
            commands,
            seed,
        };
        match self {
            Workload::DmaUnmap => p(2, 4, 2, 8, 8_000, 1),
            Workload::Ats => p(2, 4, 2, 8, 6_000, 2),
            Workload::SvaChurn => p(2, 2, 1, 7, 4_000, 3),
            Workload::NoisyNeighbour => p(8, 2, 1, 8, 16_000, 4),
            Workload::HotUnplug => p(2, 4, 1, 6, 3_000, 5),
            Workload::Hostile => p(3, 4, 1, 6, 3_000, 6),
            Workload::Mixed => p(6, 4, 2, 8, 10_000, 7),
        }
    }

    fn role(self, idx: u32) -> Role {
        match self {
            Workload::DmaUnmap if idx.is_multiple_of(2) => Role::DmaRange,
            Workload::DmaUnmap => Role::DmaNoRange,
            Workload::Ats => Role::Ats,
            Workload::SvaChurn => Role::Sva,
            Workload::NoisyNeighbour if idx == 0 => Role::Flooder,
            Workload::NoisyNeighbour => Role::Light,
            Workload::HotUnplug if idx == 0 => Role::UnplugLate,
            Workload::HotUnplug => Role::UnplugClean,
            Workload::Hostile => {
                [Role::HostileKernel, Role::Good, Role::HostileTegra][idx as usize % 3]
            }
            Workload::Mixed => [
                Role::DmaRange,
                Role::Ats,
                Role::Sva,
                Role::HostileKernel,
                Role::TegraDma,
                Role::DmaNoRange,
            ][idx as usize % 6],
        }
    }
}

/// How big a generated trace is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenParams {
    /// VMs, each with one vIOMMU (1..=4096).
    pub vms: u32,
    /// Devices per VM (1..=128; a Tegra241 VM uses at most 16).
    pub devices: u32,
    /// Command rings per VM (1..=16).
    pub rings: u32,
    /// LOG2SIZE of every ring (2..=19).
    pub log2size: u8,
    /// Ring entries (commands and CMD_SYNCs) to write across all VMs, approximately: each VM
    /// stops at the first batch that reaches its share.
    pub commands: u64,
    /// The seed.
    pub seed: u64,
}

/// Most ring entries one generation may write whatever the limits (the generator holds every
/// event in memory before merging: tens of bytes each).
pub const MAX_COMMANDS: u64 = 100_000_000;

/// Default of [`GenLimits::max_commands`].
pub const DEFAULT_MAX_GEN_COMMANDS: u64 = 10_000_000;

/// Bounds on what a generation may ask for, so parameters cannot make it (or the replay of what
/// it writes) exhaust memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenLimits {
    /// Bytes of ring slots the trace may declare: VMs x rings x 2^LOG2SIZE x 16
    /// (`--max-ring-memory`; the same default as replay's, so what `gen` writes replays).
    pub max_ring_memory: u64,
    /// Ring entries to write (`--max-commands`, at most [`MAX_COMMANDS`]).
    pub max_commands: u64,
}

impl Default for GenLimits {
    fn default() -> Self {
        GenLimits {
            max_ring_memory: crate::DEFAULT_MAX_RING_MEMORY,
            max_commands: DEFAULT_MAX_GEN_COMMANDS,
        }
    }
}

/// Why a trace was not generated.
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    /// Parameters that together need more than a limit allows.
    #[error("{what} is {value}, above the limit of {limit} ({flag} to raise it)")]
    Limit {
        /// What is too large.
        what: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        limit: u64,
        /// The flag that raises it.
        flag: &'static str,
    },
    /// A parameter out of its range.
    #[error("{name}={value} is out of range: {why}")]
    Param {
        /// The parameter.
        name: &'static str,
        /// Its value.
        value: u64,
        /// The range.
        why: &'static str,
    },
    /// Writing failed.
    #[error(transparent)]
    Write(#[from] WriteError),
}

impl GenParams {
    /// Refuses parameters outside the ranges documented on each field, or above the default
    /// [`GenLimits`].
    pub fn check(&self) -> Result<(), GenError> {
        self.check_with(&GenLimits::default())
    }

    /// Bytes of ring slots the trace declares: VMs x rings x 2^LOG2SIZE x 16.
    pub fn ring_bytes(&self) -> u64 {
        u64::from(self.vms) * u64::from(self.rings) * (16u64 << self.log2size.min(63))
    }

    /// Refuses parameters outside the ranges documented on each field, or above `limits`.
    pub fn check_with(&self, limits: &GenLimits) -> Result<(), GenError> {
        let bad = |name, value: u64, why| Err(GenError::Param { name, value, why });
        if !(1..=4096).contains(&self.vms) {
            return bad("vms", self.vms.into(), "1 to 4096");
        }
        if !(1..=128).contains(&self.devices) {
            return bad("devices", self.devices.into(), "1 to 128 per VM");
        }
        if !(1..=16).contains(&self.rings) {
            return bad("rings", self.rings.into(), "1 to 16 per VM");
        }
        if !(2..=19).contains(&self.log2size) {
            return bad(
                "log2size",
                self.log2size.into(),
                "2 to 19 (a batch needs a command, its CMD_SYNC and the previous CMD_SYNC)",
            );
        }
        if !(1..=MAX_COMMANDS).contains(&self.commands) {
            return bad("commands", self.commands, "1 to 100000000");
        }
        let over = |what, value, limit, flag| {
            Err(GenError::Limit {
                what,
                value,
                limit,
                flag,
            })
        };
        if self.commands > limits.max_commands {
            return over(
                "commands",
                self.commands,
                limits.max_commands,
                "--max-commands",
            );
        }
        if self.ring_bytes() > limits.max_ring_memory {
            return over(
                "the rings' memory (vms x rings x 2^log2size x 16 bytes)",
                self.ring_bytes(),
                limits.max_ring_memory,
                "--max-ring-memory",
            );
        }
        Ok(())
    }
}

/// What a generation wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenStats {
    /// Records written.
    pub records: u64,
    /// Ring entries written (commands and CMD_SYNCs, GuestFix not counted).
    pub commands: u64,
    /// Timestamp of the last record.
    pub last_ns: u64,
}

/// Generates `workload` into `out`.
pub fn generate<W: Write>(
    workload: Workload,
    p: &GenParams,
    out: &mut TraceWriter<W>,
) -> Result<GenStats, GenError> {
    generate_with(workload, p, &GenLimits::default(), out)
}

/// Generates `workload` into `out` once `p` passes [`GenParams::check_with`] under `limits`.
pub fn generate_with<W: Write>(
    workload: Workload,
    p: &GenParams,
    limits: &GenLimits,
    out: &mut TraceWriter<W>,
) -> Result<GenStats, GenError> {
    p.check_with(limits)?;
    let shape = QueueShape::new(p.log2size).map_err(|_| GenError::Param {
        name: "log2size",
        value: p.log2size.into(),
        why: "2 to 19",
    })?;
    let roles: Vec<Role> = (0..p.vms).map(|i| workload.role(i)).collect();
    let total: u64 = roles.iter().map(|r| r.weight(p.vms)).sum();
    let budget = |r: Role| (p.commands * r.weight(p.vms)).div_ceil(total);
    let make = |i: u32, deadline: u64| {
        let role = roles[i as usize];
        let mut vm = Vm::new(i, role.config(p, i, shape), p.seed);
        role.run(&mut vm, budget(role), deadline);
        vm.stream
    };
    let streams: Vec<Stream> = if workload == Workload::NoisyNeighbour {
        // The light VMs run for as long as the flooder does.
        let flood = make(0, u64::MAX);
        let end = flood.events.last().map_or(0, |e| e.0);
        let rest: Vec<Stream> = (1..p.vms).into_par_iter().map(|i| make(i, end)).collect();
        std::iter::once(flood).chain(rest).collect()
    } else {
        (0..p.vms)
            .into_par_iter()
            .map(|i| make(i, u64::MAX))
            .collect()
    };
    merge(&streams, out)
}

/// Writes the streams' events in timestamp order.
fn merge<W: Write>(streams: &[Stream], out: &mut TraceWriter<W>) -> Result<GenStats, GenError> {
    let mut heap: BinaryHeap<Reverse<(u64, usize, usize)>> = streams
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.events.is_empty())
        .map(|(v, s)| Reverse((s.events[0].0, v, 0)))
        .collect();
    let mut stats = GenStats::default();
    while let Some(Reverse((_, v, i))) = heap.pop() {
        let (ts, e) = streams[v].event(i);
        if let super::Event::Commands { cmds, .. } = e {
            stats.commands += cmds.len() as u64;
        }
        out.write(ts, &e)?;
        stats.records += 1;
        stats.last_ns = ts;
        if let Some(next) = streams[v].events.get(i + 1) {
            heap.push(Reverse((next.0, v, i + 1)));
        }
    }
    Ok(stats)
}

/// Generates `workload` as a complete trace file in memory (header flagged synthetic, creation
/// time 0 so the bytes depend on the parameters alone).
pub fn generate_vec(workload: Workload, p: &GenParams) -> Result<Vec<u8>, GenError> {
    let meta = TraceMeta {
        flags: FLAG_SYNTHETIC,
        created_unix_ns: 0,
    };
    let mut w = TraceWriter::new(Cursor::new(Vec::new()), meta)?;
    generate(workload, p, &mut w)?;
    Ok(w.finish_counted()?.into_inner())
}
