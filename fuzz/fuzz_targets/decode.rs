//! Arbitrary 16 bytes: decode never panics, and what decodes encodes back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vcmdq::command::{decode, RawCommand};

fuzz_target!(|bytes: [u8; 16]| {
    let raw = RawCommand::from_bytes(bytes);
    if let Ok(cmd) = decode(raw) {
        assert_eq!(cmd.encode(), raw, "encode(decode(x)) != x for {raw:?}");
    }
});
