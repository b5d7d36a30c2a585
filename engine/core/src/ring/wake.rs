//! Sleeping and kicking across processes: the engine's notification suppression
//! (`docs/ring-format.md`, "Sleeping and the kick").
//!
//! A worker with nothing to do sets the SLEEPING word of each of its rings to 1, re-checks
//! every ring, and sleeps in `futex_waitv` on all those words (and one word of its own the
//! control plane wakes). A guest that moved PROD (or acknowledged an error) and then finds
//! SLEEPING = 1 sets it to 0 and wakes the futex: [`kick`]. Futexes live on the memory itself,
//! so two processes that map one memfd need no file descriptor passed between them. Where the
//! futex cannot be used (no such word, too many words, an old kernel), the engine polls with
//! a bounded backoff instead; [`wait_any`] says which.

use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::time::Duration;

/// Words `futex_waitv` waits on at most (the kernel's FUTEX_WAITV_MAX): a worker with more
/// rings than this, less one for its own word, polls instead of sleeping.
pub const FUTEX_WAITV_MAX: usize = 128;

/// How a [`wait_any`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// A word was woken, or had already changed from the value waited for, or a signal came:
    /// the caller looks at everything again.
    Woken,
    /// The timeout passed.
    TimedOut,
    /// The kernel has no `futex_waitv` (before Linux 5.16), or this is not Linux: the caller
    /// must poll instead, and need not ask again.
    Unsupported,
}

/// The guest's kick, after it published PROD (or acknowledged an error): if the engine
/// announced that it sleeps on this ring, clear the announcement and wake the engine. Costs
/// one fence and one load while the engine is awake.
///
/// The fence pairs with the engine's between setting SLEEPING and re-reading PROD: either the
/// engine's re-check sees the new PROD, or this load sees SLEEPING = 1 and wakes it.
pub fn kick(word: &AtomicU32) {
    fence(Ordering::SeqCst);
    if word.load(Ordering::Relaxed) != 0 && word.swap(0, Ordering::SeqCst) != 0 {
        wake(word);
    }
}

/// FUTEX_WAKE on `word` for every waiter (one engine per ring, but a waker cannot know). The
/// futex is a shared one (not FUTEX_PRIVATE): the waiter may be another process mapping the
/// same memory, and a private wake would not find a shared waiter (the kernel keys the two
/// differently), so [`wait_any`] waits shared too. Errors are ignored: the engine wakes on its
/// timeout anyway.
pub fn wake(word: &AtomicU32) {
    #[cfg(target_os = "linux")]
    // SAFETY: FUTEX_WAKE only reads the address to find the futex key; `word` is a live,
    // aligned u32 for the duration of the call. No memory is written.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
        );
    }
    #[cfg(not(target_os = "linux"))]
    let _ = word;
}

/// One entry of `futex_waitv`'s array, as `struct futex_waitv` of `<linux/futex.h>`: the libc
/// crate has the type only behind private padding, so it is spelled out here. `#[repr(C)]`
/// with these fields has the kernel's layout (24 bytes, 8-aligned).
#[cfg(target_os = "linux")]
#[repr(C)]
struct FutexWaitv {
    val: u64,
    uaddr: u64,
    flags: u32,
    reserved: u32,
}

/// FUTEX2_SIZE_U32 of `<linux/futex.h>`: the words are 32 bits. No FUTEX2_PRIVATE, even for a
/// word only this process maps: [`wake`] is a shared wake, and must find the waiter.
#[cfg(target_os = "linux")]
const FUTEX2_SIZE_U32: u32 = 0x02;

/// The longest timeout [`wait_any`] honours (about 68 years): a longer one would overflow the
/// kernel's deadline; nobody waits that long.
pub const MAX_WAIT: Duration = Duration::from_secs(1 << 31);

/// Sleeps until one of `words` is woken (a shared FUTEX_WAKE, [`wake`]), or no longer holds 1
/// when the kernel looks, or `timeout` (at most [`MAX_WAIT`]) passes. At most
/// [`FUTEX_WAITV_MAX`] words (more: [`Wait::Unsupported`], the caller polls).
pub fn wait_any(words: &[&AtomicU32], timeout: Duration) -> Wait {
    #[cfg(target_os = "linux")]
    {
        if words.is_empty() || words.len() > FUTEX_WAITV_MAX {
            return Wait::Unsupported;
        }
        let mut v = [const {
            FutexWaitv {
                val: 1,
                uaddr: 0,
                flags: 0,
                reserved: 0,
            }
        }; FUTEX_WAITV_MAX];
        for (e, w) in v.iter_mut().zip(words) {
            e.uaddr = w.as_ptr() as u64;
            e.flags = FUTEX2_SIZE_U32;
        }
        let timeout = timeout.min(MAX_WAIT);
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `now` is a valid timespec to write.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
        let ns = now.tv_nsec as u64 + u64::from(timeout.subsec_nanos());
        let deadline = libc::timespec {
            tv_sec: now.tv_sec
                + timeout.as_secs() as libc::time_t
                + (ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (ns % 1_000_000_000) as _,
        };
        // SAFETY: `v[..words.len()]` are initialised entries naming live, aligned u32 words
        // (the caller's references outlive the call); the kernel only reads the array, the
        // words and the deadline, an absolute CLOCK_MONOTONIC time.
        let r = unsafe {
            libc::syscall(
                libc::SYS_futex_waitv,
                v.as_ptr(),
                words.len() as libc::c_uint,
                0 as libc::c_uint,
                &deadline as *const libc::timespec,
                libc::CLOCK_MONOTONIC,
            )
        };
        if r >= 0 {
            return Wait::Woken;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ETIMEDOUT) => Wait::TimedOut,
            // EAGAIN (a word was no longer 1), EINTR: look again.
            Some(libc::EAGAIN) | Some(libc::EINTR) => Wait::Woken,
            // ENOSYS (before Linux 5.16), or a kernel that refuses the call otherwise: never
            // retried in a loop, the caller polls.
            _ => Wait::Unsupported,
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (words, timeout);
        Wait::Unsupported
    }
}
