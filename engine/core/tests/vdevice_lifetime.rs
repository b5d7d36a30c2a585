//! vdevice lifetimes as iommufd has them: a host device removed while bound takes its vdevice
//! with it and leaves a tombstone (selftest `vdevice_tombstone`), through the engine's control
//! plane.
#![cfg(not(loom))]

mod common;

use common::KeptCapture;
use vcmdq::engine::{CaptureEvent, Engine, EngineConfig, EngineError};
use vcmdq::hwmodel::{HwConfig, HwPlacement, ModelQueue, DEFAULT_LOG2SIZE};
use vcmdq::viommu::{DeviceId, ViommuConfig, ViommuError};

/// `cfg` on the default physical queue model.
fn engine(cfg: EngineConfig) -> Engine {
    let (queues, _) = ModelQueue::for_workers(
        cfg.workers,
        DEFAULT_LOG2SIZE,
        &HwConfig::default(),
        HwPlacement::Inline,
    )
    .unwrap();
    Engine::start(cfg, queues).unwrap()
}

#[test]
fn the_engine_removes_a_bound_device_as_iommufd_does() {
    let e = engine(EngineConfig::default());
    e.create_viommu(ViommuConfig::new(1, 5, 0)).unwrap();
    e.add_device(DeviceId(7), 0, 0x800).unwrap();
    e.set_dev_id(1, DeviceId(7), 0x99).unwrap();
    // Was EBUSY: the kernel destroys the vdevice instead.
    e.remove_device(DeviceId(7)).unwrap();
    assert!(e.devices().get(DeviceId(7)).is_none());
    assert_eq!(e.viommu(1).unwrap().lookup(0x99), None);
    match e.unset_dev_id(1, DeviceId(7)) {
        Err(EngineError::Viommu(v @ ViommuError::VdeviceGone { .. })) => {
            assert_eq!(v.errno(), "ENOENT")
        }
        other => panic!("destroying the tombstoned vdevice: {other:?}"),
    }
    // An unbound device goes as before; an unknown one is ENOENT.
    e.add_device(DeviceId(8), 0, 0x801).unwrap();
    e.remove_device(DeviceId(8)).unwrap();
    match e.remove_device(DeviceId(8)) {
        Err(EngineError::Viommu(v)) => assert_eq!(v.errno(), "ENOENT"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_capture_refuses_a_device_removal_it_could_not_record() {
    let kept = KeptCapture::default();
    let e = engine(EngineConfig {
        capture: Some(kept.to()),
        ..Default::default()
    });
    e.add_device(DeviceId(1), 0, 0x800).unwrap();
    let err = e.remove_device(DeviceId(1)).unwrap_err();
    assert!(matches!(err, EngineError::CaptureDeviceRemove(_)), "{err}");
    let report = e.shutdown();
    assert_eq!(
        report.capture.unwrap().unwrap(),
        1,
        "one record: the device added"
    );
    let events = kept.0.lock().unwrap();
    assert!(
        matches!(
            events[..],
            [CaptureEvent::Device {
                device: 1,
                smmu: 0,
                psid: 0x800,
                ..
            }]
        ),
        "{events:?}"
    );
}
