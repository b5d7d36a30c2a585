//! `ring::wake`, the futex under the sleep protocol, alone: what ends a wait, and what a kick
//! does to the word. Waits are bounded far above the test's own bound, never timed.
#![cfg(not(loom))]

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{join_named, T};
use vcmdq::command::{opcode, RawCommand};
use vcmdq::ring::heap_pair;
use vcmdq::ring::layout::OFF_SLEEPING;
use vcmdq::ring::wake::{kick, wait_any, Wait};

#[test]
fn a_wait_on_a_word_that_no_longer_holds_1_ends_at_once() {
    let word = AtomicU32::new(0);
    // An hour: only the kernel's check of the value can end it within the test.
    assert_eq!(
        wait_any(&[&word], Duration::from_secs(3600)),
        Wait::Woken,
        "the kernel sleeps only while the word holds 1"
    );
}

#[test]
fn a_wait_nobody_kicks_ends_on_its_timeout() {
    let word = AtomicU32::new(1);
    assert_eq!(wait_any(&[&word], Duration::from_millis(5)), Wait::TimedOut);
    assert_eq!(word.load(Ordering::Relaxed), 1, "a timeout changes nothing");
}

#[test]
fn a_kick_on_an_awake_word_changes_nothing() {
    let word = AtomicU32::new(0);
    kick(&word);
    assert_eq!(word.load(Ordering::Relaxed), 0);
}

#[test]
fn a_kick_clears_the_word_and_wakes_its_waiter() {
    let (other, word) = (AtomicU32::new(1), AtomicU32::new(1));
    std::thread::scope(|s| {
        // Far longer than T, so that a wait ending within T was woken; bounded, since a scope
        // joins its threads even when the test fails.
        let waiter = s.spawn(|| wait_any(&[&other, &word], 3 * T));
        // Most runs get the waiter asleep first; one that does not ends on the cleared word.
        std::thread::sleep(Duration::from_millis(20));
        kick(&word);
        assert_eq!(word.load(Ordering::Relaxed), 0, "the kick clears SLEEPING");
        let how = join_named("a waiter on a kicked word", T, waiter);
        assert_eq!(how, Wait::Woken);
    });
    assert_eq!(
        other.load(Ordering::Relaxed),
        1,
        "the other word is left alone"
    );
}

#[test]
fn the_guests_doorbell_and_acknowledgement_kick_a_sleeping_engine() {
    let (mut guest, _host) = heap_pair(4, 1).unwrap();
    for (what, step) in [
        ("doorbell", 0),
        ("ack_error", 1),
        ("write_prod_raw", 2),
        ("doorbell_without_kick", 3),
    ] {
        guest.write_header_u32(OFF_SLEEPING, 1);
        assert!(guest.engine_sleeping());
        match step {
            0 => {
                guest.push(&[RawCommand::new(opcode::CMD_SYNC as u64, 0)]);
                guest.doorbell();
            }
            1 => guest.ack_error(),
            2 => guest.write_prod_raw(guest.prod()),
            _ => guest.doorbell_without_kick(),
        }
        assert_eq!(
            guest.engine_sleeping(),
            step == 3,
            "{what}: SLEEPING after it (a kick clears it)"
        );
    }
}
