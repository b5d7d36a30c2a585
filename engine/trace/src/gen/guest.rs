//! A guest as the generators model it: one VM with its vIOMMU, devices and command rings, writing
//! batches the way Linux does and keeping to the ring's capacity as the guest sees it.
//!
//! Capacity rule. A guest only knows what a CMD_SYNC has told it: everything before a completed
//! sync was consumed. So before writing a batch the guest assumes only that CONS has reached its
//! previous CMD_SYNC, and writes the batch only if the entries from that sync to the end of the
//! new batch fit in the ring. Every batch ends with its own CMD_SYNC and is doorbelled at once,
//! so at most `1 + batch` entries are ever outstanding: batches are cut at
//! `min(63, 2^LOG2SIZE - 2)` commands plus their sync. A replay that blocks a Commands record
//! until the ring has room therefore never waits on anything that is not already published.
//!
//! Errors. When a batch holds a command the engine must refuse, the ring stops there; the guest,
//! seeing CONS.ERR, rewrites the slot with a CMD_SYNC (GuestFix) and acknowledges (GuestAck),
//! one slot after the other, before it writes anything else to that ring.

use super::linux;
use crate::{Event, Profile};
use vcmdq::command::{decode, Command, RawCommand};
use vcmdq::mock::Rng;
use vcmdq::queue::QueueShape;

/// An event of a VM's stream; commands live in the stream's arena.
#[derive(Clone, Copy, Debug)]
pub(super) enum Ev {
    /// Any event but Commands.
    Plain(Event<'static>),
    /// Commands `cmds[start..start + len]` of the stream.
    Cmds {
        ring: u32,
        slot: u32,
        start: usize,
        len: usize,
    },
}

/// One VM's events in time order.
#[derive(Default)]
pub(super) struct Stream {
    pub events: Vec<(u64, Ev)>,
    pub cmds: Vec<RawCommand>,
}

impl Stream {
    /// Event `i` with its timestamp, commands borrowed from the arena.
    pub fn event(&self, i: usize) -> (u64, Event<'_>) {
        let (ts, ev) = self.events[i];
        let e = match ev {
            Ev::Plain(e) => e,
            Ev::Cmds {
                ring,
                slot,
                start,
                len,
            } => Event::Commands {
                ring,
                slot,
                cmds: &self.cmds[start..start + len],
            },
        };
        (ts, e)
    }
}

/// A guest command ring as its guest sees it.
pub(super) struct Ring {
    pub id: u32,
    pub shape: QueueShape,
    /// The guest's PROD (index and wrap).
    pub prod: u32,
    /// Guest-physical address of slot 0, for MSI-polled CMD_SYNCs.
    pub base_gpa: u64,
}

impl Ring {
    /// Commands per batch, the batch's CMD_SYNC not counted (see the capacity rule).
    pub fn max_batch(&self) -> usize {
        63.min(self.shape.entries() as usize - 2)
    }
}

/// A host device as the guest sees it.
#[derive(Clone, Debug)]
pub(super) struct Dev {
    pub device: u32,
    pub vsid: u32,
    /// ATS enabled: unmaps are followed by ATC_INV.
    pub ats: bool,
    /// The ASID of the device's DMA domain (devices of one domain share it).
    pub asid: u16,
    pub bound: bool,
}

/// What the engine is expected to do with a command, as far as the guest's error handling goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fate {
    /// Consumed (forwarded, trapped or dropped): no error.
    Accepted,
    /// The ring stops here: the guest fixes the slot, then acknowledges.
    Refused,
    /// As `Refused`, but the guest first acknowledges without fixing, the ring stops again at
    /// the same slot, and only then does the guest fix and acknowledge.
    RefusedAckFirst,
}

/// How a VM is set up.
#[derive(Clone, Copy, Debug)]
pub(super) struct VmConfig {
    pub profile: Profile,
    pub range_inv: bool,
    pub msi: bool,
    pub devices: u32,
    pub ats: bool,
    /// Devices per DMA domain (sharing an ASID).
    pub per_domain: u32,
    pub rings: u32,
    pub shape: QueueShape,
}

/// One VM and the events it has produced so far.
pub(super) struct Vm {
    pub idx: u32,
    pub viommu: u32,
    pub vmid: u16,
    pub smmu: u32,
    pub cfg: VmConfig,
    pub devs: Vec<Dev>,
    pub rings: Vec<Ring>,
    pub rng: Rng,
    /// The VM's clock, ns.
    pub now: u64,
    pub stream: Stream,
    /// Ring entries written (commands and syncs).
    pub entries: u64,
    next_device: u32,
}

/// Physical SMMUs the generated host has; VMs are spread over them.
pub(super) const SMMUS: u32 = 2;

impl Vm {
    /// Creates VM `idx`: its vIOMMU, devices (each bound to a vSID) and rings, at `idx * 500` ns.
    pub fn new(idx: u32, cfg: VmConfig, seed: u64) -> Vm {
        let smmu = idx % SMMUS;
        let devices = if cfg.profile == Profile::Tegra241 {
            // A Tegra241 VINTF has 16 SID_MATCH/SID_REPLACE slots.
            cfg.devices.min(16)
        } else {
            cfg.devices
        };
        let mut vm = Vm {
            idx,
            viommu: idx,
            vmid: 1 + idx as u16,
            smmu,
            cfg,
            devs: Vec::new(),
            rings: Vec::new(),
            rng: Rng::fork(seed, u64::from(idx)),
            now: u64::from(idx) * 500,
            stream: Stream::default(),
            entries: 0,
            next_device: 0,
        };
        vm.plain(Event::ViommuCreate {
            viommu: vm.viommu,
            vmid: vm.vmid,
            smmu,
            profile: cfg.profile,
            sidsize: 16,
            range_inv: cfg.range_inv,
            // Generated VMs sit on an SMMU with every feature: written as before the field.
            features: vcmdq::viommu::SmmuFeatures {
                ril: cfg.range_inv,
                ..vcmdq::viommu::SmmuFeatures::ANY
            },
        });
        for k in 0..devices {
            let asid = 1 + (k / cfg.per_domain.max(1)) as u16;
            let vsid = (k + 1) << 3;
            vm.plug(vsid, asid, cfg.ats);
        }
        for r in 0..cfg.rings {
            let id = (idx << 4) | r;
            vm.plain(Event::RingCreate {
                ring: id,
                viommu: vm.viommu,
                log2size: cfg.shape.log2size(),
            });
            vm.rings.push(Ring {
                id,
                shape: cfg.shape,
                prod: 0,
                base_gpa: 0x4000_0000 + (u64::from(r) << 24),
            });
        }
        vm.now += 10_000;
        vm
    }

    /// Records a non-command event at the VM's clock.
    pub fn plain(&mut self, e: Event<'static>) {
        self.stream.events.push((self.now, Ev::Plain(e)));
    }

    /// A new host device bound to `vsid` (hot plug, or setup).
    pub fn plug(&mut self, vsid: u32, asid: u16, ats: bool) -> usize {
        self.next_device += 1;
        let device = (self.idx << 8) | self.next_device;
        let psid = ((self.idx + 1) << 8) | self.next_device;
        self.plain(Event::DeviceAdd {
            device,
            smmu: self.smmu,
            psid,
        });
        self.plain(Event::Bind {
            viommu: self.viommu,
            device,
            vsid,
        });
        self.devs.push(Dev {
            device,
            vsid,
            ats,
            asid,
            bound: true,
        });
        self.now += 1_000;
        self.devs.len() - 1
    }

    /// The host unbinds device `d` (after the guest stopped using it).
    pub fn unplug(&mut self, d: usize) {
        self.devs[d].bound = false;
        let device = self.devs[d].device;
        self.plain(Event::Unbind {
            viommu: self.viommu,
            device,
        });
        self.now += 1_000;
    }

    /// Indexes of bound devices.
    pub fn bound(&self) -> Vec<usize> {
        (0..self.devs.len())
            .filter(|&d| self.devs[d].bound)
            .collect()
    }

    /// A vSID no device of this VM is bound to.
    pub fn unknown_vsid(&mut self) -> u32 {
        loop {
            let v = self.rng.range(1, 0xffff) as u32;
            if !self.devs.iter().any(|d| d.bound && d.vsid == v) {
                return v;
            }
        }
    }

    /// Whether the engine must refuse `raw` under this VM's profile with its current bindings.
    /// The generators only emit commands whose fate the rules in `docs/rules.md`
    /// settle without doubt.
    pub fn refused(&self, raw: &RawCommand) -> bool {
        let Ok(cmd) = decode(*raw) else {
            return true;
        };
        let bound = |sid: u32| self.devs.iter().any(|d| d.bound && d.vsid == sid);
        let range_bad = |tg: u8| tg != 0 && !self.cfg.range_inv;
        let kernel = self.cfg.profile == Profile::Kernel;
        match cmd {
            Command::CmdSync { .. }
            | Command::CfgiSte { ssec: false, .. }
            | Command::CfgiSteRange { ssec: false, .. }
            | Command::PrefetchConfig { .. }
            | Command::PrefetchAddr { .. }
            | Command::TlbiNhAsid { .. } => false,
            Command::TlbiNhAll { .. } | Command::TlbiNsnhAll {} => !kernel,
            Command::TlbiNhVa { tg, .. } => range_bad(tg),
            Command::TlbiNhVaa { tg, .. } => !kernel || range_bad(tg),
            Command::AtcInv { sid, size, .. } => !bound(sid) || size > linux::ATC_SIZE_ALL,
            Command::CfgiCd { ssec, sid, .. } | Command::CfgiCdAll { ssec, sid } => {
                !kernel || ssec || !bound(sid)
            }
            _ => true,
        }
    }

    /// The fate of each command as the guest expects it.
    pub fn fates(&self, cmds: &[RawCommand]) -> Vec<(RawCommand, Fate)> {
        cmds.iter()
            .map(|c| {
                let f = if self.refused(c) {
                    Fate::Refused
                } else {
                    Fate::Accepted
                };
                (*c, f)
            })
            .collect()
    }

    /// Submits commands that the engine accepts.
    pub fn submit_ok(&mut self, ring: usize, cmds: &[RawCommand]) {
        let items = self.fates(cmds);
        self.submit(ring, &items, 0);
    }

    /// Writes `items` into ring `ring` in batches (each closed by a CMD_SYNC and doorbelled with
    /// `junk` ORed into PROD's unused bits), handling each expected refusal as Linux does.
    pub fn submit(&mut self, ring: usize, items: &[(RawCommand, Fate)], junk: u32) {
        let max = self.rings[ring].max_batch().max(1);
        for chunk in items.chunks(max) {
            let r = &mut self.rings[ring];
            let (id, shape, start) = (r.id, r.shape, r.prod);
            let sync_ptr = shape.advance(start, chunk.len() as u32);
            let msi = self
                .cfg
                .msi
                .then(|| r.base_gpa + u64::from(shape.index(sync_ptr)) * 16);
            let first = self.stream.cmds.len();
            self.stream.cmds.extend(chunk.iter().map(|(c, _)| *c));
            self.stream.cmds.push(linux::cmd_sync(msi));
            let len = chunk.len() + 1;
            r.prod = shape.advance(start, len as u32);
            let prod = r.prod | junk;
            self.stream.events.push((
                self.now,
                Ev::Cmds {
                    ring: id,
                    slot: start,
                    start: first,
                    len,
                },
            ));
            let mut t = self.now + 20;
            self.stream
                .events
                .push((t, Ev::Plain(Event::Doorbell { ring: id, prod })));
            for (i, (_, fate)) in chunk.iter().enumerate() {
                let slot = shape.advance(start, i as u32);
                let fix = Event::GuestFix {
                    ring: id,
                    slot,
                    cmd: linux::fix_sync(),
                };
                let ack = Event::GuestAck { ring: id };
                match fate {
                    Fate::Accepted => continue,
                    Fate::Refused => {
                        t += 1_500;
                        self.stream.events.push((t, Ev::Plain(fix)));
                        t += 100;
                        self.stream.events.push((t, Ev::Plain(ack)));
                    }
                    Fate::RefusedAckFirst => {
                        t += 1_500;
                        self.stream.events.push((t, Ev::Plain(ack)));
                        t += 1_500;
                        self.stream.events.push((t, Ev::Plain(fix)));
                        t += 100;
                        self.stream.events.push((t, Ev::Plain(ack)));
                    }
                }
            }
            self.now = t + 100;
            self.entries += len as u64;
        }
    }

    /// A ring chosen at random (the CPU the guest runs this on).
    pub fn any_ring(&mut self) -> usize {
        self.rng.below(self.rings.len() as u64) as usize
    }

    /// An unmap size and its leaf granule, in the proportions a DMA-heavy guest shows: mostly
    /// single pages, some tens of KiB, some hundreds, a few 2 MiB blocks.
    pub fn unmap_size(&mut self) -> (u64, u64) {
        let p = self.rng.below(100);
        match p {
            0..60 => (4096, 4096),
            60..80 => (4096 << self.rng.range(1, 4), 4096),
            80..92 => (4096 << self.rng.range(5, 8), 4096),
            92..97 => (2 << 20, 2 << 20),
            _ => ((2 << 20) * self.rng.range(2, 8), 2 << 20),
        }
    }

    /// A page-aligned IOVA for `size`, aligned as the IOVA allocator would (to the size's power
    /// of two, at most 2 MiB).
    pub fn iova(&mut self, size: u64) -> u64 {
        let align = size.next_power_of_two().clamp(4096, 2 << 20);
        let slots = (1u64 << 32) / align;
        0x1_0000_0000 + self.rng.below(slots) * align
    }

    /// One strict-mode DMA unmap on device `d`: the TLB invalidation of the range, then, for ATS
    /// devices, an ATC_INV for every ATS device of the domain; each a batch with its CMD_SYNC.
    pub fn dma_unmap(&mut self, d: usize, range_override: Option<(u64, u64)>) {
        let (size, granule) = range_override.unwrap_or_else(|| self.unmap_size());
        let iova = self.iova(size);
        let asid = self.devs[d].asid;
        let ring = self.any_ring();
        let tlbi = linux::tlbi_va(0, asid, iova, size, granule, true, self.cfg.range_inv);
        self.submit_ok(ring, &tlbi);
        if self.devs[d].ats {
            let atc: Vec<RawCommand> = self
                .devs
                .iter()
                .filter(|x| x.bound && x.ats && x.asid == asid)
                .map(|x| linux::atc_inv(x.vsid, None, iova, size))
                .collect();
            if !atc.is_empty() {
                self.submit_ok(ring, &atc);
            }
        }
    }

    /// A bound device at random, if any.
    pub fn any_bound(&mut self) -> Option<usize> {
        let b = self.bound();
        if b.is_empty() {
            None
        } else {
            Some(*self.rng.pick(&b))
        }
    }
}
