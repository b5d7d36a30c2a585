//! Arbitrary bytes as a QEMU `-trace 'smmuv3_*'` log: the import never panics and never reads a
//! line beyond its limit; what it imports validates, and fills no more slots with CMD_SYNC than
//! its limits allow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Cursor;
use vcmdq_trace::qemu::{import_with, ImportLimits};
use vcmdq_trace::{validate, Trace};

fuzz_target!(|bytes: &[u8]| {
    let limits = ImportLimits {
        max_filler_per_pass: 64,
        max_filler: 256,
        ..Default::default()
    };
    if let Ok((out, stats)) = import_with(Cursor::new(bytes), Cursor::new(Vec::new()), &limits) {
        let out = out.into_inner();
        let t = Trace::parse(&out).expect("an import reads");
        validate(&t).expect("an import validates");
        assert!(stats.unobserved <= limits.max_filler);
        let _ = stats.warnings();
    }
});
