//! Arbitrary bytes as a trace file: reading, validating and dumping never panic; a trace that
//! reads without error writes back to the same events (to the same bytes when its header gives
//! the record count), and its text form builds back to the same text.
//!
//! The one validation is shared: what it refuses, `dump`, `build` and `replay` refuse too (dump
//! and replay with the very same message); what it accepts, they accept, and replay runs it
//! through the engine without the control plane refusing anything (a small ring-memory limit and
//! a short stall timeout keep each run quick).
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Cursor;
use std::time::Duration;
use vcmdq_tools::replay::{replay, ReplayError, ReplayOptions};
use vcmdq_trace::{text, to_vec, validate_with, Limits, Trace};

const LIMITS: Limits = Limits {
    max_ring_memory: 1 << 20,
};

fuzz_target!(|bytes: &[u8]| {
    let Ok(t) = Trace::parse(bytes) else { return };
    let mut events = Vec::new();
    for r in t.records() {
        match r {
            Ok(r) => events.push((r.timestamp_ns, r.event)),
            Err(_) => {
                let _ = validate_with(&t, &LIMITS);
                return;
            }
        }
    }
    let verdict = validate_with(&t, &LIMITS);

    let again = to_vec(t.meta(), events.iter().copied()).expect("a readable trace writes back");
    let t2 = Trace::parse(&again).expect("a written trace reads");
    let events2: Vec<_> = t2
        .records()
        .map(|r| {
            let r = r.expect("a written trace reads");
            (r.timestamp_ns, r.event)
        })
        .collect();
    assert_eq!(events, events2);
    if t.declared_records().is_some() {
        assert_eq!(again, bytes, "a counted trace rewrites to its own bytes");
    }

    let dumped = text::dump_to_string(&t).expect("a readable trace dumps");
    let built = text::build_unvalidated(&dumped, Cursor::new(Vec::new()))
        .expect("a dump builds")
        .into_inner();
    let redumped = text::dump_to_string(&Trace::parse(&built).expect("a built trace reads"))
        .expect("a built trace dumps");
    assert_eq!(dumped, redumped);

    // Every consumer agrees with the validation.
    let dump = text::dump_with(&t, &mut Vec::new(), &LIMITS);
    let build = text::build_with(&dumped, Cursor::new(Vec::new()), &LIMITS);
    let opts = ReplayOptions {
        limits: LIMITS,
        stall_timeout: Duration::from_millis(100),
        ..Default::default()
    };
    match &verdict {
        Err(e) => {
            let d = dump.expect_err("dump accepted what validation refused");
            assert_eq!(d.to_string(), e.to_string());
            // Build may join Commands records differently, so the record index can differ;
            // the verdict cannot.
            build.expect_err("build accepted what validation refused");
            match replay(&t, &opts, |_| {}) {
                Err(ReplayError::Trace(r)) => assert_eq!(r.to_string(), e.to_string()),
                Err(other) => panic!("replay refused {e} as {other}"),
                Ok(_) => panic!("replay accepted what validation refused: {e}"),
            }
        }
        Ok(_) => {
            dump.expect("dump refused what validation accepted");
            build.expect("build refused the text of what validation accepted");
            if events.len() <= 256 {
                match replay(&t, &opts, |_| {}) {
                    // A guest waiting for something the engine never does (commands past a
                    // stop the trace never acknowledges) stalls: the replay says so and ends.
                    Ok(_) | Err(ReplayError::Stalled { .. }) => {}
                    Err(e) => panic!("validation accepted what replay refused: {e}"),
                }
            }
        }
    }
});
