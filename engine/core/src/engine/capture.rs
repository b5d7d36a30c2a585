//! `capture`: the engine reports what guests submitted and what the control plane did, event by
//! event, to a [`CaptureSink`] the embedder gives it (the `vcmdq-trace` crate's sink writes a
//! trace file that `vcmdq replay` reads back; the engine knows no file format).
//!
//! Workers record the entries they act on, as the read they acted on saw them (an entry read
//! after a trapped or refused one is given back and recorded when it is read again and judged,
//! so a guest that rewrites it meanwhile is captured with what the engine forwarded), each entry
//! once, the PROD up to what they acted on, a guest's fix and acknowledgement of a stop; the
//! control plane records vIOMMUs, devices, bindings and rings. Events go through a
//! lock-free queue to a capture thread that hands them to the sink, so a worker pays a copy of what
//! it read and one queue push per pass, never a lock or a call into the sink. A worker pushes inside its grace-period pin,
//! so an unbind (which waits for the pin) is always recorded after the commands translated
//! through the binding it removes.
//!
//! What a capture cannot see: when exactly a guest rang the doorbell, or how far (a Doorbell
//! record carries the PROD up to the last entry the engine acted on, and the time it read
//! them: a PROD beyond a trapped or refused entry shows up at the read after it), PROD values the engine read nothing at
//! (hostile PROD writes), and physical-queue faults (they are not the guest's doing; entries
//! after a faulting command that the guest rewrites before they are read again keep their first
//! version in the capture).

use crate::command::RawCommand;
use crate::viommu::ViommuConfig;
use crossbeam_queue::SegQueue;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Why a [`CaptureSink`] failed: its own error, boxed (a file it could not write, say).
pub type CaptureError = Box<dyn std::error::Error + Send + Sync>;

/// One captured event. `at` is when it was seen, in ns since the engine's epoch; events reach
/// the sink in the order they were pushed, which is not always the order of `at` (workers read
/// their clocks at different instants).
#[derive(Clone, Debug, PartialEq)]
pub enum CaptureEvent {
    /// A vIOMMU was created.
    Viommu {
        /// When.
        at: u64,
        /// Its configuration.
        config: ViommuConfig,
    },
    /// A host device was added.
    Device {
        /// When.
        at: u64,
        /// The device.
        device: u32,
        /// Its physical SMMU.
        smmu: u32,
        /// Its physical StreamID.
        psid: u32,
    },
    /// A device was bound to a vSID of a vIOMMU.
    Bind {
        /// When.
        at: u64,
        /// The vIOMMU.
        viommu: u32,
        /// The device.
        device: u32,
        /// The vSID.
        vsid: u32,
    },
    /// A device was unbound from its vIOMMU (after every command translated through the
    /// binding was captured).
    Unbind {
        /// When.
        at: u64,
        /// The vIOMMU.
        viommu: u32,
        /// The device.
        device: u32,
    },
    /// A guest ring was attached.
    Ring {
        /// When.
        at: u64,
        /// The ring's id.
        ring: u32,
        /// Its vIOMMU.
        viommu: u32,
        /// Its LOG2SIZE.
        log2size: u8,
    },
    /// Entries a worker acted on, as it read them, from `slot` on.
    Commands {
        /// When they were read.
        at: u64,
        /// The ring.
        ring: u32,
        /// The slot index of the first.
        slot: u32,
        /// The entries.
        cmds: Vec<RawCommand>,
    },
    /// PROD up to the last entry the worker acted on.
    Doorbell {
        /// When it was read.
        at: u64,
        /// The ring.
        ring: u32,
        /// PROD (with its wrap bit).
        prod: u32,
    },
    /// The guest rewrote the entry its ring stopped at.
    Fix {
        /// When the engine saw it.
        at: u64,
        /// The ring.
        ring: u32,
        /// The slot.
        slot: u32,
        /// The entry as rewritten.
        cmd: RawCommand,
    },
    /// The guest acknowledged its ring's error.
    Ack {
        /// When the engine saw it.
        at: u64,
        /// The ring.
        ring: u32,
    },
}

impl CaptureEvent {
    /// When the event was seen, in ns since the engine's epoch.
    pub fn at(&self) -> u64 {
        match self {
            CaptureEvent::Viommu { at, .. }
            | CaptureEvent::Device { at, .. }
            | CaptureEvent::Bind { at, .. }
            | CaptureEvent::Unbind { at, .. }
            | CaptureEvent::Ring { at, .. }
            | CaptureEvent::Commands { at, .. }
            | CaptureEvent::Doorbell { at, .. }
            | CaptureEvent::Fix { at, .. }
            | CaptureEvent::Ack { at, .. } => *at,
        }
    }
}

/// Where captured events go. Called on the engine's capture thread only, never on a worker, in
/// the order the events were pushed.
pub trait CaptureSink: Send {
    /// Records one event.
    fn record(&mut self, event: CaptureEvent) -> Result<(), CaptureError>;
    /// Every event was recorded: finish (flush, close) and say how many records were written.
    fn finish(self: Box<Self>) -> Result<u64, CaptureError>;
}

type MakeSink = dyn Fn() -> Result<Box<dyn CaptureSink>, CaptureError> + Send + Sync;

/// How [`Engine::start`](super::Engine::start) makes its capture sink: a factory, so an
/// [`EngineConfig`](super::EngineConfig) stays a plain value that can be cloned and each engine
/// started from it gets its own sink.
#[derive(Clone)]
pub struct CaptureTo(Arc<MakeSink>);

impl CaptureTo {
    /// A capture whose sink `make` creates when the engine starts.
    pub fn new(
        make: impl Fn() -> Result<Box<dyn CaptureSink>, CaptureError> + Send + Sync + 'static,
    ) -> CaptureTo {
        CaptureTo(Arc::new(make))
    }
}

impl fmt::Debug for CaptureTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CaptureTo(..)")
    }
}

/// The queue workers and the control plane push to, and the thread that drains it into the sink.
pub(super) struct Capture {
    pub(super) queue: Arc<SegQueue<CaptureEvent>>,
    done: Arc<AtomicBool>,
    drain: Option<JoinHandle<Result<u64, String>>>,
}

impl Capture {
    /// Makes the sink and starts the thread that feeds it.
    pub(super) fn start(to: &CaptureTo) -> Result<Capture, String> {
        let mut sink = (to.0)().map_err(|e| e.to_string())?;
        let queue = Arc::new(SegQueue::new());
        let done = Arc::new(AtomicBool::new(false));
        let (q, d) = (queue.clone(), done.clone());
        let drain = std::thread::Builder::new()
            .name("vcmdq-capture".into())
            .spawn(move || -> Result<u64, String> {
                loop {
                    // Read `done` before draining: what was pushed before it was set is recorded.
                    let finished = d.load(Ordering::Acquire);
                    let mut any = false;
                    while let Some(ev) = q.pop() {
                        sink.record(ev).map_err(|e| e.to_string())?;
                        any = true;
                    }
                    if finished {
                        break;
                    }
                    if !any {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                sink.finish().map_err(|e| e.to_string())
            })
            .map_err(|e| format!("cannot start the capture thread: {e}"))?;
        Ok(Capture {
            queue,
            done,
            drain: Some(drain),
        })
    }

    /// Records what is queued, finishes the sink, and returns the records written.
    pub(super) fn finish(&mut self) -> Result<u64, String> {
        self.done.store(true, Ordering::Release);
        match self.drain.take() {
            Some(h) => match h.join() {
                Ok(r) => r,
                Err(_) => Err("the capture sink panicked".into()),
            },
            None => Err("capture already finished".into()),
        }
    }
}
