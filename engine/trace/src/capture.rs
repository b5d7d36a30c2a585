//! A capture sink that writes what an engine reports as a trace file (the engine's
//! [`CaptureEvent`]s turned into [`Event`]s), so `vcmdq replay` can read back what guests did.

use crate::{Event, TraceMeta, TraceWriter, WriteError};
use std::fs::File;
use std::path::{Path, PathBuf};
use vcmdq::engine::{CaptureError, CaptureEvent, CaptureSink, CaptureTo};

/// The engine's capture, written to `path` as a trace file (created, or truncated, when the
/// engine starts). Errors name the file.
pub fn capture_to_file(path: impl AsRef<Path>) -> CaptureTo {
    let path = path.as_ref().to_path_buf();
    CaptureTo::new(move || {
        let sink = FileSink::create(&path).map_err(|e| named(&path, e))?;
        Ok(Box::new(sink) as Box<dyn CaptureSink>)
    })
}

fn named(path: &Path, e: WriteError) -> CaptureError {
    format!("capture to {}: {e}", path.display()).into()
}

struct FileSink {
    path: PathBuf,
    w: TraceWriter<File>,
}

impl FileSink {
    fn create(path: &Path) -> Result<FileSink, WriteError> {
        let file = File::create(path)?;
        let created_unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let meta = TraceMeta {
            flags: 0,
            created_unix_ns,
        };
        Ok(FileSink {
            path: path.to_path_buf(),
            w: TraceWriter::new(file, meta)?,
        })
    }

    fn write(&mut self, ev: CaptureEvent) -> Result<(), WriteError> {
        // Workers' clocks are read at different instants; the trace needs time to go forward.
        let at = ev.at().max(self.w.last_timestamp());
        let w = &mut self.w;
        match ev {
            CaptureEvent::Viommu { config: c, .. } => w.write(
                at,
                &Event::ViommuCreate {
                    viommu: c.id,
                    vmid: c.vmid,
                    smmu: c.smmu,
                    profile: c.profile,
                    sidsize: c.sidsize,
                    range_inv: c.range_inv,
                    features: c.features,
                },
            ),
            CaptureEvent::Device {
                device, smmu, psid, ..
            } => w.write(at, &Event::DeviceAdd { device, smmu, psid }),
            CaptureEvent::Bind {
                viommu,
                device,
                vsid,
                ..
            } => w.write(
                at,
                &Event::Bind {
                    viommu,
                    device,
                    vsid,
                },
            ),
            CaptureEvent::Unbind { viommu, device, .. } => {
                w.write(at, &Event::Unbind { viommu, device })
            }
            CaptureEvent::Ring {
                ring,
                viommu,
                log2size,
                ..
            } => w.write(
                at,
                &Event::RingCreate {
                    ring,
                    viommu,
                    log2size,
                },
            ),
            CaptureEvent::Commands {
                ring, slot, cmds, ..
            } => w.write(
                at,
                &Event::Commands {
                    ring,
                    slot,
                    cmds: &cmds,
                },
            ),
            CaptureEvent::Doorbell { ring, prod, .. } => {
                w.write(at, &Event::Doorbell { ring, prod })
            }
            CaptureEvent::Fix {
                ring, slot, cmd, ..
            } => w.write(at, &Event::GuestFix { ring, slot, cmd }),
            CaptureEvent::Ack { ring, .. } => w.write(at, &Event::GuestAck { ring }),
        }
    }
}

impl CaptureSink for FileSink {
    fn record(&mut self, event: CaptureEvent) -> Result<(), CaptureError> {
        self.write(event).map_err(|e| named(&self.path, e))
    }

    fn finish(self: Box<Self>) -> Result<u64, CaptureError> {
        let FileSink { path, w } = *self;
        let records = w.records();
        w.finish_counted().map_err(|e| named(&path, e))?;
        Ok(records)
    }
}
