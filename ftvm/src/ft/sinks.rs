//! Where a protected VM's output goes: the console (`--serial-out` file, or stdout) and the
//! tap. Output reaches them only through [`Sinks::write`], which makes the ownership check
//! and the writes one step under the datastore's lock ([`ft_core::datastore::fenced`]); see
//! the [module docs](super) for why that makes each sink safe against a paused process.
use super::datastore::Datastore;
use anyhow::Result;
use ft_core::datastore::Name;
use ft_core::primary::Held;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Guest console output collected by the serial device, held until the core takes it.
#[derive(Clone, Default)]
pub struct HeldOutput(Arc<Mutex<(Vec<u8>, Option<Instant>)>>);

impl Write for HeldOutput {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut g = self.0.lock().unwrap();
        if g.0.is_empty() && !b.is_empty() {
            g.1 = Some(Instant::now());
        }
        g.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl HeldOutput {
    /// The output, and when its first byte left the guest.
    pub fn take_timed(&self) -> (Vec<u8>, Option<Instant>) {
        let mut g = self.0.lock().unwrap();
        (std::mem::take(&mut g.0), g.1.take())
    }
    pub fn is_empty(&self) -> bool {
        self.0.lock().unwrap().0.is_empty()
    }
}

/// The console: an append-only file (measurable at a takeover) or stdout.
pub struct Console {
    out: Box<dyn Write + Send>,
    path: Option<PathBuf>,
}

impl Console {
    pub fn open(path: Option<&std::path::Path>) -> Result<Self> {
        Ok(Console {
            out: crate::serial_sink(path)?,
            path: path.map(|p| p.to_path_buf()),
        })
    }

    /// How many bytes the file holds (None: stdout, which cannot be measured).
    pub fn len(&self) -> Option<u64> {
        let p = self.path.as_ref()?;
        Some(std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
    }

    pub fn write(&mut self, b: &[u8]) -> std::io::Result<()> {
        if b.is_empty() {
            return Ok(());
        }
        self.out.write_all(b)?;
        self.out.flush()
    }
}

/// A VM's sinks, written only under the fence.
pub struct Sinks {
    pub console: Console,
    pub tap: Option<Arc<std::fs::File>>,
}

impl Sinks {
    /// Writes `held` (console bytes, then frames) if `me` owns the VM in protection session
    /// `session` at this moment, under the datastore's lock. `Ok(false)`: fenced off — this
    /// process no longer owns the VM and wrote nothing; it must halt.
    pub fn write(&mut self, ds: &Datastore, session: u64, me: &Name, held: &Held) -> Result<bool> {
        if held.output.is_empty() && held.frames.is_empty() {
            return Ok(true);
        }
        let written = ft_core::datastore::fenced(ds, session, me, || {
            if let Err(e) = self.console.write(&held.output) {
                tracing::warn!("releasing guest output failed: {e}");
            }
            if let Some(tap) = &self.tap {
                for f in held.frames.iter() {
                    vmm::devices::tap::write_frame(tap, f);
                }
            }
        })?;
        Ok(written.is_some())
    }
}
