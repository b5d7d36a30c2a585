//! Pinning a load generator and the engine's threads to separate CPUs.
//!
//! On a small VM the scheduler may put a spinning generator and the engine worker it feeds on
//! one CPU, and the worker then waits for a tick: the latency measured is the scheduler's.
//! Measurements that want the engine's own latency pin the calling thread (the guest side) to
//! one allowed CPU and every other thread of the process (the engine's) to another, and say
//! when they could not.

/// The kernel's id of the calling thread.
pub fn gettid() -> libc::pid_t {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// The threads of this process other than the calling one, from /proc/self/task.
pub fn other_threads() -> Result<Vec<libc::pid_t>, String> {
    let me = gettid();
    let dir = std::fs::read_dir("/proc/self/task").map_err(|e| format!("/proc/self/task: {e}"))?;
    let mut tids = Vec::new();
    for t in dir {
        let t = t.map_err(|e| format!("/proc/self/task: {e}"))?;
        if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse().ok()) {
            if tid != me {
                tids.push(tid);
            }
        }
    }
    Ok(tids)
}

/// The first two CPUs the calling thread may run on, or why there are not two.
fn two_allowed_cpus() -> Result<(usize, usize), String> {
    // SAFETY: an all-zero cpu_set_t is the empty set; sched_getaffinity writes at most
    // `size_of` bytes into it; CPU_ISSET reads inside it (i < CPU_SETSIZE).
    let cpus: Vec<usize> = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(format!(
                "sched_getaffinity: {}",
                std::io::Error::last_os_error()
            ));
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&i| libc::CPU_ISSET(i, &set))
            .take(2)
            .collect()
    };
    match cpus[..] {
        [a, b] => Ok((a, b)),
        _ => Err(format!(
            "{} CPU allowed to this process, two needed",
            cpus.len()
        )),
    }
}

/// The calling thread's affinity when saved, set again when dropped (errors ignored: the
/// thread then keeps the affinity it was pinned to).
pub struct Restore(Option<libc::cpu_set_t>);

impl Restore {
    /// Saves the calling thread's affinity; drop the result on the same thread.
    pub fn save() -> Restore {
        // SAFETY: an all-zero cpu_set_t is the empty set; sched_getaffinity writes at most
        // `size_of` bytes into it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            Restore((libc::sched_getaffinity(0, size, &mut set) == 0).then_some(set))
        }
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        if let Some(set) = &self.0 {
            // SAFETY: `set` is a whole cpu_set_t the kernel filled; it is only read.
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) };
        }
    }
}

/// Pins thread `tid` (0: the calling one) to `cpu`.
pub fn pin(tid: libc::pid_t, cpu: usize) -> Result<(), String> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(format!("CPU {cpu} is beyond CPU_SETSIZE"));
    }
    // SAFETY: an all-zero cpu_set_t is the empty set; CPU_SET only writes inside it (cpu is
    // below CPU_SETSIZE, checked); sched_setaffinity reads `size_of` bytes of it.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        return Err(format!(
            "pin thread {tid} to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Pins the calling thread to the first CPU it may run on and `others` to the second:
/// `Ok((generator CPU, engine CPU))`, or why not (fewer than two CPUs allowed, or the kernel
/// refused; threads pinned before a refusal stay pinned).
pub fn pin_apart(others: &[libc::pid_t]) -> Result<(usize, usize), String> {
    let (mine, theirs) = two_allowed_cpus()?;
    pin(0, mine)?;
    for &tid in others {
        pin(tid, theirs)?;
    }
    Ok((mine, theirs))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPUs the calling thread may run on.
    fn allowed() -> Vec<usize> {
        // SAFETY: as in two_allowed_cpus.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            let size = std::mem::size_of::<libc::cpu_set_t>();
            assert_eq!(libc::sched_getaffinity(0, size, &mut set), 0);
            (0..libc::CPU_SETSIZE as usize)
                .filter(|&i| libc::CPU_ISSET(i, &set))
                .collect()
        }
    }

    #[test]
    fn threads_pinned_apart_run_each_on_its_own_cpu_or_the_reason_is_said() {
        // In threads of their own, so the test harness's threads keep their affinity.
        std::thread::spawn(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
            let other = std::thread::spawn(move || {
                tx.send(gettid()).unwrap();
                done_rx
                    .recv_timeout(std::time::Duration::from_secs(10))
                    .expect("the test ended the helper thread");
                allowed()
            });
            let tid = rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("the helper thread said its tid");
            assert!(other_threads().unwrap().contains(&tid), "/proc lists it");
            let could = allowed().len() >= 2;
            let result = pin_apart(&[tid]);
            done_tx.send(()).unwrap();
            let theirs_allowed = other.join().unwrap();
            match result {
                Ok((mine, theirs)) => {
                    assert_ne!(mine, theirs);
                    assert_eq!(allowed(), vec![mine], "the caller runs on its CPU alone");
                    assert_eq!(theirs_allowed, vec![theirs], "the other on its own");
                }
                Err(why) => {
                    assert!(!could, "two CPUs were allowed, yet: {why}");
                    assert!(why.contains("two needed"), "{why}");
                }
            }
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_cpu_beyond_the_set_is_refused_not_written() {
        let e = pin(0, libc::CPU_SETSIZE as usize).unwrap_err();
        assert!(e.contains("beyond CPU_SETSIZE"), "{e}");
    }
}
