//! Arbitrary text: parsing a command line never panics, and what parses prints back to a line
//! that parses to the same 16 bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vcmdq::command::text::{format_raw, parse};

fuzz_target!(|line: &str| {
    if let Ok(raw) = parse(line) {
        let printed = format_raw(&raw);
        assert_eq!(
            parse(&printed),
            Ok(raw),
            "{line:?} parsed to {raw:?}, printed as {printed:?}"
        );
    }
});
