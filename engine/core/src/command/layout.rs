//! Where every field of every legal opcode sits: the one table that decode, encode, the RES0
//! check, the text form and JSON all read, so they cannot disagree.

use super::raw::RawCommand;

/// How a field's bits are read and shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldKind {
    /// An unsigned number, shown in decimal.
    Num,
    /// An identifier (SID, SSID, MSIDATA, ...), shown in hex.
    Hex,
    /// A one-bit flag, shown by name when set.
    Flag,
    /// An address: the field's bits stay in place and the bits below it read as zero.
    Addr,
    /// The TLB invalidation granule: 0 none, 1 4K, 2 16K, 3 64K.
    Tg,
}

/// One field of a command layout: `d<word>[hi:lo]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldDef {
    /// The spec's name, in lower case.
    pub name: &'static str,
    /// 0 for `d0`, 1 for `d1`.
    pub word: u8,
    /// Highest bit, inclusive.
    pub hi: u8,
    /// Lowest bit.
    pub lo: u8,
    /// How the value is read and shown.
    pub kind: FieldKind,
}

impl FieldDef {
    /// The field's bits within its word.
    pub const fn mask(&self) -> u64 {
        (u64::MAX >> (63 - (self.hi - self.lo))) << self.lo
    }

    /// The largest value [`FieldDef::put`] takes.
    pub const fn max_value(&self) -> u64 {
        match self.kind {
            FieldKind::Addr => self.mask(),
            _ => self.mask() >> self.lo,
        }
    }

    /// The field's value in `raw` (for [`FieldKind::Addr`], the byte address).
    #[inline]
    pub fn get(&self, raw: &RawCommand) -> u64 {
        extract(raw.word(self.word as usize), self.hi, self.lo, self.kind)
    }

    /// Writes `value` into the field of `words`.
    pub fn put(&self, words: &mut [u64; 2], value: u64) -> Result<(), FieldRangeError> {
        insert(words, self.word, self.hi, self.lo, self.kind, value).map_err(|()| FieldRangeError {
            field: self.name,
            value,
            max: self.max_value(),
            kind: self.kind,
        })
    }
}

/// A value that does not fit its field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}={value:#x} does not fit the field (max {max:#x}{})",
    if matches!(kind, FieldKind::Addr) { ", with the bits below the field zero" } else { "" })]
pub struct FieldRangeError {
    /// The field's name.
    pub field: &'static str,
    /// The value given.
    pub value: u64,
    /// The largest value the field holds.
    pub max: u64,
    /// The field's kind.
    pub kind: FieldKind,
}

#[inline]
pub(crate) const fn extract(word: u64, hi: u8, lo: u8, kind: FieldKind) -> u64 {
    let mask = (u64::MAX >> (63 - (hi - lo))) << lo;
    match kind {
        FieldKind::Addr => word & mask,
        _ => (word & mask) >> lo,
    }
}

#[inline]
pub(crate) fn insert(
    words: &mut [u64; 2],
    word: u8,
    hi: u8,
    lo: u8,
    kind: FieldKind,
    value: u64,
) -> Result<(), ()> {
    let mask = (u64::MAX >> (63 - (hi - lo))) << lo;
    let bits = match kind {
        FieldKind::Addr => value,
        _ => value
            .checked_shl(lo as u32)
            .filter(|b| b >> lo == value)
            .ok_or(())?,
    };
    if bits & !mask != 0 {
        return Err(());
    }
    let w = &mut words[word as usize];
    *w = (*w & !mask) | bits;
    Ok(())
}

/// Everything known about one legal opcode.
#[derive(Debug, PartialEq, Eq)]
pub struct OpLayout {
    /// `d0[7:0]`.
    pub opcode: u8,
    /// The spec's name, e.g. `TLBI_NH_VA`.
    pub name: &'static str,
    /// The fields, in the order the text form prints them.
    pub fields: &'static [FieldDef],
    /// Bits that may be set in `d0` and `d1` (the opcode byte and the fields); the rest is RES0.
    pub allowed: [u64; 2],
}

impl OpLayout {
    /// The field called `name`.
    pub fn field(&self, name: &str) -> Option<&'static FieldDef> {
        self.fields.iter().find(|f| f.name == name)
    }
}

/// The allowed-bit masks of a field list, plus the opcode byte.
pub(crate) const fn allowed_mask(fields: &[FieldDef]) -> [u64; 2] {
    let mut m = [0xff, 0];
    let mut i = 0;
    while i < fields.len() {
        m[fields[i].word as usize] |= fields[i].mask();
        i += 1;
    }
    m
}

/// A type a typed field is held in.
pub(crate) trait FieldType: Copy {
    fn from_field(v: u64) -> Self;
    fn to_field(self) -> u64;
}

impl FieldType for bool {
    #[inline]
    fn from_field(v: u64) -> Self {
        v != 0
    }
    #[inline]
    fn to_field(self) -> u64 {
        self as u64
    }
}

macro_rules! field_type_int {
    ($($t:ty),*) => {$(
        impl FieldType for $t {
            #[inline]
            fn from_field(v: u64) -> Self {
                // The layout bounds every field to the width of its type.
                v as $t
            }
            #[inline]
            fn to_field(self) -> u64 {
                self as u64
            }
        }
    )*};
}
field_type_int!(u8, u16, u32, u64);
