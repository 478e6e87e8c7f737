//! The secondary side of a protected pair, as a sans-IO state machine.
//!
//! [`Secondary::on_record`] is fed the FT log records in order (from the link, a file, a test
//! or a fuzzer — no sockets or clocks in here) and answers with what to send back.
//!
//! ```text
//!              EpochBegin(k)                 Pages / Event / VcpuState /
//!   Idle ───────────────────────▶ Staging(k) ◀── DeviceState / Output (kept aside)
//!    ▲                                │
//!    │   EpochEnd(k) verified:        │ EpochEnd(k) does not match what was staged,
//!    │   apply pages, keep state,     │ a delta does not apply, a record of another
//!    │   record output, Ack(k)        │ epoch arrives, or EpochBegin(k') interrupts:
//!    └────────────────────────────────┴──▶ discard staging (committed image untouched)
//! ```
//!
//! Commit is all-or-nothing: every page of the epoch is first reconstructed into a staging
//! buffer (deltas applied to copies of the committed pages) and the epoch's page hash checked
//! against `EpochEnd`; only then are the pages written into the standby memory. The standby is
//! a [`vmm::memory::GuestMemory`], so a takeover needs no bulk copy.
use bytes::Bytes;
use ft_log::record::{EpochEnd, EpochHasher};
use ft_log::{Event, PageData, PageEntry, Record, PAGE_SIZE};
use std::collections::BTreeMap;
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryBackend};
use vmm::memory::GuestMemory;

pub mod output;
pub use output::OutputLog;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("epoch {epoch} discarded: {why}")]
    Discarded { epoch: u64, why: String },
    #[error("protocol: {0}")]
    Protocol(String),
}

/// What the secondary wants sent back or done after a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Acknowledge this committed epoch to the primary. The caller first applies the
    /// epoch's disk writes ([`Secondary::take_disk_writes`]) to its disk copy.
    Ack(u64),
}

/// Everything staged for one epoch.
#[derive(Debug, Default)]
struct Staging {
    epoch: u64,
    pages: Vec<PageEntry>,
    events: Vec<Event>,
    vcpus: BTreeMap<u8, Bytes>,
    devices: BTreeMap<u16, Bytes>,
    outputs: Vec<(u8, u64, Bytes)>,
    disk: Vec<(u64, Bytes)>,
}

/// The last committed machine state besides memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommittedState {
    pub vcpus: BTreeMap<u8, Bytes>,
    pub devices: BTreeMap<u16, Bytes>,
}

/// The secondary's standby and the epoch it is assembling.
pub struct Secondary {
    mem: GuestMemory,
    state: CommittedState,
    committed: Option<u64>,
    staging: Option<Staging>,
    output: OutputLog,
    /// Epochs discarded so far (for status).
    pub discarded: u64,
    /// Device-input events in the epochs committed so far. The committed vCPU and device
    /// state already reflect them (the epoch is a checkpoint); they are verified by count
    /// against `EpochEnd` and kept for a replaying consumer.
    pub events_committed: u64,
    /// Disk writes of committed epochs, in order, not yet taken by the caller.
    disk: Vec<(u64, Bytes)>,
}

fn discard(epoch: u64, why: impl Into<String>) -> Error {
    Error::Discarded {
        epoch,
        why: why.into(),
    }
}

impl Secondary {
    /// A secondary whose standby memory is `mem` (zeroed, the size of the primary's guest).
    pub fn new(mem: GuestMemory) -> Self {
        Secondary {
            mem,
            state: CommittedState::default(),
            committed: None,
            staging: None,
            output: OutputLog::default(),
            discarded: 0,
            events_committed: 0,
            disk: Vec::new(),
        }
    }

    /// Last committed epoch, if any.
    pub fn committed_epoch(&self) -> Option<u64> {
        self.committed
    }

    /// The committed standby memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// Gives up the standby memory (for a takeover: the new VM runs on it directly).
    pub fn into_memory(self) -> GuestMemory {
        self.mem
    }

    /// The committed vCPU and device state.
    pub fn state(&self) -> &CommittedState {
        &self.state
    }

    /// The guest's disk writes of the epochs committed since the last call, in order (offset,
    /// data): apply them to this side's disk copy before acknowledging.
    pub fn take_disk_writes(&mut self) -> Vec<(u64, Bytes)> {
        std::mem::take(&mut self.disk)
    }

    /// Committed output.
    pub fn output(&self) -> &OutputLog {
        &self.output
    }

    /// Feeds one record. An `Err` means the epoch being staged was discarded (the committed
    /// standby is untouched); the caller decides whether to keep the link.
    pub fn on_record(&mut self, epoch: u64, rec: Record) -> Result<Vec<Action>, Error> {
        match rec {
            Record::EpochBegin { .. } => {
                let expected = self.committed.map_or(0, |c| c + 1);
                if let Some(s) = self.staging.take() {
                    self.discarded += 1;
                    tracing::warn!(
                        epoch = s.epoch,
                        "epoch torn: a new epoch began before it ended"
                    );
                }
                if epoch != expected {
                    return Err(Error::Protocol(format!(
                        "epoch {epoch} begins, expected {expected}"
                    )));
                }
                self.staging = Some(Staging {
                    epoch,
                    ..Default::default()
                });
                Ok(vec![])
            }
            Record::EpochEnd(end) => {
                let s = self.take_staging(epoch)?;
                self.commit(s, &end)?;
                Ok(vec![Action::Ack(epoch)])
            }
            Record::Pages(p) => self.with_staging(epoch, |s| s.pages.extend(p)),
            Record::Event(e) => self.with_staging(epoch, |s| s.events.push(e)),
            Record::VcpuState { vcpu, state } => self.with_staging(epoch, |s| {
                s.vcpus.insert(vcpu, state);
            }),
            Record::DeviceState { device, state } => self.with_staging(epoch, |s| {
                s.devices.insert(device, state);
            }),
            Record::Output {
                stream,
                offset,
                data,
            } => self.with_staging(epoch, |s| s.outputs.push((stream, offset, data))),
            Record::DiskWrite { offset, data } => {
                self.with_staging(epoch, |s| s.disk.push((offset, data)))
            }
            Record::Heartbeat { .. }
            | Record::Hello(_)
            | Record::Shutdown { .. }
            | Record::Stop { .. } => Ok(vec![]),
            Record::Ack => Err(Error::Protocol("Ack sent to the secondary".into())),
        }
    }

    fn take_staging(&mut self, epoch: u64) -> Result<Staging, Error> {
        match self.staging.take() {
            Some(s) if s.epoch == epoch => Ok(s),
            Some(s) => {
                self.discarded += 1;
                Err(discard(
                    s.epoch,
                    format!("record of epoch {epoch} arrived while staging {}", s.epoch),
                ))
            }
            None => Err(discard(epoch, "EpochEnd without EpochBegin")),
        }
    }

    fn with_staging(
        &mut self,
        epoch: u64,
        f: impl FnOnce(&mut Staging),
    ) -> Result<Vec<Action>, Error> {
        match &mut self.staging {
            Some(s) if s.epoch == epoch => {
                f(s);
                Ok(vec![])
            }
            _ => {
                let s = self.take_staging(epoch).err();
                Err(s.unwrap_or_else(|| discard(epoch, "record outside its epoch")))
            }
        }
    }

    /// Verifies `s` completely, then applies it.
    fn commit(&mut self, s: Staging, end: &EpochEnd) -> Result<(), Error> {
        let epoch = s.epoch;
        let fail = |this: &mut Self, why: String| {
            this.discarded += 1;
            Err(discard(epoch, why))
        };
        if s.pages.len() != end.pages as usize {
            return fail(
                self,
                format!(
                    "{} pages staged, EpochEnd says {}",
                    s.pages.len(),
                    end.pages
                ),
            );
        }
        if s.events.len() != end.events as usize {
            return fail(
                self,
                format!(
                    "{} events staged, EpochEnd says {}",
                    s.events.len(),
                    end.events
                ),
            );
        }
        // Reconstruct every page off to the side.
        let mut hasher = EpochHasher::new();
        let mut staged: Vec<(u64, Box<[u8; PAGE_SIZE]>)> = Vec::with_capacity(s.pages.len());
        for e in &s.pages {
            let mut page = Box::new([0u8; PAGE_SIZE]);
            let last = GuestAddress(e.gpa.saturating_add(PAGE_SIZE as u64 - 1));
            if !self.mem.address_in_range(GuestAddress(e.gpa)) || !self.mem.address_in_range(last) {
                return fail(
                    self,
                    format!("page {:#x} outside the standby's memory", e.gpa),
                );
            }
            if !matches!(e.data, PageData::Zero | PageData::Raw(_)) {
                // Deltas and hashes refer to the committed page.
                self.mem
                    .read_slice(&mut page[..], GuestAddress(e.gpa))
                    .expect("page checked in range");
            }
            if let Err(err) = e.apply(&mut page[..]) {
                return fail(self, err.to_string());
            }
            hasher.add(e.gpa, &page[..]);
            staged.push((e.gpa, page));
        }
        // The epoch hash covers the disk writes too: their own hash, in order, folded in
        // after the pages (see `ft_log::record::EpochEnd::page_hash`).
        if !s.disk.is_empty() {
            let mut d = EpochHasher::new();
            for (offset, data) in &s.disk {
                d.add(*offset, data);
            }
            hasher.add(u64::MAX, &d.finish().to_le_bytes());
        }
        if hasher.finish() != end.page_hash {
            return fail(self, "page hash differs from EpochEnd".into());
        }
        if let Err(why) = self.output.check(&s.outputs, &end.outputs) {
            return fail(self, why);
        }
        // Verified: apply. Writes to in-range pages of our own memory cannot fail.
        for (gpa, page) in &staged {
            self.mem
                .write_slice(&page[..], GuestAddress(*gpa))
                .expect("page checked in range");
        }
        self.state.vcpus.extend(s.vcpus);
        self.state.devices.extend(s.devices);
        self.output.commit(&s.outputs, &end.outputs);
        self.events_committed += s.events.len() as u64;
        self.disk.extend(s.disk);
        self.committed = Some(epoch);
        Ok(())
    }
}
