//! Test hooks into a worker's sleep protocol (feature `mock` only): a test that must put a
//! guest's step at one exact point of the protocol installs a hook here. Process-wide, so a
//! test that installs one runs alone in its test binary.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

type Hook = Box<dyn Fn() + Send + Sync>;

static SET: AtomicBool = AtomicBool::new(false);
static BEFORE_RECHECK: Mutex<Option<Hook>> = Mutex::new(None);

/// Runs `hook` on the worker's thread each time a worker has announced that it sleeps
/// (SLEEPING = 1 on its rings, the fence done) and before it re-checks its rings; `None`
/// removes it. A guest that publishes PROD from here without kicking is the guest that loaded
/// SLEEPING just before the announcement.
pub fn set_before_recheck(hook: Option<Hook>) {
    let mut h = crate::sync::lock(&BEFORE_RECHECK);
    SET.store(hook.is_some(), Ordering::Release);
    *h = hook;
}

pub(super) fn before_recheck() {
    if SET.load(Ordering::Acquire) {
        if let Some(h) = crate::sync::lock(&BEFORE_RECHECK).as_ref() {
            h();
        }
    }
}
