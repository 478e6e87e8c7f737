//! The standby: the secondary's copy of the VM, built epoch by epoch, all-or-nothing.
//!
//! [`Standby::on_record`] is fed the FT log records of one epoch after another (from the
//! link, a file, a test or a fuzzer — no sockets or clocks in here) and says when an epoch
//! has committed. The secondary's session around it ([`crate::secondary`]) handles the
//! records that are not part of an epoch (Stop, Shutdown) and acknowledges commits.
//!
//! ```text
//!              EpochBegin(k)                 Pages / Event / VcpuState /
//!   Idle ───────────────────────▶ Staging(k) ◀── DeviceState / Output (kept aside)
//!    ▲                                │
//!    │   EpochEnd(k) verified:        │ EpochEnd(k) does not match what was staged,
//!    │   apply pages, keep state,     │ a delta does not apply, a record of another
//!    │   record output: committed k   │ epoch arrives, or EpochBegin(k') interrupts:
//!    └────────────────────────────────┴──▶ discard staging (committed image untouched)
//! ```
//!
//! Epoch 0 (the sync) must carry the pair's protection session (a `Session` record); no
//! other epoch may.
//!
//! Commit is all-or-nothing: every page of the epoch is reconstructed into a staging buffer
//! as it arrives (deltas applied to copies of the committed pages) and hashed, and at
//! `EpochEnd` the epoch's page hash is checked; only then are the pages written into the
//! standby memory. The standby is a [`vmm::memory::GuestMemory`], so a takeover needs no bulk
//! copy. The staging buffer is kept from one epoch to the next: fresh memory costs a page
//! fault per 4 KiB on first touch, which on this project's host cost more than the copy.
use crate::output::OutputLog;
use bytes::Bytes;
use ft_log::record::{EpochEnd, EpochHasher};
use ft_log::{Event, PageData, PageEntry, Record, PAGE_SIZE};
use std::collections::BTreeMap;
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryBackend};
use vmm::memory::GuestMemory;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("epoch {epoch} discarded: {why}")]
    Discarded { epoch: u64, why: String },
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Everything staged for one epoch.
#[derive(Default)]
struct Staging {
    epoch: u64,
    /// The address of every staged page, in arrival order; its content as it will be after
    /// the epoch is `data[i * PAGE_SIZE..][..PAGE_SIZE]`.
    gpas: Vec<u64>,
    data: Vec<u8>,
    /// The staged pages, hashed in arrival order (as the primary hashed them).
    hasher: EpochHasher,
    /// Why a page could not be staged (out of range, or a delta that does not apply): the
    /// epoch is discarded at its end.
    bad: Option<String>,
    events: Vec<Event>,
    vcpus: BTreeMap<u8, Bytes>,
    devices: BTreeMap<u16, Bytes>,
    outputs: Vec<(u8, u64, Bytes)>,
    disk: Vec<(u64, Bytes)>,
    session: Option<u64>,
}

/// The last committed machine state besides memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommittedState {
    pub vcpus: BTreeMap<u8, Bytes>,
    pub devices: BTreeMap<u16, Bytes>,
}

/// The secondary's standby and the epoch it is assembling.
pub struct Standby {
    mem: GuestMemory,
    state: CommittedState,
    committed: Option<u64>,
    /// The protection session, from epoch 0.
    session: Option<u64>,
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
    /// The last staging buffer, for the next epoch (see the module docs).
    spare: Vec<u8>,
}

/// Staging buffers above this are not kept for the next epoch (the sync's epoch 0 can be all
/// of memory; later epochs are far smaller).
const SPARE_MAX: usize = 64 << 20;

impl Staging {
    /// Reconstructs `entries` into the staging buffer.
    fn stage(&mut self, mem: &GuestMemory, entries: Vec<PageEntry>) {
        for e in entries {
            if self.bad.is_some() {
                return;
            }
            let last = GuestAddress(e.gpa.saturating_add(PAGE_SIZE as u64 - 1));
            if !e.gpa.is_multiple_of(PAGE_SIZE as u64) {
                self.bad = Some(format!("page address {:#x} not page-aligned", e.gpa));
                return;
            }
            if !mem.address_in_range(GuestAddress(e.gpa)) || !mem.address_in_range(last) {
                self.bad = Some(format!("page {:#x} outside the standby's memory", e.gpa));
                return;
            }
            let at = self.data.len();
            match &e.data {
                PageData::Raw(b) if b.len() == PAGE_SIZE => self.data.extend_from_slice(b),
                _ => {
                    self.data.resize(at + PAGE_SIZE, 0);
                    let page = &mut self.data[at..];
                    if !matches!(e.data, PageData::Zero | PageData::Raw(_)) {
                        // Deltas and hashes refer to the committed page.
                        mem.read_slice(page, GuestAddress(e.gpa))
                            .expect("page checked in range");
                    }
                    if let Err(err) = e.apply(page) {
                        self.bad = Some(err.to_string());
                        return;
                    }
                }
            }
            self.hasher.add(e.gpa, &self.data[at..]);
            self.gpas.push(e.gpa);
        }
    }
}

fn discard(epoch: u64, why: impl Into<String>) -> Error {
    Error::Discarded {
        epoch,
        why: why.into(),
    }
}

impl Standby {
    /// A standby whose memory is `mem` (zeroed, the size of the primary's guest).
    pub fn new(mem: GuestMemory) -> Self {
        Standby {
            mem,
            state: CommittedState::default(),
            committed: None,
            session: None,
            staging: None,
            output: OutputLog::default(),
            discarded: 0,
            events_committed: 0,
            disk: Vec::new(),
            spare: Vec::new(),
        }
    }

    /// Last committed epoch, if any.
    pub fn committed_epoch(&self) -> Option<u64> {
        self.committed
    }

    /// The protection session the committed epoch 0 named.
    pub fn session(&self) -> Option<u64> {
        self.session
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

    /// Feeds one record; `Some(k)` when it committed epoch `k` (the caller then applies the
    /// epoch's disk writes, [`Standby::take_disk_writes`], and acknowledges). An `Err` means
    /// the epoch being staged was discarded (the committed standby is untouched); the caller
    /// decides whether to keep the link. Records outside epochs (Hello, Heartbeat, Stop,
    /// Shutdown) change nothing here.
    pub fn on_record(&mut self, epoch: u64, rec: Record) -> Result<Option<u64>, Error> {
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
                let mut data = std::mem::take(&mut self.spare);
                data.clear();
                self.staging = Some(Staging {
                    epoch,
                    data,
                    ..Default::default()
                });
                Ok(None)
            }
            Record::EpochEnd(end) => {
                let s = self.take_staging(epoch)?;
                self.commit(s, &end)?;
                Ok(Some(epoch))
            }
            Record::Session { session } => self.with_staging(epoch, |s, _| {
                if s.session.replace(session).is_some() || epoch != 0 {
                    s.bad = Some("a Session record outside epoch 0, or twice".into());
                }
            }),
            Record::Pages(p) => self.with_staging(epoch, |s, mem| s.stage(mem, p)),
            Record::Event(e) => self.with_staging(epoch, |s, _| s.events.push(e)),
            Record::VcpuState { vcpu, state } => self.with_staging(epoch, |s, _| {
                s.vcpus.insert(vcpu, state);
            }),
            Record::DeviceState { device, state } => self.with_staging(epoch, |s, _| {
                s.devices.insert(device, state);
            }),
            Record::Output {
                stream,
                offset,
                data,
            } => self.with_staging(epoch, |s, _| s.outputs.push((stream, offset, data))),
            Record::DiskWrite { offset, data } => {
                self.with_staging(epoch, |s, _| s.disk.push((offset, data)))
            }
            Record::Heartbeat { .. }
            | Record::Hello(_)
            | Record::Shutdown { .. }
            | Record::Stop { .. } => Ok(None),
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
        f: impl FnOnce(&mut Staging, &GuestMemory),
    ) -> Result<Option<u64>, Error> {
        match &mut self.staging {
            Some(s) if s.epoch == epoch => {
                f(s, &self.mem);
                Ok(None)
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
        if let Some(why) = s.bad {
            return fail(self, why);
        }
        if epoch == 0 && s.session.is_none() {
            return fail(self, "epoch 0 does not name its protection session".into());
        }
        if s.gpas.len() != end.pages as usize {
            return fail(
                self,
                format!("{} pages staged, EpochEnd says {}", s.gpas.len(), end.pages),
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
        let mut hasher = s.hasher;
        // The epoch hash covers the disk writes too (see `EpochHasher::fold_disk`).
        if !s.disk.is_empty() {
            let mut d = EpochHasher::new();
            for (offset, data) in &s.disk {
                d.add(*offset, data);
            }
            hasher.fold_disk(&d);
        }
        if hasher.finish() != end.page_hash {
            return fail(self, "page hash differs from EpochEnd".into());
        }
        if let Err(why) = self.output.check(&s.outputs, &end.outputs) {
            return fail(self, why);
        }
        // Verified: apply. The pages were checked in range as they were staged.
        if let Err(why) = vmm::memory::write_pages(&self.mem, &s.gpas, &s.data) {
            return fail(self, why);
        }
        if s.data.capacity() <= SPARE_MAX {
            self.spare = s.data;
        }
        self.state.vcpus.extend(s.vcpus);
        self.state.devices.extend(s.devices);
        self.output.commit(&s.outputs, &end.outputs);
        self.events_committed += s.events.len() as u64;
        self.disk.extend(s.disk);
        if s.session.is_some() {
            self.session = s.session;
        }
        self.committed = Some(epoch);
        Ok(())
    }
}
