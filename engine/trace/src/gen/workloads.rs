//! What each kind of guest does, turn by turn. A role is one VM's behaviour; a workload assigns
//! roles to VMs (see `mod.rs`).

use super::guest::{Fate, Vm, VmConfig};
use super::linux;
use super::GenParams;
use crate::Profile;
use vcmdq::command::{opcode, Command, RawCommand};
use vcmdq::queue::QueueShape;

/// One VM's behaviour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    /// Strict-mode DMA unmaps, range invalidation advertised.
    DmaRange,
    /// Strict-mode DMA unmaps on an SMMU without range invalidation: one TLBI per page.
    DmaNoRange,
    /// DMA unmaps on ATS devices sharing domains: TLBI, then ATC_INV per device.
    Ats,
    /// Shared virtual addressing: processes bound and unbound (CFGI_CD, TLBI_NH_ASID, ATC_INV
    /// with PASID) and their munmaps (non-leaf TLBI_NH_VA).
    Sva,
    /// Floods its rings with large per-page unmaps.
    Flooder,
    /// Light DMA unmaps next to a flooder.
    Light,
    /// ATS traffic; one device is hot-unplugged mid-run, the guest sends a few late commands
    /// for its vSID (refused), and a new device is plugged in at the same vSID later.
    UnplugLate,
    /// ATS traffic with a clean hot-unplug (no late commands).
    UnplugClean,
    /// A well-behaved guest (DMA unmaps with ATS) among hostile ones.
    Good,
    /// Kernel profile, no range support: mostly normal traffic with attacks mixed in.
    HostileKernel,
    /// Tegra241 profile: the same, with the attacks a VCMDQ guest can try.
    HostileTegra,
    /// Tegra241 profile, normal DMA unmaps with ATS.
    TegraDma,
}

impl Role {
    /// The vIOMMU and devices of a VM in this role.
    pub fn config(self, p: &GenParams, idx: u32, shape: QueueShape) -> VmConfig {
        let tegra = matches!(self, Role::HostileTegra | Role::TegraDma);
        VmConfig {
            profile: if tegra {
                Profile::Tegra241
            } else {
                Profile::Kernel
            },
            range_inv: !matches!(self, Role::DmaNoRange | Role::Flooder | Role::HostileKernel),
            msi: idx.is_multiple_of(2),
            devices: p.devices,
            ats: matches!(
                self,
                Role::Ats
                    | Role::Sva
                    | Role::UnplugLate
                    | Role::UnplugClean
                    | Role::Good
                    | Role::HostileKernel
                    | Role::HostileTegra
                    | Role::TegraDma
            ),
            per_domain: if matches!(self, Role::Ats | Role::UnplugLate | Role::UnplugClean) {
                2
            } else {
                1
            },
            rings: p.rings,
            shape,
        }
    }

    /// Mean gap between two operations, ns.
    fn gap(self) -> u64 {
        match self {
            Role::Flooder => 1_000,
            Role::Light => 2_000,
            Role::DmaRange | Role::DmaNoRange | Role::TegraDma => 3_000,
            Role::Ats | Role::UnplugLate | Role::UnplugClean | Role::Good => 4_000,
            Role::HostileKernel | Role::HostileTegra => 4_000,
            Role::Sva => 5_000,
        }
    }

    /// Share of the workload's commands, relative to other roles: a flooder among `vms` VMs
    /// takes three quarters of them.
    pub fn weight(self, vms: u32) -> u64 {
        match self {
            Role::Flooder => 3 * u64::from(vms.max(2) - 1),
            _ => 1,
        }
    }

    /// Runs the VM until it has written `budget` ring entries or its clock passes `deadline`.
    pub fn run(self, vm: &mut Vm, budget: u64, deadline: u64) {
        let mut state = State::default();
        while vm.entries < budget && vm.now < deadline {
            let before = vm.stream.events.len();
            match self {
                Role::DmaRange
                | Role::DmaNoRange
                | Role::Ats
                | Role::Light
                | Role::Good
                | Role::TegraDma => {
                    if let Some(d) = vm.any_bound() {
                        vm.dma_unmap(d, None);
                    }
                }
                Role::Flooder => {
                    if let Some(d) = vm.any_bound() {
                        let pages = 16 << vm.rng.below(5);
                        vm.dma_unmap(d, Some((pages * 4096, 4096)));
                    }
                }
                Role::Sva => sva_turn(vm, &mut state),
                Role::UnplugLate | Role::UnplugClean => {
                    unplug_turn(vm, &mut state, budget, self == Role::UnplugLate)
                }
                Role::HostileKernel | Role::HostileTegra => hostile_turn(vm, &mut state),
            }
            if vm.stream.events.len() == before {
                // Nothing happened: no device is left to work on (all unplugged). The guest
                // still flushes its TLB now and then, and the run moves towards its budget.
                let ring = vm.any_ring();
                vm.submit_ok(ring, &[linux::tlbi_asid(0, 1)]);
            }
            let g = vm.rng.gap(self.gap());
            vm.now += g;
        }
    }
}

/// What a role remembers between turns.
#[derive(Default)]
struct State {
    /// SVA: bound processes, (PASID, ASID).
    processes: Vec<(u32, u16)>,
    next_pasid: u32,
    /// Hot unplug: 0 before, 1 unplugged, 2 plugged back.
    phase: u8,
    /// Hostile: attacks made, to use each kind and one ack-before-fix.
    attacks: u64,
}

fn sva_turn(vm: &mut Vm, st: &mut State) {
    let ring = vm.any_ring();
    let devs = vm.bound();
    let p = vm.rng.below(100);
    if st.processes.is_empty() || (p < 12 && st.processes.len() < 32) {
        // A process binds: its CD is written for every device, then invalidated.
        st.next_pasid += 1;
        let pasid = st.next_pasid;
        let asid = 0x100 + (pasid as u16 & 0xfff);
        st.processes.push((pasid, asid));
        let cds: Vec<RawCommand> = devs
            .iter()
            .map(|&d| linux::cfgi_cd(vm.devs[d].vsid, pasid))
            .collect();
        vm.submit_ok(ring, &cds);
    } else if p < 22 {
        // A process exits: CD cleared, its ASID invalidated, ATCs of its PASID flushed.
        let i = vm.rng.below(st.processes.len() as u64) as usize;
        let (pasid, asid) = st.processes.swap_remove(i);
        let cds: Vec<RawCommand> = devs
            .iter()
            .map(|&d| linux::cfgi_cd(vm.devs[d].vsid, pasid))
            .collect();
        vm.submit_ok(ring, &cds);
        vm.submit_ok(ring, &[linux::tlbi_asid(0, asid)]);
        let atc: Vec<RawCommand> = devs
            .iter()
            .map(|&d| linux::atc_inv(vm.devs[d].vsid, Some(pasid), 0, 0))
            .collect();
        vm.submit_ok(ring, &atc);
    } else if p < 24 {
        let cds: Vec<RawCommand> = devs
            .iter()
            .map(|&d| {
                Command::CfgiCdAll {
                    ssec: false,
                    sid: vm.devs[d].vsid,
                }
                .encode()
            })
            .collect();
        vm.submit_ok(ring, &cds);
    } else {
        // munmap in a bound process: non-leaf TLB invalidation, then ATC_INV with its PASID.
        let (pasid, asid) = *vm.rng.pick(&st.processes);
        let (size, _) = vm.unmap_size();
        let va = vm.iova(size);
        let mut cmds = linux::tlbi_va(0, asid, va, size, 4096, false, vm.cfg.range_inv);
        vm.submit_ok(ring, &cmds);
        cmds.clear();
        cmds.extend(
            devs.iter()
                .map(|&d| linux::atc_inv(vm.devs[d].vsid, Some(pasid), va, size)),
        );
        vm.submit_ok(ring, &cmds);
    }
}

fn unplug_turn(vm: &mut Vm, st: &mut State, budget: u64, late: bool) {
    let at = |pct: u64| budget / 100 * pct;
    match st.phase {
        0 if vm.entries >= at(if late { 40 } else { 50 }) => {
            // The guest's driver has stopped using device 0 and its last batch completed; the
            // VMM then unbinds it.
            st.phase = 1;
            vm.unplug(0);
            if late {
                late_commands(vm);
            }
        }
        1 if late && vm.entries >= at(70) => {
            // A new device is plugged in at the old vSID, in the old domain.
            st.phase = 2;
            let (vsid, asid) = (vm.devs[0].vsid, vm.devs[0].asid);
            vm.plug(vsid, asid, true);
        }
        _ => {
            if let Some(d) = vm.any_bound() {
                vm.dma_unmap(d, None);
            }
        }
    }
}

/// Commands for device 0's vSID after it was unbound: each must be refused as an unknown vSID.
fn late_commands(vm: &mut Vm) {
    let ring = vm.any_ring();
    let gone = vm.devs[0].vsid;
    let asid = vm.devs[0].asid;
    let items = vm.fates(&[linux::atc_inv(gone, None, 0, 0)]);
    vm.submit(ring, &items, 0);
    let items = vm.fates(&[linux::cfgi_cd(gone, 0)]);
    vm.submit(ring, &items, 0);
    // A batch mixing live and late commands: only the late one stops the ring.
    let mut cmds = linux::tlbi_va(0, asid, 0x1_0000_0000, 8192, 4096, true, vm.cfg.range_inv);
    cmds.push(linux::atc_inv(gone, None, 0x1_0000_0000, 8192));
    if let Some(&d) = vm.bound().first() {
        cmds.push(linux::atc_inv(vm.devs[d].vsid, None, 0x1_0000_0000, 8192));
    }
    // The TLB invalidation of the dead domain's ASID carries no SID: it is forwarded.
    cmds.push(linux::tlbi_asid(0, asid));
    let items = vm.fates(&cmds);
    vm.submit(ring, &items, 0);
}

/// One turn of a hostile guest: a normal unmap most of the time, an attack otherwise.
fn hostile_turn(vm: &mut Vm, st: &mut State) {
    let Some(d) = vm.any_bound() else { return };
    if !vm.rng.percent(30) {
        vm.dma_unmap(d, None);
        return;
    }
    let ring = vm.any_ring();
    let kernel = vm.cfg.profile == Profile::Kernel;
    let vsid = vm.devs[d].vsid;
    let asid = vm.devs[d].asid;
    let attack = attack(vm, kernel, vsid, asid, st.attacks);
    st.attacks += 1;
    // The attack hides among ordinary invalidations.
    let mut cmds = linux::tlbi_va(
        0,
        asid,
        vm.iova(4096 * 4),
        4096 * 4,
        4096,
        true,
        vm.cfg.range_inv,
    );
    let at = vm.rng.below(cmds.len() as u64 + 1) as usize;
    cmds.insert(at, attack);
    let mut items = vm.fates(&cmds);
    if st.attacks == 3 {
        // Once: acknowledge before fixing, so the ring stops twice at the same slot.
        if let Some(it) = items.iter_mut().find(|it| it.1 == Fate::Refused) {
            it.1 = Fate::RefusedAckFirst;
        }
    }
    // Now and then PROD is written with junk above the wrap bit, which must be ignored.
    let junk = if vm.rng.percent(10) { 0x8000_0000 } else { 0 };
    vm.submit(ring, &items, junk);
}

/// The `n`-th attack of a hostile guest: cycles through every kind its profile allows, then
/// picks at random. Kinds 0..=10 apply to both profiles, 11 differs, 12..=14 are kernel-only.
fn attack(vm: &mut Vm, kernel: bool, vsid: u32, asid: u16, n: u64) -> RawCommand {
    let other_vmid = vm.vmid.wrapping_add(1).max(1);
    let kinds: u64 = if kernel { 15 } else { 12 };
    let k = if n < kinds { n } else { vm.rng.below(kinds) };
    let page = vm.iova(4096);
    let tlbi = linux::tlbi_va(0, asid, page, 4096, 4096, true, vm.cfg.range_inv)[0];
    let t = Target {
        vsid,
        asid,
        page,
        tlbi,
        other_vmid,
    };
    match k {
        3 | 4 | 5 | 7 | 8 | 10 => absorbed_attack(vm, k, &t),
        _ => refused_attack(vm, kernel, k, &t),
    }
}

/// What an attack aims at: the device's vSID and ASID, a page, a good TLBI of that page and
/// another VM's VMID.
struct Target {
    vsid: u32,
    asid: u16,
    page: u64,
    tlbi: RawCommand,
    other_vmid: u16,
}

/// Attacks the engine absorbs without stopping the ring: a VMID it overwrites, a command it
/// traps, drops or completes itself.
fn absorbed_attack(vm: &mut Vm, k: u64, t: &Target) -> RawCommand {
    let Target {
        vsid,
        asid,
        page,
        tlbi,
        other_vmid,
    } = *t;
    match k {
        // VMID spoofing: another VM's VMID, which the engine overwrites.
        3 => linux::tlbi_asid(other_vmid, asid),
        // CFGI_STE: trapped to the control plane.
        4 => Command::CfgiSte {
            ssec: false,
            sid: vsid,
            leaf: true,
        }
        .encode(),
        // PREFETCH: dropped, even for a vSID that does not exist.
        5 => {
            let ghost = vm.unknown_vsid();
            Command::PrefetchAddr {
                ssv: false,
                ssid: 0,
                sid: ghost,
                size: 3,
                addr: page,
            }
            .encode()
        }
        // A guest CMD_SYNC whose MSI targets host memory: completed by the engine, never
        // forwarded.
        7 => Command::CmdSync {
            cs: 1,
            msh: 3,
            msiattr: 0xf,
            msidata: 0xdead,
            msiaddr: 0xfee0_0000,
        }
        .encode(),
        // VMID spoofing in an address invalidation.
        8 => {
            let mut c = tlbi;
            c.set_d0((c.d0() & !(0xffff << 32)) | u64::from(other_vmid) << 32);
            c
        }
        // CFGI_STE_RANGE: trapped.
        10 => Command::CfgiSteRange {
            ssec: false,
            sid: vsid,
            range: 1,
        }
        .encode(),
        _ => unreachable!("attack {k} is refused"),
    }
}

/// Attacks the engine refuses: the ring stops at them.
fn refused_attack(vm: &mut Vm, kernel: bool, k: u64, t: &Target) -> RawCommand {
    let Target {
        vsid,
        asid,
        page,
        tlbi,
        other_vmid,
    } = *t;
    match k {
        // Illegal opcodes.
        0 => {
            let op = *vm.rng.pick(&[0x00u64, 0x07, 0x0f, 0x19, 0x47, 0x80, 0xff]);
            RawCommand::new(op | (vm.rng.next_u64() << 8), vm.rng.next_u64())
        }
        // ATC_INV of a vSID this VM does not have.
        1 => {
            let ghost = vm.unknown_vsid();
            linux::atc_inv(ghost, None, 0, 0)
        }
        // RES0 bits in an otherwise good TLBI_NH_VA.
        2 => {
            let mut c = tlbi;
            if vm.rng.percent(50) {
                c.set_d0(c.d0() | 1 << 8);
            } else {
                c.set_d1(c.d1() | 1 << 5);
            }
            c
        }
        // Opcodes no guest may issue.
        6 => *vm.rng.pick(&[
            Command::TlbiEl2All {}.encode(),
            Command::TlbiS12Vmall { vmid: other_vmid }.encode(),
            Command::TlbiEl3All {}.encode(),
            Command::StallTerm { sid: vsid }.encode(),
        ]),
        // NUM with TG=0: malformed.
        9 => RawCommand::new(
            u64::from(opcode::TLBI_NH_VA) | 3 << 12 | u64::from(asid) << 48,
            page | 1,
        ),
        // Range fields on a vIOMMU without range invalidation (the hostile kernel VM has none).
        11 if kernel => linux::tlbi_va(0, asid, page, 4 * 4096, 4096, true, true)[0],
        // On a Tegra241 VCMDQ, CFGI_CD and TLBI_NH_ALL are not guest commands.
        11 => {
            if vm.rng.percent(50) {
                linux::cfgi_cd(vsid, 0)
            } else {
                Command::TlbiNhAll { vmid: 0 }.encode()
            }
        }
        // ATC_INV SIZE above 52.
        12 => Command::AtcInv {
            sid: vsid,
            ssv: false,
            ssid: 0,
            global: false,
            addr: 0,
            size: 60,
        }
        .encode(),
        // A Secure CFGI_CD.
        13 => Command::CfgiCd {
            ssec: true,
            ssid: 0,
            sid: vsid,
            leaf: true,
        }
        .encode(),
        // CFGI_CD of a vSID this VM does not have.
        _ => {
            let ghost = vm.unknown_vsid();
            linux::cfgi_cd(ghost, 0)
        }
    }
}
