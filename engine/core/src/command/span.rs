//! What an invalidation covers: addresses for TLB and ATC invalidations, StreamIDs for
//! CFGI_STE_RANGE.

use super::typed::Command;

/// A TLB invalidation granule (the TG field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Granule {
    /// TG=1.
    K4,
    /// TG=2.
    K16,
    /// TG=3.
    K64,
}

impl Granule {
    /// The granule of a TG field value; `None` for TG=0.
    pub fn from_tg(tg: u8) -> Option<Granule> {
        match tg {
            1 => Some(Granule::K4),
            2 => Some(Granule::K16),
            3 => Some(Granule::K64),
            _ => None,
        }
    }

    /// Bytes in one granule.
    pub fn bytes(self) -> u64 {
        match self {
            Granule::K4 => 4 << 10,
            Granule::K16 => 16 << 10,
            Granule::K64 => 64 << 10,
        }
    }
}

/// What a TLBI_*_VA, *_VAA or S2_IPA command invalidates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TlbiSpan {
    /// TG=0, the non-range form: the one leaf entry that translates `addr`, whatever its size
    /// (TTL, when not 0, names the level of that entry).
    Entry {
        /// The address, bits `[11:0]` zero.
        addr: u64,
        /// The level of the leaf, 0 when unknown.
        ttl: u8,
    },
    /// TG=1..3: (NUM+1) * 2^SCALE granules from `start`.
    Range {
        /// The first address.
        start: u64,
        /// The granule.
        granule: Granule,
        /// Granules covered.
        pages: u64,
        /// Bytes covered: `pages * granule.bytes()`.
        bytes: u64,
    },
}

/// What an ATC_INV invalidates: the naturally aligned 2^SIZE 4 KiB pages holding ADDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AtcSpan {
    /// The first byte.
    pub start: u64,
    /// Bytes covered; `u64::MAX` stands for the whole space (SIZE >= 52).
    pub bytes: u64,
    /// SIZE >= 52: every address of the stream.
    pub all: bool,
}

/// The StreamIDs a CFGI_STE or CFGI_STE_RANGE covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SidSpan {
    /// The first SID.
    pub first: u32,
    /// SIDs covered (2^32 for RANGE=31, CFGI_ALL).
    pub count: u64,
}

impl Command {
    /// `(TG, NUM, SCALE)` of a range-capable TLB invalidation.
    pub fn range_fields(&self) -> Option<(u8, u8, u8)> {
        match *self {
            Command::TlbiNhVa { tg, num, scale, .. }
            | Command::TlbiNhVaa { tg, num, scale, .. }
            | Command::TlbiEl3Va { tg, num, scale, .. }
            | Command::TlbiEl2Va { tg, num, scale, .. }
            | Command::TlbiEl2Vaa { tg, num, scale, .. }
            | Command::TlbiS2Ipa { tg, num, scale, .. } => Some((tg, num, scale)),
            _ => None,
        }
    }

    /// The addresses a range-capable TLB invalidation covers.
    pub fn tlbi_span(&self) -> Option<TlbiSpan> {
        let (addr, ttl) = match *self {
            Command::TlbiNhVa { addr, ttl, .. }
            | Command::TlbiNhVaa { addr, ttl, .. }
            | Command::TlbiEl3Va { addr, ttl, .. }
            | Command::TlbiEl2Va { addr, ttl, .. }
            | Command::TlbiEl2Vaa { addr, ttl, .. }
            | Command::TlbiS2Ipa { addr, ttl, .. } => (addr, ttl),
            _ => return None,
        };
        let (tg, num, scale) = self.range_fields()?;
        Some(match Granule::from_tg(tg) {
            None => TlbiSpan::Entry { addr, ttl },
            Some(granule) => {
                // NUM <= 31 and SCALE <= 31: at most 2^36 granules of 64 KiB, 2^52 bytes.
                let pages = (u64::from(num) + 1) << scale;
                TlbiSpan::Range {
                    start: addr,
                    granule,
                    pages,
                    bytes: pages * granule.bytes(),
                }
            }
        })
    }

    /// The addresses an ATC_INV covers.
    pub fn atc_span(&self) -> Option<AtcSpan> {
        let Command::AtcInv { addr, size, .. } = *self else {
            return None;
        };
        if size >= 52 {
            return Some(AtcSpan {
                start: 0,
                bytes: u64::MAX,
                all: true,
            });
        }
        let bytes = 4096u64 << size;
        Some(AtcSpan {
            start: addr & !(bytes - 1),
            bytes,
            all: false,
        })
    }

    /// The StreamIDs a CFGI_STE or CFGI_STE_RANGE covers.
    pub fn sid_span(&self) -> Option<SidSpan> {
        match *self {
            Command::CfgiSte { sid, .. } => Some(SidSpan {
                first: sid,
                count: 1,
            }),
            Command::CfgiSteRange { sid, range, .. } => {
                let count = 2u64 << range;
                Some(SidSpan {
                    first: (u64::from(sid) & !(count - 1)) as u32,
                    count,
                })
            }
            _ => None,
        }
    }
}
