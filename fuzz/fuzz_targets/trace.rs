//! Arbitrary bytes as a trace file: reading, validating and dumping never panic; a trace that
//! reads without error writes back to the same events (to the same bytes when its header gives
//! the record count), and its text form builds back to the same text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::Cursor;
use vcmdq::trace::{text, to_vec, validate, Trace};

fuzz_target!(|bytes: &[u8]| {
    let Ok(t) = Trace::parse(bytes) else { return };
    let mut events = Vec::new();
    for r in t.records() {
        match r {
            Ok(r) => events.push((r.timestamp_ns, r.event)),
            Err(_) => {
                let _ = validate(&t);
                return;
            }
        }
    }
    let _ = validate(&t);

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
    let built = text::build(&dumped, Cursor::new(Vec::new()))
        .expect("a dump builds")
        .into_inner();
    let redumped = text::dump_to_string(&Trace::parse(&built).expect("a built trace reads"))
        .expect("a built trace dumps");
    assert_eq!(dumped, redumped);
});
