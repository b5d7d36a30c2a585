//! Hostile guests against VCMDQs in guest RAM behind a Tegra241 register page: slot rewrites,
//! PROD games, BASE outside RAM or misaligned, disable while commands are in flight, and an
//! error never acknowledged. Every wait is bounded and names what did not happen.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vcmdq::command::{opcode, text, RawCommand};
use vcmdq::hwmodel::HwConfig;
use vcmdq::queue::CError;
use vcmdq::viommu::{DeviceId, ViommuConfig};
use vcmdq_vmm::guest::LinuxVcmdq;
use vcmdq_vmm::regs::{
    VCMDQ_CONFIG, VCMDQ_EN, VCMDQ_GERROR, VCMDQ_GERRORN, VCMDQ_PROD, VCMDQ_STATUS,
};
use vcmdq_vmm::{EnableError, VcmdqId, VcmdqRegisterPage, Vmm, VmmConfig, VmmEvent};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// How long any single wait may take before a test calls it hung.
const T: Duration = Duration::from_secs(10);
const VMID: u16 = 5;

fn c(s: &str) -> RawCommand {
    text::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {T:?}");
        std::thread::sleep(Duration::from_micros(50));
    }
}

/// A VMM with vIOMMU 1 (VMID 5, vSID 0x10 -> pSID 0x800) and vIOMMU 2 (VMID 6, vSID 0x10 ->
/// pSID 0x900), guest RAM of two regions with a hole between them, a register page per
/// vIOMMU, and a control thread that polls, completes traps and keeps the events.
struct Harness {
    vmm: Arc<Vmm>,
    ram: Arc<GuestMemoryMmap>,
    pages: [VcmdqRegisterPage; 2],
    /// What the physical queue consumed, in order.
    consumed: Arc<Mutex<Vec<RawCommand>>>,
    events: Arc<Mutex<Vec<VmmEvent>>>,
    stop: Arc<AtomicBool>,
    control: Option<JoinHandle<()>>,
}

/// RAM: [0, 1 MiB) and [2 MiB, 3 MiB).
const RAM: [(u64, usize); 2] = [(0, 1 << 20), (2 << 20, 1 << 20)];

impl Harness {
    fn new() -> Harness {
        let consumed: Arc<Mutex<Vec<RawCommand>>> = Arc::default();
        let log = consumed.clone();
        let hw = HwConfig::default().with_check(move |cmd| {
            log.lock().unwrap().push(*cmd);
            Ok(())
        });
        let vmm = Arc::new(Vmm::start_on_model(VmmConfig::default(), &hw).unwrap().0);
        vmm.add_device(DeviceId(1), 0, 0x800).unwrap();
        vmm.add_device(DeviceId(2), 0, 0x900).unwrap();
        vmm.create_viommu(ViommuConfig::new(1, VMID, 0)).unwrap();
        vmm.create_viommu(ViommuConfig::new(2, VMID + 1, 0))
            .unwrap();
        vmm.set_dev_id(1, DeviceId(1), 0x10).unwrap();
        vmm.set_dev_id(2, DeviceId(2), 0x10).unwrap();
        let ram = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&RAM.map(|(a, l)| (GuestAddress(a), l))).unwrap(),
        );
        let events: Arc<Mutex<Vec<VmmEvent>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let control = {
            let (vmm, events, stop) = (vmm.clone(), events.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    vmm.poll();
                    while let Some(t) = vmm.next_trap() {
                        vmm.complete_trap(&t).unwrap();
                    }
                    while let Some(e) = vmm.next_event() {
                        events.lock().unwrap().push(e);
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
            })
        };
        Harness {
            vmm,
            ram,
            pages: [VcmdqRegisterPage::heap(), VcmdqRegisterPage::heap()],
            consumed,
            events,
            stop,
            control: Some(control),
        }
    }

    /// Attaches logical VCMDQ `lidx` of vIOMMU `viommu` and a Linux driver for it, its queue of
    /// 2^`log2size` slots at `base`.
    fn vcmdq(
        &self,
        viommu: u32,
        lidx: u16,
        base: u64,
        log2size: u8,
    ) -> LinuxVcmdq<GuestMemoryMmap> {
        let page = self.pages[viommu as usize - 1].clone();
        self.vmm
            .attach_vcmdq(VcmdqId { viommu, lidx }, self.ram.clone(), page.clone())
            .unwrap();
        LinuxVcmdq::new(page, lidx, self.ram.clone(), base, log2size)
    }

    fn events(&self) -> Vec<VmmEvent> {
        self.events.lock().unwrap().clone()
    }

    /// How many times the physical queue consumed `cmd`.
    fn consumed(&self, cmd: &str) -> usize {
        let cmd = c(cmd);
        self.consumed
            .lock()
            .unwrap()
            .iter()
            .filter(|&&x| x == cmd)
            .count()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.control.take() {
            let _ = h.join();
        }
    }
}

fn refusal(h: &Harness, id: VcmdqId) -> EnableError {
    let mut found = None;
    until("an EnableRefused event", || {
        found = h.events().into_iter().find_map(|e| match e {
            VmmEvent::EnableRefused { vcmdq, reason } if vcmdq == id => Some(reason),
            _ => None,
        });
        found.is_some()
    });
    found.unwrap()
}

/// The guest's init, which must time out on a refused BASE, and the refusal's reason.
fn refused_init(h: &Harness, lidx: u16, base: u64, log2size: u8) -> EnableError {
    let mut q = h.vcmdq(1, lidx, base, log2size);
    let err = q.init(Duration::from_millis(200)).unwrap_err();
    assert!(err.to_string().contains("STATUS.ENABLED"), "{err}");
    assert_eq!(
        q.reg(VCMDQ_STATUS),
        0,
        "a refused VCMDQ's STATUS.ENABLED stays clear"
    );
    refusal(h, VcmdqId { viommu: 1, lidx })
}

#[test]
fn a_base_outside_guest_ram_is_refused_at_enable_with_the_reason_and_status_stays_clear() {
    let h = Harness::new();
    // Past the end of the last region.
    let r = refused_init(&h, 0, 3 << 20, 4);
    assert!(
        matches!(r, EnableError::OutsideRam { base, first_outside, .. } if base == 3 << 20 && first_outside == 3 << 20),
        "{r:?}"
    );
    // Starting in RAM, running into the hole between the two regions: 2^17 slots (2 MiB) at 0.
    let r = refused_init(&h, 1, 0, 17);
    assert!(
        matches!(r, EnableError::OutsideRam { first_outside, len, .. } if first_outside == 1 << 20 && len == 2 << 20),
        "{r:?}"
    );
    assert!(r.to_string().contains("not all in guest RAM"), "{r}");
    // The same queue inside RAM is taken.
    let mut ok = h.vcmdq(1, 2, 0x8000, 5);
    ok.init(T).unwrap();
    ok.batch(&[c("ATC_INV sid=0x10")], T).unwrap();
    assert_eq!(h.consumed("ATC_INV sid=0x800"), 1);
}

#[test]
fn a_misaligned_base_or_an_oversized_log2size_is_refused_at_enable_with_the_reason() {
    let h = Harness::new();
    // 2^4 slots are 256 bytes: BASE must be 256-aligned; 0x1020 is only 32-aligned.
    let r = refused_init(&h, 0, 0x1020, 4);
    assert_eq!(
        r,
        EnableError::Misaligned {
            base: 0x1020,
            log2size: 4,
            align: 256
        }
    );
    assert!(r.to_string().contains("not aligned to 0x100"), "{r}");
    // LOG2SIZE is five bits: 20 to 31 can be written, 19 is the largest a VCMDQ takes.
    let id = VcmdqId { viommu: 1, lidx: 1 };
    h.vmm
        .attach_vcmdq(id, h.ram.clone(), h.pages[0].clone())
        .unwrap();
    h.pages[0].set_base(1, 0x10_0000 | 25).unwrap();
    h.pages[0].write_page0(1, VCMDQ_CONFIG, VCMDQ_EN).unwrap();
    assert_eq!(
        refusal(&h, id),
        EnableError::Log2SizeTooLarge { log2size: 25 }
    );
    assert_eq!(h.pages[0].read_page0(1, VCMDQ_STATUS).unwrap(), 0);
    // Clearing CONFIG.EN and enabling again with a good BASE works.
    let mut q = h.vcmdq(1, 2, 0x1000, 4);
    q.init(T).unwrap();
    q.batch(&[c("TLBI_NH_ASID asid=3")], T).unwrap();
    assert_eq!(h.consumed("TLBI_NH_ASID vmid=5 asid=3"), 1);
}

#[test]
fn slots_rewritten_after_the_engine_consumed_them_are_never_read_again() {
    let h = Harness::new();
    let mut q = h.vcmdq(1, 0, 0x4000, 3);
    q.init(T).unwrap();
    for round in 0..20u32 {
        let cmds: Vec<RawCommand> = (0..4)
            .map(|i| c(&format!("TLBI_NH_ASID asid={}", round * 4 + i)))
            .collect();
        let before = q.prod();
        q.batch(&cmds, T).unwrap();
        // Every consumed slot now holds a command the engine would refuse.
        for k in 0..5 {
            q.write_slot(before.wrapping_add(k), c("ATC_INV sid=0x99"))
                .unwrap();
        }
    }
    assert!(q.handled().is_empty(), "a consumed slot was read again");
    for i in 0..80 {
        assert_eq!(
            h.consumed(&format!("TLBI_NH_ASID vmid=5 asid={i}")),
            1,
            "asid {i}"
        );
    }
}

#[test]
fn prod_beyond_the_ring_or_behind_cons_copies_nothing_and_the_queue_recovers() {
    let h = Harness::new();
    let mut q = h.vcmdq(1, 0, 0x4000, 3);
    q.init(T).unwrap();
    q.batch(&[c("TLBI_NH_ASID asid=1"), c("TLBI_NH_ASID asid=2")], T)
        .unwrap();
    // Every slot holds a command the engine refuses: whatever it copied now would stop the
    // queue with CONS.ERR.
    for k in 0..8 {
        q.write_slot(k, c("ATC_INV sid=0x99")).unwrap();
    }
    let (cons, _) = q.cons();
    let shape = q.shape();
    for hostile in [
        shape.advance(cons, 8 + 3),        // beyond a full ring
        shape.advance(cons, 16 - 2),       // two behind CONS
        shape.advance(cons, 8 + 1) | 0x40, // beyond, with junk above the wrap bit
    ] {
        q.set_reg(VCMDQ_PROD, hostile);
        // A window for the engine to poll the hostile value many times.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            q.cons(),
            (cons, 0),
            "PROD {hostile:#x}: something was consumed"
        );
        assert!(
            !q.error_pending(),
            "PROD {hostile:#x}: a poisoned slot was read"
        );
    }
    // The driver's PROD again: nothing pending, and the queue works on.
    q.set_reg(VCMDQ_PROD, q.prod());
    q.batch(&[c("TLBI_NH_ASID asid=3")], T).unwrap();
    assert!(q.handled().is_empty());
    q.disable(T).unwrap();
    for asid in 1..=3 {
        assert_eq!(h.consumed(&format!("TLBI_NH_ASID vmid=5 asid={asid}")), 1);
    }
    assert_eq!(h.consumed("ATC_INV sid=0x99"), 0);
    let stats = h
        .vmm
        .last_ring_stats(VcmdqId { viommu: 1, lidx: 0 })
        .unwrap();
    assert!(stats.prod_overrun > 0, "{stats:?}");
    assert_eq!(stats.stops, 0);
}

#[test]
fn disabling_a_vcmdq_while_commands_are_in_flight_loses_and_doubles_nothing() {
    let h = Harness::new();
    let mut q = h.vcmdq(1, 0, 0x10000, 8);
    q.init(T).unwrap();
    let shape = q.shape();
    let mut next = 0u32;
    let mut prod = 0u32;
    for round in 0..6 {
        // 200 commands published at once, then CONFIG.EN cleared at once: the engine is
        // somewhere in the middle of them.
        for _ in 0..200 {
            q.write_slot(prod, c(&format!("TLBI_NH_ASID asid={next}")))
                .unwrap();
            next += 1;
            prod = shape.advance(prod, 1);
        }
        q.set_reg(VCMDQ_PROD, prod);
        q.disable(T).unwrap();
        let (_, err) = q.cons();
        assert_eq!(err, 0, "round {round}");
        // Enabled again with CONS and PROD as they are: the engine takes over at CONS.
        q.set_reg(VCMDQ_CONFIG, VCMDQ_EN);
        until("STATUS.ENABLED after re-enable", || {
            q.reg(VCMDQ_STATUS) & VCMDQ_EN != 0
        });
        until("CONS to reach PROD after re-enable", || {
            q.cons() == (prod, 0)
        });
    }
    q.disable(T).unwrap();
    for asid in 0..next {
        assert_eq!(
            h.consumed(&format!("TLBI_NH_ASID vmid=5 asid={asid}")),
            1,
            "asid {asid}: lost or doubled across a disable"
        );
    }
}

#[test]
fn a_command_error_sets_cons_err_gerror_and_the_error_map_and_the_acknowledgement_clears_them() {
    let h = Harness::new();
    let mut q = h.vcmdq(1, 5, 0x4000, 3);
    q.init(T).unwrap();
    q.write_slot(0, c("TLBI_NH_ASID asid=1")).unwrap();
    q.write_slot(1, c("ATC_INV sid=0x99")).unwrap();
    q.write_slot(2, c("TLBI_NH_ASID asid=2")).unwrap();
    q.set_reg(VCMDQ_PROD, 3);
    until("GERROR to differ from GERRORN", || q.error_pending());
    assert_eq!(
        q.cons(),
        (1, CError::Ill.code()),
        "CONS at the bad slot with CONS.ERR"
    );
    assert_eq!(
        h.pages[0].err_map(),
        [1 << 5, 0],
        "LVCMDQ_ERR_MAP bit 5 only"
    );
    until("the error event", || {
        h.events().iter().any(|e| {
            matches!(e, VmmEvent::CommandError { vcmdq, cerror: CError::Ill, cons, err_map }
                if vcmdq.lidx == 5 && *cons & 0xf == 1 && err_map[0] == 1 << 5)
        })
    });
    // Linux: the failing command becomes a CMD_SYNC, GERRORN = GERROR.
    q.write_slot(1, vcmdq_vmm::guest::VCMDQ_SYNC).unwrap();
    let gerror = q.reg(VCMDQ_GERROR);
    q.set_reg(VCMDQ_GERRORN, gerror);
    until("CONS past the fixed slot", || q.cons() == (3, 0));
    assert_eq!(
        h.pages[0].err_map(),
        [0, 0],
        "the acknowledgement clears the map bit"
    );
    assert_eq!(h.consumed("TLBI_NH_ASID vmid=5 asid=2"), 1);
}

#[test]
fn a_guest_that_never_acknowledges_an_error_stays_stopped_and_another_guests_queue_is_unaffected() {
    let h = Harness::new();
    let mut bad = h.vcmdq(1, 0, 0x4000, 3);
    let mut good = h.vcmdq(2, 0, 0x8000, 3);
    bad.init(T).unwrap();
    good.init(T).unwrap();
    bad.write_slot(0, c("ATC_INV sid=0x99")).unwrap();
    bad.set_reg(VCMDQ_PROD, 1);
    until("the error on the bad guest's VCMDQ", || bad.error_pending());
    let mut prod = 1u32;
    for round in 0..30u32 {
        // The bad guest writes on without acknowledging: nothing of it is consumed.
        if round % 5 == 0 && prod < 7 {
            bad.write_slot(prod, c(&format!("TLBI_NH_ASID asid={round}")))
                .unwrap();
            prod += 1;
            bad.set_reg(VCMDQ_PROD, prod);
        }
        good.batch(&[c(&format!("TLBI_NH_ASID asid={round}"))], T)
            .unwrap();
    }
    assert_eq!(
        bad.cons(),
        (0, CError::Ill.code()),
        "the bad queue stays stopped"
    );
    assert!(bad.error_pending());
    assert_eq!(h.pages[0].err_map(), [1, 0]);
    assert_eq!(h.pages[1].err_map(), [0, 0], "the other VINTF has no error");
    for round in 0..30 {
        assert_eq!(h.consumed(&format!("TLBI_NH_ASID vmid=6 asid={round}")), 1);
        assert_eq!(h.consumed(&format!("TLBI_NH_ASID vmid=5 asid={round}")), 0);
    }
    // Disabling a stopped queue still works, and Linux's re-init acknowledges the error.
    bad.init(T).unwrap();
    assert!(!bad.error_pending());
    bad.batch(&[c("TLBI_NH_ASID asid=99")], T).unwrap();
    assert_eq!(h.consumed("TLBI_NH_ASID vmid=5 asid=99"), 1);
    let errors: Vec<_> = h
        .events()
        .into_iter()
        .filter(|e| matches!(e, VmmEvent::CommandError { .. }))
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
}

#[test]
fn a_queue_across_two_contiguous_regions_is_served() {
    let consumed: Arc<Mutex<Vec<RawCommand>>> = Arc::default();
    let log = consumed.clone();
    let hw = HwConfig::default().with_check(move |cmd| {
        log.lock().unwrap().push(*cmd);
        Ok(())
    });
    let (vmm, _) = Vmm::start_on_model(VmmConfig::default(), &hw).unwrap();
    vmm.create_viommu(ViommuConfig::new(1, VMID, 0)).unwrap();
    // Two regions, back to back at 64 KiB: a 2^13-slot (128 KiB) queue at 0 spans both.
    let ram = Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 64 << 10),
            (GuestAddress(64 << 10), 64 << 10),
        ])
        .unwrap(),
    );
    let page = VcmdqRegisterPage::heap();
    let id = VcmdqId { viommu: 1, lidx: 0 };
    vmm.attach_vcmdq(id, ram.clone(), page.clone()).unwrap();
    let mut q = LinuxVcmdq::new(page, 0, ram, 0, 13);
    std::thread::scope(|s| {
        let g = s.spawn(move || {
            q.init(T).unwrap();
            // Fill to just before the boundary, then a batch across it.
            let filler: Vec<RawCommand> = (0..200).map(|_| c("TLBI_NH_ALL")).collect();
            for _ in 0..20 {
                q.batch(&filler, T).unwrap();
            }
            let across: Vec<RawCommand> = (0..300)
                .map(|i| c(&format!("TLBI_NH_ASID asid={i}")))
                .collect();
            q.batch(&across, T).unwrap();
            q.disable(T).unwrap();
        });
        let deadline = Instant::now() + 3 * T;
        while !g.is_finished() {
            assert!(Instant::now() < deadline, "the guest did not finish");
            vmm.poll();
            std::thread::sleep(Duration::from_micros(50));
        }
        g.join().unwrap();
    });
    assert!(vmm.next_event().is_none());
    let consumed = consumed.lock().unwrap();
    let mut by: HashMap<RawCommand, usize> = HashMap::new();
    for x in consumed.iter().filter(|x| x.opcode() != opcode::CMD_SYNC) {
        *by.entry(*x).or_default() += 1;
    }
    for i in 0..300 {
        assert_eq!(
            by.get(&c(&format!("TLBI_NH_ASID vmid=5 asid={i}"))),
            Some(&1)
        );
    }
}

#[test]
fn a_base_written_while_enabled_takes_effect_at_the_next_enable() {
    let h = Harness::new();
    let mut q = h.vcmdq(1, 0, 0x4000, 3);
    q.init(T).unwrap();
    // A new BASE (outside RAM, even) while enabled: the engine keeps the queue it checked.
    h.pages[0].set_base(0, (5 << 20) | 3).unwrap();
    q.batch(&[c("TLBI_NH_ASID asid=7")], T).unwrap();
    assert_eq!(h.consumed("TLBI_NH_ASID vmid=5 asid=7"), 1);
    // At the next enable it is checked, and refused.
    q.disable(T).unwrap();
    h.pages[0].write_page0(0, VCMDQ_CONFIG, VCMDQ_EN).unwrap();
    let r = refusal(&h, VcmdqId { viommu: 1, lidx: 0 });
    assert!(
        matches!(r, EnableError::OutsideRam { base, .. } if base == 5 << 20),
        "{r:?}"
    );
}
