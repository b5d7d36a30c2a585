//! A guest's invalidation traffic, as the benchmarks and `vcmdq loadtest` send it: 50%
//! TLBI_NH_VA, 25% ATC_INV, 15% TLBI_NH_ASID, 10% CFGI_CD, every one forwarded by a kernel
//! vIOMMU that binds the vSIDs it names. No CMD_SYNC: callers end batches as they need.

use super::Rng;
use crate::command::{opcode, RawCommand};

/// One command of the mix, its SID drawn from `vsids` (non-empty).
pub fn guest_command(vsids: &[u32], rng: &mut Rng) -> RawCommand {
    let sid = u64::from(*rng.pick(vsids)) << 32;
    let asid = rng.below(1 << 16) << 48;
    let addr = rng.below(1 << 36) << 12;
    match rng.below(20) {
        // VMID 7 in the guest's command: the engine must overwrite it with the VM's.
        0..=9 => RawCommand::new(
            u64::from(opcode::TLBI_NH_VA) | asid | 7 << 32,
            addr | 1 << 10 | 3 << 8 | 1,
        ),
        10..=14 => RawCommand::new(u64::from(opcode::ATC_INV) | sid, addr | 2),
        15..=17 => RawCommand::new(u64::from(opcode::TLBI_NH_ASID) | asid, 0),
        _ => RawCommand::new(u64::from(opcode::CFGI_CD) | sid | 5 << 12, 1),
    }
}

/// `len` commands of the mix (see [`guest_command`]).
pub fn guest_mix(len: usize, vsids: &[u32], rng: &mut Rng) -> Vec<RawCommand> {
    (0..len).map(|_| guest_command(vsids, rng)).collect()
}
