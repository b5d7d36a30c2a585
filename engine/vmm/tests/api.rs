//! The VMM-facing API: trapped commands pause their VCMDQ until the VMM completes them, the
//! event channel is bounded, and attach refuses what it must.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vcmdq::command::{opcode, text, RawCommand};
use vcmdq::viommu::{DeviceId, ViommuConfig};
use vcmdq_vmm::guest::LinuxVcmdq;
use vcmdq_vmm::regs::{VCMDQ_CONFIG, VCMDQ_CONS, VCMDQ_EN};
use vcmdq_vmm::{
    EnableError, PageError, VcmdqId, VcmdqRegisterPage, Vmm, VmmConfig, VmmError, VmmEvent,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

const T: Duration = Duration::from_secs(10);

fn c(s: &str) -> RawCommand {
    text::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn ram() -> Arc<GuestMemoryMmap> {
    Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap())
}

fn vmm(cfg: VmmConfig) -> Vmm {
    let (vmm, _) = Vmm::start_on_model(cfg, &Default::default()).unwrap();
    vmm.add_device(DeviceId(1), 0, 0x800).unwrap();
    vmm.create_viommu(ViommuConfig::new(1, 5, 0)).unwrap();
    vmm.set_dev_id(1, DeviceId(1), 0x10).unwrap();
    vmm
}

#[test]
fn a_trapped_cfgi_ste_pauses_its_vcmdq_until_the_vmm_completes_it() {
    let vmm = vmm(VmmConfig::default());
    let ram = ram();
    let page = VcmdqRegisterPage::heap();
    let id = VcmdqId { viommu: 1, lidx: 3 };
    vmm.attach_vcmdq(id, ram.clone(), page.clone()).unwrap();
    let mut q = LinuxVcmdq::new(page.clone(), 3, ram, 0x2000, 4);
    std::thread::scope(|s| {
        let g = s.spawn(move || {
            q.init(T).unwrap();
            q.batch(
                &[
                    c("TLBI_NH_ASID asid=1"),
                    c("CFGI_STE sid=0x10"),
                    c("TLBI_NH_ASID asid=2"),
                ],
                T,
            )
            .unwrap();
            q.disable(T).unwrap();
        });
        let deadline = Instant::now() + T;
        let trap = loop {
            vmm.poll();
            if let Some(t) = vmm.next_trap() {
                break t;
            }
            assert!(Instant::now() < deadline, "no trapped command within {T:?}");
            std::thread::sleep(Duration::from_micros(100));
        };
        assert_eq!(trap.vcmdq, id);
        assert_eq!(trap.trap.cmd, c("CFGI_STE sid=0x10"));
        assert_eq!(trap.trap.seq, 1);
        // Paused at the trap: CONS does not pass it however often the VMM polls.
        for _ in 0..50 {
            vmm.poll();
            std::thread::sleep(Duration::from_micros(100));
        }
        assert_eq!(page.read_page0(3, VCMDQ_CONS).unwrap() & 0xff, 1);
        assert!(
            !g.is_finished(),
            "the guest's CMD_SYNC completed past a pending trap"
        );
        vmm.complete_trap(&trap).unwrap();
        let deadline = Instant::now() + T;
        while !g.is_finished() {
            assert!(
                Instant::now() < deadline,
                "the guest did not finish after the trap"
            );
            vmm.poll();
            std::thread::sleep(Duration::from_micros(100));
        }
        g.join().unwrap();
    });
    let report = vmm.shutdown();
    assert_eq!((report.stats.trapped, report.stats.forwarded), (1, 2));
}

#[test]
fn a_guest_toggling_config_en_with_a_bad_base_fills_a_bounded_event_channel() {
    let vmm = vmm(VmmConfig {
        max_events: 4,
        ..Default::default()
    });
    let page = VcmdqRegisterPage::heap();
    let id = VcmdqId { viommu: 1, lidx: 0 };
    vmm.attach_vcmdq(id, ram(), page.clone()).unwrap();
    page.set_base(0, 0x1234_5000 | 3).unwrap();
    for _ in 0..20 {
        page.write_page0(0, VCMDQ_CONFIG, VCMDQ_EN).unwrap();
        vmm.poll();
        page.write_page0(0, VCMDQ_CONFIG, 0).unwrap();
        vmm.poll();
    }
    let events: Vec<VmmEvent> = std::iter::from_fn(|| vmm.next_event()).collect();
    assert_eq!(events.len(), 4, "{events:?}");
    assert_eq!(vmm.events_dropped(), 16);
    assert!(events.iter().all(|e| matches!(
        e,
        VmmEvent::EnableRefused {
            reason: EnableError::OutsideRam { .. },
            ..
        }
    )));
}

#[test]
fn attach_refuses_an_unknown_viommu_a_second_attach_and_a_logical_index_past_the_error_map() {
    let vmm = vmm(VmmConfig::default());
    let page = VcmdqRegisterPage::heap();
    let err = vmm
        .attach_vcmdq(VcmdqId { viommu: 9, lidx: 0 }, ram(), page.clone())
        .unwrap_err();
    assert!(matches!(err, VmmError::UnknownViommu(9)), "{err}");
    let id = VcmdqId { viommu: 1, lidx: 0 };
    vmm.attach_vcmdq(id, ram(), page.clone()).unwrap();
    assert!(matches!(
        vmm.attach_vcmdq(id, ram(), page.clone()),
        Err(VmmError::VcmdqExists(_))
    ));
    let err = vmm
        .attach_vcmdq(
            VcmdqId {
                viommu: 1,
                lidx: 128,
            },
            ram(),
            page,
        )
        .unwrap_err();
    assert!(
        matches!(err, VmmError::Page(PageError::BadLvcmdq { lidx: 128 })),
        "{err}"
    );
    assert!(err.to_string().contains("MAX_LVCMDQS"), "{err}");
    vmm.detach_vcmdq(id).unwrap();
    assert!(matches!(
        vmm.detach_vcmdq(id),
        Err(VmmError::UnknownVcmdq(_))
    ));
    // The physical CMD_SYNC opcode is what the guest driver's CMD_SYNC carries.
    assert_eq!(vcmdq_vmm::guest::VCMDQ_SYNC.opcode(), opcode::CMD_SYNC);
}
