//! Isolation at configuration time: a VMID tags one stage 2 on one physical SMMU, so two
//! vIOMMUs of one SMMU may have the same VMID only when the operator says they share a stage 2;
//! and a vIOMMU's vSID table is bounded, whatever vSIDs its VMM binds.
#![cfg(not(loom))]

mod common;

use common::{start_engine, KeptCapture, Model};
use vcmdq::engine::{Engine, EngineConfig, EngineError};
use vcmdq::viommu::{DeviceId, ViommuConfig, ViommuError};

fn engine() -> Engine {
    start_engine(EngineConfig::default(), &Model::default()).0
}

fn sharing(id: u32, vmid: u16, smmu: u32, with: u32) -> ViommuConfig {
    ViommuConfig {
        shares_vmid_with: Some(with),
        ..ViommuConfig::new(id, vmid, smmu)
    }
}

#[test]
fn two_viommus_with_one_vmid_on_one_smmu_are_refused_naming_both() {
    let e = engine();
    e.create_viommu(ViommuConfig::new(1, 5, 0)).unwrap();
    let err = e.create_viommu(ViommuConfig::new(2, 5, 0)).unwrap_err();
    match &err {
        EngineError::Viommu(v) => assert_eq!(v.errno(), "EEXIST", "{v}"),
        other => panic!("not a vIOMMU error: {other}"),
    }
    let msg = err.to_string();
    for part in [
        "EEXIST",
        "VMID 5",
        "SMMU 0",
        "vIOMMU 1",
        "vIOMMU 2",
        "shares-vmid-with=1",
    ] {
        assert!(msg.contains(part), "{part:?} missing from: {msg}");
    }
    assert!(e.viommu(2).is_none(), "the refused vIOMMU exists");
}

#[test]
fn a_vmid_may_be_used_again_on_another_smmu() {
    let e = engine();
    e.create_viommu(ViommuConfig::new(1, 5, 0)).unwrap();
    e.create_viommu(ViommuConfig::new(2, 5, 1)).unwrap();
    e.create_viommu(ViommuConfig::new(3, 6, 0)).unwrap();
}

#[test]
fn a_declared_shared_stage_2_is_accepted_and_visible() {
    let e = engine();
    e.create_viommu(ViommuConfig::new(1, 5, 0)).unwrap();
    let b = e.create_viommu(sharing(2, 5, 0, 1)).unwrap();
    assert_eq!(b.config().shares_vmid_with, Some(1));
    // A third may join through either.
    e.create_viommu(sharing(3, 5, 0, 2)).unwrap();
    // Not without saying so.
    assert!(e.create_viommu(ViommuConfig::new(4, 5, 0)).is_err());
}

#[test]
fn sharing_with_a_missing_or_different_viommu_is_refused() {
    let e = engine();
    e.create_viommu(ViommuConfig::new(1, 5, 0)).unwrap();
    e.create_viommu(ViommuConfig::new(2, 6, 1)).unwrap();
    let errno = |r: Result<_, EngineError>| match r {
        Err(EngineError::Viommu(v)) => v.errno(),
        Err(other) => panic!("not a vIOMMU error: {other}"),
        Ok(_) => "accepted",
    };
    assert_eq!(errno(e.create_viommu(sharing(3, 5, 0, 9))), "ENOENT");
    // vIOMMU 2 is on SMMU 1 with VMID 6.
    assert_eq!(errno(e.create_viommu(sharing(3, 5, 0, 2))), "EINVAL");
    assert_eq!(errno(e.create_viommu(sharing(3, 6, 0, 2))), "EINVAL");
}

#[test]
fn removing_a_viommu_frees_its_vmid() {
    let e = engine();
    e.create_viommu(ViommuConfig::new(1, 5, 0)).unwrap();
    e.create_viommu(sharing(2, 5, 0, 1)).unwrap();
    e.remove_viommu(1).unwrap();
    // vIOMMU 2 still holds VMID 5.
    assert!(e.create_viommu(ViommuConfig::new(3, 5, 0)).is_err());
    e.remove_viommu(2).unwrap();
    e.create_viommu(ViommuConfig::new(3, 5, 0)).unwrap();
}

#[test]
fn a_capture_refuses_a_shared_vmid_it_could_not_record() {
    let (e, _) = start_engine(
        EngineConfig {
            capture: Some(KeptCapture::default().to()),
            ..Default::default()
        },
        &Model::default(),
    );
    e.create_viommu(ViommuConfig::new(1, 5, 0)).unwrap();
    let err = e.create_viommu(sharing(2, 5, 0, 1)).unwrap_err();
    assert!(
        matches!(err, EngineError::CaptureSharedVmid { .. }),
        "{err}"
    );
    drop(e);
}

#[test]
fn an_engine_bounds_the_vsids_a_vmm_binds() {
    let e = engine();
    e.create_viommu(ViommuConfig {
        max_vsids: 2,
        ..ViommuConfig::new(1, 5, 0)
    })
    .unwrap();
    for i in 0..3 {
        e.add_device(DeviceId(i), 0, 0x800 + i).unwrap();
    }
    e.set_dev_id(1, DeviceId(0), 0).unwrap();
    e.set_dev_id(1, DeviceId(1), 0x8000_0000).unwrap();
    let err = e.set_dev_id(1, DeviceId(2), 0xffff_ffff).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::Viommu(ViommuError::VsidsFull { viommu: 1, max: 2 })
        ),
        "{err}"
    );
}
