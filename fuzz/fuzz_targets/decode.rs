//! Arbitrary 16 bytes: decode never panics, what decodes encodes back to the same bytes, the
//! hot path's RES0 check agrees with decode, and the text form round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vcmdq::command::{decode, res0_bits, text, DecodeError, RawCommand};

fuzz_target!(|bytes: [u8; 16]| {
    let raw = RawCommand::from_bytes(bytes);
    let verdict = decode(raw);
    match (&verdict, res0_bits(&raw)) {
        (Ok(cmd), Some([0, 0])) => {
            assert_eq!(cmd.encode(), raw, "encode(decode(x)) != x for {raw:?}")
        }
        (Err(DecodeError::IllegalOpcode { .. }), None) => {}
        (Err(DecodeError::Res0 { d0, d1, .. }), Some(bits)) => {
            assert_eq!([*d0, *d1], bits, "{raw:?}")
        }
        (Err(DecodeError::RangeWithoutGranule { .. }), Some([0, 0])) => {}
        (v, bits) => panic!("decode {v:?} disagrees with res0_bits {bits:?} for {raw:?}"),
    }
    assert_eq!(text::parse(&text::format_raw(&raw)), Ok(raw), "{raw:?}");
});
