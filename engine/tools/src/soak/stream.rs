//! What each guest ring of a soak submits: an endless stream of commands that is a pure
//! function of (seed, ring, sequence number), so that anyone (the guest writing it, the hardware
//! check verifying what reached the physical queue, the control plane checking traps) can
//! regenerate entry `seq` of ring `ring` on its own, with no shared log.
//!
//! Every forwarded command identifies itself: TLBI_NH_ASID and TLBI_NH_VA carry
//! `ASID = ring << 8 | seq & 0xff`; TLBI_NH_VA, TLBI_NH_VAA and ATC_INV carry
//! `ADDR = (ring << 40 | seq) << 12`; CFGI_CD carries `SSID = seq & 0xfffff`; every SID-carrying
//! command names one of the ring's own devices (so its pSID names the ring); TLBI_NH_ALL and
//! TLBI_NSNH_ALL are issued only by the vIOMMU's owner ring (so the VMID names the ring). See
//! `plan.rs` for the numbering.
//!
//! The mix changes every 4096 entries between phases modelled on the trace generators'
//! workloads (Linux DMA unmaps, ATS unmaps, SVA churn, a flood, a bit of everything), and
//! across all phases a few entries per million are hostile (each kind of refusal the policy
//! has), trapped (CFGI_STE, CFGI_STE_RANGE) or dropped (PREFETCH_*). Well-formed TLBIs carry a
//! spoofed VMID three times in four.

use super::plan::{Plan, VMID_BASE};
use vcmdq::command::{opcode, Command, RawCommand, LAYOUTS};
use vcmdq::mock::Rng;
use vcmdq::translate::RefuseReason;
use vcmdq::viommu::Profile;

/// Sequence numbers wrap in the identity after 2^40 entries of one ring.
pub const SEQ_BITS: u32 = 40;

/// Entries per phase of the mix.
const PHASE_SHIFT: u32 = 12;

/// One guest CMD_SYNC in this many is one the guest waits for before writing more.
const BLOCKING_ONE_IN: u64 = 8;

/// How often each kind of entry comes, in entries per million, across all phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mix {
    /// Hostile commands (refused with CERROR_ILL; the guest fixes and acknowledges).
    pub hostile_ppm: u32,
    /// CFGI_STE and CFGI_STE_RANGE (trapped to the control plane).
    pub trap_ppm: u32,
    /// PREFETCH_CONFIG and PREFETCH_ADDR (dropped).
    pub prefetch_ppm: u32,
    /// Each ring's stream is cut into segments of 2^`churn_log2` entries (0: no segments, else
    /// at least 4). At each boundary the guest lets its ring go quiet and asks the control
    /// plane to act: it unbinds the ring's second device before an odd segment and binds it
    /// again before an even one, while the guest writes the segment's first entries (its
    /// window, where a command naming the device may be forwarded or refused); past the
    /// window, an odd segment names the device only in one [`Hostile::Unbound`] command,
    /// refused. At every third boundary the control plane also detaches the ring and attaches
    /// a new one of another size, on which the stream goes on (then the guest waits for it
    /// before writing the window).
    pub churn_log2: u8,
    /// One doorbell in this many (per ring) is followed by a hostile PROD game: junk bits
    /// above the wrap bit, PROD moved backwards or past a full ring and back, or slots the
    /// engine has taken rewritten with junk (0: none).
    pub prod_game_every: u32,
}

impl Default for Mix {
    fn default() -> Self {
        Mix {
            hostile_ppm: 50,
            trap_ppm: 200,
            prefetch_ppm: 2000,
            churn_log2: 13,
            prod_game_every: 64,
        }
    }
}

/// A kind of hostile command; each is refused with a different [`RefuseReason`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Hostile {
    /// An opcode the SMMUv3 does not define.
    IllegalOpcode,
    /// A RES0 bit set in a TLBI_NH_VA.
    Res0,
    /// ATC_INV or CFGI_CD naming a vSID not bound in the vIOMMU (another VM's, or none).
    UnknownVsid,
    /// A legal command the profile does not let a guest issue (stage 2, EL2, PRI, ...).
    NotAllowed,
    /// CFGI_STE or CFGI_CD with SSEC.
    Secure,
    /// ATC_INV with SIZE above 52.
    AtcSize,
    /// CMD_SYNC with the reserved CS=3.
    SyncCs,
    /// TLBI_NH_VA with TG set on an SMMU without range invalidation.
    RangeUnsupported,
    /// TLBI_NH_VA with NUM set and TG=0.
    MalformedRange,
    /// ATC_INV naming the ring's own second device while the control plane has it unbound
    /// (the first entry after an odd segment's start; see [`Mix::churn_log2`]).
    Unbound,
}

impl Hostile {
    /// Every kind.
    pub const ALL: [Hostile; 10] = [
        Hostile::IllegalOpcode,
        Hostile::Res0,
        Hostile::UnknownVsid,
        Hostile::NotAllowed,
        Hostile::Secure,
        Hostile::AtcSize,
        Hostile::SyncCs,
        Hostile::RangeUnsupported,
        Hostile::MalformedRange,
        Hostile::Unbound,
    ];

    /// Whether `reason` is the refusal this kind must get.
    pub fn matches(self, reason: &RefuseReason) -> bool {
        matches!(
            (self, reason),
            (Hostile::IllegalOpcode, RefuseReason::IllegalOpcode { .. })
                | (Hostile::Res0, RefuseReason::Res0 { .. })
                | (Hostile::UnknownVsid, RefuseReason::UnknownVsid { .. })
                | (
                    Hostile::NotAllowed,
                    RefuseReason::NotAllowedByProfile { .. }
                )
                | (Hostile::Secure, RefuseReason::Secure { .. })
                | (Hostile::AtcSize, RefuseReason::AtcSizeTooLarge { .. })
                | (Hostile::SyncCs, RefuseReason::ReservedSyncCs)
                | (
                    Hostile::RangeUnsupported,
                    RefuseReason::RangeUnsupported { .. }
                )
                | (Hostile::MalformedRange, RefuseReason::MalformedRange { .. })
                | (Hostile::Unbound, RefuseReason::UnknownVsid { .. })
        )
    }

    /// A short name for summaries.
    pub fn name(self) -> &'static str {
        match self {
            Hostile::IllegalOpcode => "illegal_opcode",
            Hostile::Res0 => "res0",
            Hostile::UnknownVsid => "unknown_vsid",
            Hostile::NotAllowed => "not_allowed_by_profile",
            Hostile::Secure => "secure",
            Hostile::AtcSize => "atc_size",
            Hostile::SyncCs => "sync_cs3",
            Hostile::RangeUnsupported => "range_unsupported",
            Hostile::MalformedRange => "malformed_range",
            Hostile::Unbound => "unbound_vsid",
        }
    }
}

/// What the engine must do with an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Forward it, patched.
    Forward,
    /// Drop it (PREFETCH_*).
    Drop,
    /// A guest CMD_SYNC: complete it once everything before it has completed.
    Sync {
        /// CS: 0 none, 1 IRQ (MSIDATA goes to the completion word), 2 SEV.
        cs: u8,
        /// The guest writes nothing more until this sync completes.
        blocking: bool,
    },
    /// Hand it to the control plane (CFGI_STE, CFGI_STE_RANGE).
    Trap,
    /// Refuse it: the ring stops there with CERROR_ILL; the guest overwrites it with a
    /// CMD_SYNC (CS=none) and acknowledges.
    Hostile(Hostile),
}

/// One entry of a ring's stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The command the guest writes.
    pub cmd: RawCommand,
    /// What must become of it.
    pub class: Class,
}

/// What the guest writes over a refused command (as Linux does): a CMD_SYNC, CS=none.
pub const FIX: RawCommand = RawCommand::new(opcode::CMD_SYNC as u64, 0);

#[derive(Clone, Copy, Debug)]
enum Phase {
    Dma,
    Ats,
    Sva,
    Flood,
    Misc,
}

impl Phase {
    /// Guest CMD_SYNCs per 1024 entries.
    fn syncs_per_1024(self) -> u64 {
        match self {
            Phase::Dma => 32,
            Phase::Ats => 64,
            Phase::Sva => 128,
            Phase::Flood => 4,
            Phase::Misc => 16,
        }
    }
}

/// What the stream needs to know of a ring.
#[derive(Clone, Debug)]
struct RingView {
    ring: u64,
    profile: Profile,
    range_inv: bool,
    sidsize: u8,
    owner: bool,
    vmid: u16,
    /// Another vIOMMU's VMID (its own when there is only one vIOMMU).
    other_vmid: u16,
    vsids: [u32; 2],
    foreign_vsids: [u32; 2],
    hostile: Vec<Hostile>,
    key: u64,
}

/// Every ring's stream.
#[derive(Clone, Debug)]
pub struct Stream {
    rings: Vec<RingView>,
    mix: Mix,
}

/// The identity carried in an address field: `(ring << 40 | seq) << 12`.
pub fn ident_addr(ring: u64, seq: u64) -> u64 {
    ((ring << SEQ_BITS) | (seq & ((1 << SEQ_BITS) - 1))) << 12
}

/// The identity carried in an ASID: `ring << 8 | seq & 0xff`.
pub fn ident_asid(ring: u64, seq: u64) -> u16 {
    ((ring << 8) | (seq & 0xff)) as u16
}

impl Stream {
    /// The streams of every ring of `plan`, from `seed`.
    pub fn new(plan: &Plan, seed: u64, mix: Mix) -> Stream {
        let nv = plan.viommus.len();
        let rings = plan
            .rings
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let cfg = &plan.viommus[r.viommu].cfg;
                let mut hostile = vec![
                    Hostile::IllegalOpcode,
                    Hostile::Res0,
                    Hostile::UnknownVsid,
                    Hostile::NotAllowed,
                    Hostile::Secure,
                    Hostile::AtcSize,
                    Hostile::SyncCs,
                ];
                hostile.push(if cfg.range_inv {
                    Hostile::MalformedRange
                } else {
                    Hostile::RangeUnsupported
                });
                RingView {
                    ring: i as u64,
                    profile: cfg.profile,
                    range_inv: cfg.range_inv,
                    sidsize: cfg.sidsize,
                    owner: r.owner,
                    vmid: cfg.vmid,
                    other_vmid: VMID_BASE + ((r.viommu + 1) % nv) as u16,
                    vsids: r.vsids,
                    foreign_vsids: r.foreign_vsids,
                    hostile,
                    key: Rng::fork(seed, i as u64).next_u64(),
                }
            })
            .collect();
        Stream { rings, mix }
    }

    /// Rings.
    pub fn rings(&self) -> usize {
        self.rings.len()
    }

    /// The mix.
    pub fn mix(&self) -> Mix {
        self.mix
    }

    fn phase(&self, r: &RingView, seq: u64) -> Phase {
        match Rng::fork(r.key ^ 0x5048_4153_4520_2020, seq >> PHASE_SHIFT).below(5) {
            0 => Phase::Dma,
            1 => Phase::Ats,
            2 => Phase::Sva,
            3 => Phase::Flood,
            _ => Phase::Misc,
        }
    }

    /// Whether entry `seq` lies in a segment in which the ring's second device is unbound.
    pub fn unbound(&self, seq: u64) -> bool {
        self.mix.churn_log2 != 0 && (seq >> self.mix.churn_log2) & 1 == 1
    }

    /// Entries at the start of each segment (but the first) written while the control plane
    /// binds or unbinds the ring's second device: a quarter of a segment, at most 64.
    pub fn window_len(&self) -> u64 {
        if self.mix.churn_log2 == 0 {
            0
        } else {
            ((1u64 << self.mix.churn_log2) / 4).min(64)
        }
    }

    /// Whether entry `seq` is in a segment's window: a command of it naming the ring's second
    /// device may be forwarded or refused, depending on when the engine read it.
    pub fn in_window(&self, seq: u64) -> bool {
        let l = self.mix.churn_log2;
        l != 0 && seq >> l > 0 && seq & ((1 << l) - 1) < self.window_len()
    }

    /// Whether the control plane replaces the ring at the start of segment `k`.
    pub fn swaps_ring_at(&self, k: u64) -> bool {
        k > 0 && k.is_multiple_of(3)
    }

    /// The segment of entry `seq` (0 without segments).
    pub fn segment(&self, seq: u64) -> u64 {
        if self.mix.churn_log2 == 0 {
            0
        } else {
            seq >> self.mix.churn_log2
        }
    }

    /// The first entry of segment `k`.
    pub fn segment_start(&self, k: u64) -> u64 {
        if self.mix.churn_log2 == 0 {
            u64::MAX
        } else {
            k << self.mix.churn_log2
        }
    }

    fn draw(&self, ring: usize, seq: u64) -> (Class, Rng, Phase) {
        let r = &self.rings[ring];
        let mut rng = Rng::fork(r.key, seq);
        let phase = self.phase(r, seq);
        let m = &self.mix;
        let x = rng.below(1_000_000) as u32;
        let unbound_probe =
            self.unbound(seq) && seq & ((1 << m.churn_log2) - 1) == self.window_len();
        let class = if unbound_probe {
            Class::Hostile(Hostile::Unbound)
        } else if x < m.hostile_ppm {
            Class::Hostile(*rng.pick(&r.hostile))
        } else if x < m.hostile_ppm + m.trap_ppm {
            Class::Trap
        } else if x < m.hostile_ppm + m.trap_ppm + m.prefetch_ppm {
            Class::Drop
        } else if rng.below(1024) < phase.syncs_per_1024() {
            Class::Sync {
                cs: rng.below(3) as u8,
                blocking: rng.below(BLOCKING_ONE_IN) == 0,
            }
        } else {
            Class::Forward
        };
        (class, rng, phase)
    }

    /// What must become of entry `seq` of ring `ring` (cheaper than [`Stream::entry`]).
    pub fn class(&self, ring: usize, seq: u64) -> Class {
        self.draw(ring, seq).0
    }

    /// Entry `seq` of ring `ring`.
    pub fn entry(&self, ring: usize, seq: u64) -> Entry {
        let (class, mut rng, phase) = self.draw(ring, seq);
        let r = &self.rings[ring];
        let cmd = match class {
            Class::Forward => self.forward(r, seq, phase, &mut rng),
            Class::Drop => self.prefetch(r, seq, &mut rng),
            Class::Trap => self.cfgi_ste(r, &mut rng, false),
            Class::Sync { cs, .. } => Command::CmdSync {
                cs,
                msh: rng.below(4) as u8,
                msiattr: rng.below(16) as u8,
                msidata: sync_msidata(r.ring, seq),
                msiaddr: rng.next_u64() & 0x000f_ffff_ffff_fffc,
            }
            .encode(),
            Class::Hostile(h) => self.hostile(r, seq, h, &mut rng),
        };
        Entry { cmd, class }
    }

    fn vmid(&self, r: &RingView, rng: &mut Rng) -> u16 {
        match rng.below(4) {
            0 => r.vmid,
            1 => r.other_vmid,
            2 => 0,
            _ => rng.next_u64() as u16,
        }
    }

    /// TG, NUM, SCALE of a well-formed TLBI on this ring's SMMU.
    fn range(&self, r: &RingView, rng: &mut Rng) -> (u8, u8, u8) {
        if r.range_inv && rng.below(2) == 0 {
            (
                rng.range(1, 3) as u8,
                rng.below(32) as u8,
                rng.below(32) as u8,
            )
        } else {
            (0, 0, 0)
        }
    }

    fn forward(&self, r: &RingView, seq: u64, phase: Phase, rng: &mut Rng) -> RawCommand {
        use opcode::*;
        let op = forward_opcode(r, phase, rng);
        // While the second device is unbound, well-formed traffic names only the first, but in
        // the window.
        let both = !self.unbound(seq) || self.in_window(seq);
        let sid = r.vsids[rng.below(2) as usize * usize::from(both)];
        let ssid = (seq & 0xf_ffff) as u32;
        let cmd = match op {
            TLBI_NH_VA | TLBI_NH_VAA => self.tlbi_by_address(r, seq, op, rng),
            TLBI_NH_ASID => Command::TlbiNhAsid {
                vmid: self.vmid(r, rng),
                asid: ident_asid(r.ring, seq),
            },
            TLBI_NH_ALL => Command::TlbiNhAll {
                vmid: self.vmid(r, rng),
            },
            TLBI_NSNH_ALL => Command::TlbiNsnhAll {},
            ATC_INV => Command::AtcInv {
                sid,
                ssv: rng.below(2) == 0,
                ssid,
                global: rng.below(8) == 0,
                addr: ident_addr(r.ring, seq),
                size: rng.below(53) as u8,
            },
            CFGI_CD => Command::CfgiCd {
                ssec: false,
                ssid,
                sid,
                leaf: rng.below(2) == 0,
            },
            // CFGI_CD_ALL carries no sequence number. In a window, one naming the second
            // device may be refused (read while unbound) and fixed by the guest; were the next
            // entry the same CFGI_CD_ALL, its arrival would look like the refused one's, and
            // the checker would count the next one lost. A CFGI_CD (SSID = seq) there instead.
            _ if self.in_window(seq) && sid == r.vsids[1] => Command::CfgiCd {
                ssec: false,
                ssid,
                sid,
                leaf: false,
            },
            _ => Command::CfgiCdAll { ssec: false, sid },
        };
        cmd.encode()
    }

    /// TLBI_NH_VA or TLBI_NH_VAA (`op`) of the entry's own address.
    fn tlbi_by_address(&self, r: &RingView, seq: u64, op: u8, rng: &mut Rng) -> Command {
        let (tg, num, scale) = self.range(r, rng);
        let vmid = self.vmid(r, rng);
        let addr = ident_addr(r.ring, seq);
        let (ttl, leaf) = (rng.below(4) as u8, rng.below(2) == 0);
        // TTL is RES0 without a granule; TG with NUM = SCALE = TTL = 0 is reserved.
        let ttl = match (tg, num | scale | ttl) {
            (0, _) => 0,
            (_, 0) => 3,
            _ => ttl,
        };
        if op == opcode::TLBI_NH_VA {
            Command::TlbiNhVa {
                vmid,
                asid: ident_asid(r.ring, seq),
                addr,
                tg,
                num,
                scale,
                ttl,
                leaf,
            }
        } else {
            Command::TlbiNhVaa {
                vmid,
                addr,
                tg,
                num,
                scale,
                ttl,
                leaf,
            }
        }
    }

    fn prefetch(&self, r: &RingView, seq: u64, rng: &mut Rng) -> RawCommand {
        // Any SID, bound or not: a prefetch is dropped before its SID is looked at.
        let sid = if rng.below(2) == 0 {
            r.vsids[0]
        } else {
            rng.next_u64() as u32
        };
        let (ssv, ssid) = (rng.below(2) == 0, (seq & 0xf_ffff) as u32);
        if rng.below(2) == 0 {
            Command::PrefetchConfig { ssv, ssid, sid }
        } else {
            Command::PrefetchAddr {
                ssv,
                ssid,
                sid,
                size: rng.below(32) as u8,
                addr: ident_addr(r.ring, seq),
            }
        }
        .encode()
    }

    fn cfgi_ste(&self, r: &RingView, rng: &mut Rng, ssec: bool) -> RawCommand {
        let sid = if rng.below(2) == 0 {
            r.vsids[rng.below(2) as usize]
        } else {
            rng.next_u64() as u32
        };
        if rng.below(2) == 0 {
            Command::CfgiSte {
                ssec,
                sid,
                leaf: rng.below(2) == 0,
            }
        } else {
            Command::CfgiSteRange {
                ssec,
                sid,
                range: rng.below(32) as u8,
            }
        }
        .encode()
    }

    fn hostile(&self, r: &RingView, seq: u64, h: Hostile, rng: &mut Rng) -> RawCommand {
        let sid = r.vsids[0];
        let cmd = match h {
            Hostile::IllegalOpcode => return illegal_opcode(rng),
            Hostile::Res0 => return res0(r, seq, rng),
            Hostile::UnknownVsid => unknown_vsid(r, seq, rng),
            Hostile::NotAllowed => not_allowed(r, seq, rng),
            Hostile::Secure => {
                if r.profile == Profile::Kernel && rng.below(2) == 0 {
                    Command::CfgiCd {
                        ssec: true,
                        ssid: 0,
                        sid,
                        leaf: false,
                    }
                } else {
                    return self.cfgi_ste(r, rng, true);
                }
            }
            Hostile::AtcSize => Command::AtcInv {
                sid,
                ssv: false,
                ssid: 0,
                global: false,
                addr: ident_addr(r.ring, seq),
                size: rng.range(53, 63) as u8,
            },
            Hostile::SyncCs => Command::CmdSync {
                cs: 3,
                msh: 0,
                msiattr: 0,
                msidata: 0,
                msiaddr: 0,
            },
            Hostile::Unbound => Command::AtcInv {
                sid: r.vsids[1],
                ssv: false,
                ssid: 0,
                global: false,
                addr: ident_addr(r.ring, seq),
                size: 0,
            },
            Hostile::RangeUnsupported | Hostile::MalformedRange => bad_range(r, seq, h, rng),
        };
        cmd.try_encode()
            .unwrap_or_else(|e| unreachable!("soak stream: a hostile command's fields fit: {e}"))
    }
}

/// The opcode of a well-formed entry: by the ring's phase, then what its profile allows.
fn forward_opcode(r: &RingView, phase: Phase, rng: &mut Rng) -> u8 {
    use opcode::*;
    let pick = rng.below(100);
    let mut op = match phase {
        Phase::Dma => TLBI_NH_VA,
        Phase::Ats => [TLBI_NH_VA, ATC_INV][(pick % 2) as usize],
        Phase::Sva => match pick {
            0..30 => CFGI_CD,
            30..60 => TLBI_NH_ASID,
            60..80 => ATC_INV,
            _ => TLBI_NH_VA,
        },
        Phase::Flood => match pick {
            0..60 => TLBI_NH_VA,
            60..80 => TLBI_NH_VAA,
            80..95 => TLBI_NH_ASID,
            _ => TLBI_NH_ALL,
        },
        Phase::Misc => *rng.pick(&[
            TLBI_NH_VA,
            TLBI_NH_VAA,
            TLBI_NH_ASID,
            TLBI_NH_ALL,
            TLBI_NSNH_ALL,
            ATC_INV,
            CFGI_CD,
            CFGI_CD_ALL,
        ]),
    };
    if matches!(op, TLBI_NH_ALL | TLBI_NSNH_ALL) && !r.owner {
        op = TLBI_NH_ASID;
    }
    if r.profile == Profile::Tegra241 {
        op = match op {
            TLBI_NH_VAA => TLBI_NH_VA,
            TLBI_NH_ALL | TLBI_NSNH_ALL => TLBI_NH_ASID,
            CFGI_CD | CFGI_CD_ALL => ATC_INV,
            o => o,
        };
    }
    op
}

/// An opcode no command has, with random bytes after it.
fn illegal_opcode(rng: &mut Rng) -> RawCommand {
    let op = loop {
        let op = rng.next_u64() as u8;
        if LAYOUTS[op as usize].is_none() {
            break op;
        }
    };
    RawCommand::new(u64::from(op) | (rng.next_u64() << 8), rng.next_u64())
}

/// A well-formed TLBI_NH_VA with one RES0 bit set (which no `Command` can encode).
fn res0(r: &RingView, seq: u64, rng: &mut Rng) -> RawCommand {
    let mut raw = Command::TlbiNhVa {
        vmid: r.vmid,
        asid: ident_asid(r.ring, seq),
        addr: ident_addr(r.ring, seq),
        tg: 0,
        num: 0,
        scale: 0,
        ttl: 0,
        leaf: true,
    }
    .encode();
    let allowed = LAYOUTS[opcode::TLBI_NH_VA as usize]
        .expect("TLBI_NH_VA is legal")
        .allowed;
    loop {
        let bit = rng.below(128);
        let (w, b) = ((bit / 64) as usize, bit % 64);
        if allowed[w] & (1 << b) == 0 {
            if w == 0 {
                raw.set_d0(raw.d0() | 1 << b);
            } else {
                raw.set_d1(raw.d1() | 1 << b);
            }
            return raw;
        }
    }
}

/// A command naming a vSID the vIOMMU does not have.
fn unknown_vsid(r: &RingView, seq: u64, rng: &mut Rng) -> Command {
    let vsid = match rng.below(3) {
        0 => r.foreign_vsids[0],
        1 => r.foreign_vsids[1],
        // Outside SIDSIZE on a 16-bit vIOMMU, never bound on a 32-bit one.
        _ if r.sidsize < 32 => (1 << r.sidsize) | r.vsids[0],
        _ => 0xffff_fff0,
    };
    if r.profile == Profile::Kernel && rng.below(2) == 0 {
        Command::CfgiCd {
            ssec: false,
            ssid: 0,
            sid: vsid,
            leaf: true,
        }
    } else {
        Command::AtcInv {
            sid: vsid,
            ssv: false,
            ssid: 0,
            global: false,
            addr: ident_addr(r.ring, seq),
            size: 0,
        }
    }
}

/// A command the ring's profile refuses.
fn not_allowed(r: &RingView, seq: u64, rng: &mut Rng) -> Command {
    let sid = r.vsids[0];
    let kernel_refuses = [
        Command::TlbiS12Vmall { vmid: r.other_vmid },
        Command::TlbiEl2All {},
        Command::TlbiEl2Asid { asid: 1 },
        Command::TlbiEl3All {},
        Command::PriResp {
            sid,
            ssv: false,
            ssid: 0,
            grpid: 1,
            resp: 0,
        },
        Command::Resume {
            sid,
            resp: 1,
            stag: 7,
        },
        Command::StallTerm { sid },
    ];
    let tegra_refuses = [
        Command::TlbiNhAll { vmid: r.vmid },
        Command::TlbiNsnhAll {},
        Command::CfgiCdAll { ssec: false, sid },
        Command::TlbiNhVaa {
            vmid: r.vmid,
            addr: ident_addr(r.ring, seq),
            tg: 0,
            num: 0,
            scale: 0,
            ttl: 0,
            leaf: false,
        },
    ];
    if r.profile == Profile::Tegra241 && rng.below(2) == 0 {
        *rng.pick(&tegra_refuses)
    } else {
        *rng.pick(&kernel_refuses)
    }
}

/// A range TLBI the SMMU does not offer, or one without a granule that asks for a range.
fn bad_range(r: &RingView, seq: u64, h: Hostile, rng: &mut Rng) -> Command {
    let (tg, num) = if h == Hostile::RangeUnsupported {
        (1, rng.below(32) as u8)
    } else {
        (0, rng.range(1, 31) as u8)
    };
    Command::TlbiNhVa {
        vmid: r.vmid,
        asid: ident_asid(r.ring, seq),
        addr: ident_addr(r.ring, seq),
        tg,
        num,
        scale: 0,
        ttl: 0,
        leaf: true,
    }
}

/// MSIDATA of the guest CMD_SYNC at `seq` of `ring`: what the completion word must hold after
/// it, if it is the last CS=IRQ sync completed.
pub fn sync_msidata(ring: u64, seq: u64) -> u32 {
    ((ring << 24) | (seq & 0xff_ffff)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use vcmdq::oracle;
    use vcmdq::translate::SlotOutcome;

    /// The stream's classes are what the oracle does with its commands, for every profile.
    #[test]
    fn classes_agree_with_the_oracle() {
        let plan = Plan::new(4, 8).unwrap();
        let mix = Mix {
            hostile_ppm: 20_000,
            trap_ppm: 20_000,
            prefetch_ppm: 20_000,
            churn_log2: 10,
            prod_game_every: 0,
        };
        let s = Stream::new(&plan, 7, mix);
        let mut hostile_seen = std::collections::HashSet::new();
        for ring in 0..plan.rings.len() {
            let v = plan.viommu_of(ring);
            for seq in 0..20_000u64 {
                let e = s.entry(ring, seq);
                assert_eq!(e.class, s.class(ring, seq));
                let mut o =
                    oracle::translate_one(&v.cfg, plan.bindings(ring, s.unbound(seq)), e.cmd);
                if s.in_window(seq) && !matches!(o, SlotOutcome::Forwarded(_)) {
                    // A window entry may be forwarded with the binding as it was before.
                    let before =
                        oracle::translate_one(&v.cfg, plan.bindings(ring, !s.unbound(seq)), e.cmd);
                    if matches!(before, SlotOutcome::Forwarded(_)) && e.class == Class::Forward {
                        o = before;
                    }
                }
                let ok = match (e.class, o) {
                    (Class::Forward, SlotOutcome::Forwarded(_)) => true,
                    (Class::Drop, SlotOutcome::Dropped) => true,
                    (Class::Trap, SlotOutcome::Trapped(c)) => c == e.cmd,
                    (Class::Sync { cs, .. }, SlotOutcome::Sync { cs: c, msidata, .. }) => {
                        c == cs && msidata == sync_msidata(ring as u64, seq)
                    }
                    (Class::Hostile(h), SlotOutcome::Refused { reason, .. }) => {
                        hostile_seen.insert(h);
                        h.matches(&reason)
                    }
                    _ => false,
                };
                assert!(ok, "ring {ring} seq {seq}: {e:?} -> {o:?}");
            }
        }
        assert_eq!(hostile_seen.len(), Hostile::ALL.len(), "{hostile_seen:?}");
    }

    #[test]
    fn deterministic() {
        let plan = Plan::new(2, 4).unwrap();
        let a = Stream::new(&plan, 1, Mix::default());
        let b = Stream::new(&plan, 1, Mix::default());
        let c = Stream::new(&plan, 2, Mix::default());
        let same = (0..1000).all(|s| a.entry(3, s) == b.entry(3, s));
        let differ = (0..1000)
            .filter(|&s| a.entry(3, s) != c.entry(3, s))
            .count();
        assert!(same);
        assert!(differ > 900, "{differ}");
    }
}
