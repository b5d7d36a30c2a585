//! Isolation at configuration time through `vcmdq serve`: two vIOMMUs of one SMMU may have the
//! same VMID only when the operator says they share a stage 2.
#![cfg(not(loom))]

mod common;

use common::vcmdq;

const SERVE_BASE: &[&str] = &[
    "serve",
    "--device",
    "id=1,smmu=0,psid=0x800",
    "--bind",
    "viommu=1,device=1,vsid=0x10",
    "--create-ring",
    "viommu=1,log2size=2",
];

#[test]
fn serve_refuses_a_vmid_two_viommus_would_share_unsaid() {
    let mut args = SERVE_BASE.to_vec();
    args.extend([
        "--viommu",
        "id=1,vmid=5,smmu=0",
        "--viommu",
        "id=2,vmid=5,smmu=0",
    ]);
    let out = vcmdq(&args, "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve accepted: {err}");
    assert!(
        err.contains("--viommu id=2") && err.contains("EEXIST") && err.contains("vIOMMU 1"),
        "{err}"
    );
}

#[test]
fn serve_says_when_two_viommus_share_a_stage_2() {
    let mut args = SERVE_BASE.to_vec();
    args.extend([
        "--viommu",
        "id=1,vmid=5,smmu=0",
        "--viommu",
        "id=2,vmid=5,smmu=0,shares-vmid-with=1,max-vsids=4,max-table-bytes=0x100_0000",
    ]);
    let out = vcmdq(&args, "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "serve failed: {err}");
    assert!(
        err.contains("vIOMMU 2 shares VMID 5 on SMMU 0 with vIOMMU 1"),
        "{err}"
    );
}
