//! A hostile guest against a Tegra241 VCMDQ register page and its queue in guest RAM, with the
//! engine side driven step by step on one thread.
//!
//! The guest writes any 32-bit word of the VINTF's register page (page 0, page 1 with BASE,
//! the VINTF's registers with LVCMDQ_ERR_MAP) and any slot of guest RAM; the engine side
//! enables the queue from BASE as the VMM does (checked against guest RAM), polls, completes
//! and stops it. Guest RAM is two 64 KiB regions with a 64 KiB hole between them. Checked after
//! every operation:
//! - an enable is taken exactly when BASE's LOG2SIZE is at most 19, its address is aligned to
//!   the queue's size (and 32 bytes) and the whole queue lies inside one region (a model of
//!   the rule, computed apart from the code under test);
//! - a poll returns no more entries than the queue has, each equal to its slot in guest RAM at
//!   that moment (one thread: the only instant between the guest's write and the copy);
//! - a stop leaves CONS.ERR in CONS, GERROR bit 0 different from GERRORN bit 0, and the
//!   queue's LVCMDQ_ERR_MAP bit set;
//! - nothing panics: the driver only calls `HostRing` with arguments it documents as valid.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vcmdq::command::RawCommand;
use vcmdq::queue::{cons_err, CError};
use vcmdq::ring::HostRing;
use vcmdq_vmm::regs::{
    VcmdqRegisterPage, REGISTER_PAGE_BYTES, VCMDQ_ADDR_MASK, VCMDQ_CONS, VCMDQ_GERROR,
    VCMDQ_GERRORN, VCMDQ_LOG2SIZE_MASK,
};
use vcmdq_vmm::{GuestRamSlots, Tegra241Registers};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Guest RAM: [0, 64 KiB) and [128 KiB, 192 KiB).
const REGIONS: [(u64, u64); 2] = [(0, 64 << 10), (128 << 10, 64 << 10)];

#[derive(Arbitrary, Debug)]
enum Op {
    /// A 32-bit guest write anywhere in the register page (the offset is reduced into it).
    Reg { off: u32, value: u32 },
    /// A guest write of BASE of logical VCMDQ `lidx % 4`, from a small set of interesting
    /// addresses plus LOG2SIZE.
    Base { lidx: u8, addr: u8, log2size: u8 },
    /// A guest write of one slot of the queue at the guest address.
    Slot { at: u32, d0: u64, d1: u64 },
    /// The VMM notices CONFIG.EN: a new engine side from BASE.
    Enable { lidx: u8 },
    /// The engine drops its side.
    Disable,
    /// The engine polls into a buffer of `max % 64 + 1` entries.
    Poll { max: u8 },
    /// The engine completes everything it read.
    Complete,
    /// The engine refuses the first entry it read.
    Stop,
}

#[derive(Arbitrary, Debug)]
struct Input {
    ops: Vec<Op>,
}

struct Engine {
    host: HostRing,
    lidx: u16,
    base: u64,
}

fn base_choice(addr: u8) -> u64 {
    const CHOICES: [u64; 8] = [
        0,
        0x1000,
        0x1020,
        (64 << 10) - 256,
        64 << 10,
        128 << 10,
        (192 << 10) - 4096,
        1 << 40,
    ];
    CHOICES[usize::from(addr) % CHOICES.len()]
}

/// The rule, written apart from `GuestRamSlots::new`.
fn should_take(base: u64, log2size: u64) -> bool {
    if log2size > 19 {
        return false;
    }
    let len = 16u64 << log2size;
    if base % len.max(32) != 0 {
        return false;
    }
    REGIONS
        .iter()
        .any(|&(start, size)| base >= start && base + len <= start + size)
}

fuzz_target!(|input: Input| {
    let ram = Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&REGIONS.map(|(a, l)| (GuestAddress(a), l as usize)))
            .unwrap(),
    );
    let page = VcmdqRegisterPage::heap();
    let mut engine: Option<Engine> = None;
    let mut out = vec![RawCommand::new(0, 0); 64];
    for op in input.ops.into_iter().take(512) {
        match op {
            Op::Reg { off, value } => {
                let off = (off as usize % REGISTER_PAGE_BYTES) & !3;
                assert!(page.write_u32(off, value));
                assert_eq!(page.read_u32(off), Some(value));
            }
            Op::Base {
                lidx,
                addr,
                log2size,
            } => {
                let base = base_choice(addr) | u64::from(log2size & 0x1f);
                page.set_base(u16::from(lidx % 4), base).unwrap();
            }
            Op::Slot { at, d0, d1 } => {
                let at = u64::from(at) % (192 << 10) & !15;
                // Writes into the hole fail, as a guest's would fault.
                let _ = ram.store(d0, GuestAddress(at), std::sync::atomic::Ordering::Relaxed);
                let _ = ram.store(
                    d1,
                    GuestAddress(at + 8),
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            Op::Enable { lidx } => {
                let lidx = u16::from(lidx % 4);
                let reg = page.base(lidx).unwrap();
                let (base, log2size) = (reg & VCMDQ_ADDR_MASK, reg & VCMDQ_LOG2SIZE_MASK);
                let slots = GuestRamSlots::new(ram.clone(), base, log2size as u8);
                assert_eq!(
                    slots.is_ok(),
                    should_take(base, log2size),
                    "BASE {base:#x} LOG2SIZE {log2size}: {slots:?}"
                );
                engine = match slots {
                    Ok(slots) => {
                        let regs = Tegra241Registers::new(page.clone(), lidx, |_| {}).unwrap();
                        let host = HostRing::from_parts(regs, slots, log2size as u8, 1).unwrap();
                        Some(Engine { host, lidx, base })
                    }
                    Err(e) => {
                        assert!(!e.to_string().is_empty());
                        None
                    }
                };
            }
            Op::Disable => engine = None,
            Op::Poll { max } => {
                let Some(e) = engine.as_mut() else { continue };
                let n = usize::from(max) % 64 + 1;
                let polled = e.host.poll(&mut out[..n]).expect("guest RAM never fails");
                let shape = e.host.shape();
                assert!(polled.n <= n && polled.n as u32 <= shape.entries());
                for (i, cmd) in out[..polled.n].iter().enumerate() {
                    let idx = shape.index(polled.first.wrapping_add(i as u32));
                    let at = GuestAddress(e.base + u64::from(idx) * 16);
                    let d0: u64 = ram.load(at, std::sync::atomic::Ordering::Relaxed).unwrap();
                    let d1: u64 = ram
                        .load(GuestAddress(at.0 + 8), std::sync::atomic::Ordering::Relaxed)
                        .unwrap();
                    assert_eq!(*cmd, RawCommand::new(d0, d1), "entry {i} of the poll");
                }
            }
            Op::Complete => {
                let Some(e) = engine.as_mut() else { continue };
                if e.host.stopped().is_none() {
                    let to = e.host.read_ptr();
                    e.host.complete(to);
                }
            }
            Op::Stop => {
                let Some(e) = engine.as_mut() else { continue };
                if e.host.stopped().is_some() || e.host.read_ptr() == e.host.cons_ptr() {
                    continue;
                }
                let at = e.host.cons_ptr();
                e.host.stop(at, CError::Ill);
                let cons = page.read_page0(e.lidx, VCMDQ_CONS).unwrap();
                assert_eq!(cons_err(cons), CError::Ill.code());
                let (g, gn) = (
                    page.read_page0(e.lidx, VCMDQ_GERROR).unwrap(),
                    page.read_page0(e.lidx, VCMDQ_GERRORN).unwrap(),
                );
                assert_eq!((g ^ gn) & 1, 1, "GERROR {g:#x} GERRORN {gn:#x}");
                let map = page.err_map();
                let bit = usize::from(e.lidx);
                assert_eq!(
                    map[bit / 64] >> (bit % 64) & 1,
                    1,
                    "LVCMDQ_ERR_MAP {map:x?}"
                );
            }
        }
    }
});
