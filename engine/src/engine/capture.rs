//! `capture`: the engine records what guests submitted and what the control plane did, as a
//! trace that `vcmdq replay` reads back.
//!
//! Workers record the entries they act on, as the read they acted on saw them (an entry read
//! after a trapped or refused one is given back and recorded when it is read again and judged,
//! so a guest that rewrites it meanwhile is captured with what the engine forwarded), each entry
//! once, the PROD up to what they acted on, a guest's fix and acknowledgement of a stop; the
//! control plane records vIOMMUs, devices, bindings and rings. Events go through a
//! lock-free queue to a writer thread, so a worker pays a copy of what it read and one queue
//! push per pass, never a lock or a write to a file. A worker pushes inside its grace-period pin,
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
use crate::trace::{Event, Profile, TraceMeta, TraceWriter, WriteError};
use crate::viommu::ViommuConfig;
use crossbeam_queue::SegQueue;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// One captured event, with the time it was seen (ns since the engine's epoch).
pub(super) enum CaptureEvent {
    Viommu(u64, ViommuConfig),
    Device(u64, u32, u32, u32),
    Bind(u64, u32, u32, u32),
    Unbind(u64, u32, u32),
    Ring(u64, u32, u32, u8),
    Commands(u64, u32, u32, Vec<RawCommand>),
    Doorbell(u64, u32, u32),
    Fix(u64, u32, u32, RawCommand),
    Ack(u64, u32),
}

/// The queue workers and the control plane push to, and the thread that writes it out.
pub(super) struct Capture {
    pub(super) queue: Arc<SegQueue<CaptureEvent>>,
    done: Arc<AtomicBool>,
    writer: Option<JoinHandle<Result<u64, WriteError>>>,
}

impl Capture {
    /// Creates the trace file and starts its writer.
    pub(super) fn start(path: &Path) -> Result<Capture, WriteError> {
        let file = File::create(path)?;
        let created_unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut w = TraceWriter::new(
            file,
            TraceMeta {
                flags: 0,
                created_unix_ns,
            },
        )?;
        let queue = Arc::new(SegQueue::new());
        let done = Arc::new(AtomicBool::new(false));
        let (q, d) = (queue.clone(), done.clone());
        let writer = std::thread::Builder::new()
            .name("vcmdq-capture".into())
            .spawn(move || -> Result<u64, WriteError> {
                loop {
                    // Read `done` before draining: what was pushed before it was set is written.
                    let finished = d.load(Ordering::Acquire);
                    let mut any = false;
                    while let Some(ev) = q.pop() {
                        write(&mut w, ev)?;
                        any = true;
                    }
                    if finished {
                        break;
                    }
                    if !any {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                let records = w.records();
                w.finish_counted()?;
                Ok(records)
            })
            .map_err(WriteError::Io)?;
        Ok(Capture {
            queue,
            done,
            writer: Some(writer),
        })
    }

    /// Writes what is queued, closes the file, and returns the records written.
    pub(super) fn finish(&mut self) -> Result<u64, String> {
        self.done.store(true, Ordering::Release);
        match self.writer.take() {
            Some(h) => match h.join() {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err("the capture writer panicked".into()),
            },
            None => Err("capture already finished".into()),
        }
    }
}

fn write(w: &mut TraceWriter<File>, ev: CaptureEvent) -> Result<(), WriteError> {
    // Workers' clocks are read at different instants; the trace needs time to go forward.
    let at = |t: u64, w: &TraceWriter<File>| t.max(w.last_timestamp());
    match ev {
        CaptureEvent::Viommu(t, c) => w.write(
            at(t, w),
            &Event::ViommuCreate {
                viommu: c.id,
                vmid: c.vmid,
                smmu: c.smmu,
                profile: Profile::from_code(c.profile.code()).unwrap_or_default(),
                sidsize: c.sidsize,
                range_inv: c.range_inv,
                features: c.features,
            },
        ),
        CaptureEvent::Device(t, device, smmu, psid) => {
            w.write(at(t, w), &Event::DeviceAdd { device, smmu, psid })
        }
        CaptureEvent::Bind(t, viommu, device, vsid) => w.write(
            at(t, w),
            &Event::Bind {
                viommu,
                device,
                vsid,
            },
        ),
        CaptureEvent::Unbind(t, viommu, device) => {
            w.write(at(t, w), &Event::Unbind { viommu, device })
        }
        CaptureEvent::Ring(t, ring, viommu, log2size) => w.write(
            at(t, w),
            &Event::RingCreate {
                ring,
                viommu,
                log2size,
            },
        ),
        CaptureEvent::Commands(t, ring, slot, cmds) => w.write(
            at(t, w),
            &Event::Commands {
                ring,
                slot,
                cmds: &cmds,
            },
        ),
        CaptureEvent::Doorbell(t, ring, prod) => w.write(at(t, w), &Event::Doorbell { ring, prod }),
        CaptureEvent::Fix(t, ring, slot, cmd) => {
            w.write(at(t, w), &Event::GuestFix { ring, slot, cmd })
        }
        CaptureEvent::Ack(t, ring) => w.write(at(t, w), &Event::GuestAck { ring }),
    }
}
