//! Record types and their payloads (the frame header carries kind and epoch).
//!
//! Payload layouts, little-endian, `pad` bytes are zero and checked:
//!
//! ```text
//! Hello        min_ver u8 | max_ver u8 | role u8 | vcpus u8 | pad 4 | mem_mib u64 | vm_id [16]
//! EpochBegin   vcpus u8 | pad 7
//! Event        vcpu u8 | tag u8 | pad 2 | seq u32 | body (by tag):
//!                1 PioRead     port u16 | size u8 | pad 1 | value u32
//!                2 MmioRead    addr u64 | size u8 | pad 7 | value u64
//!                3 Interrupt   gsi u32 | level u8 | pad 3
//!                4 DeviceInput device u16 | pad 2 | len u32 | data
//!                5 Clock       source u8 | pad 7 | value u64
//!                6 Entropy     len u32 | data
//! Pages        count u32 | count × page entry (see `page.rs`)
//! VcpuState    vcpu u8 | pad 3 | len u32 | data
//! DeviceState  device u16 | pad 2 | len u32 | data
//! Output       stream u8 | pad 7 | offset u64 | len u32 | data       (offset: cumulative, of data[0])
//! EpochEnd     pages u32 | events u32 | page_hash u64 | n u16 | pad 6 | n × (stream u8 | pad 7 | end u64)
//! Ack          (empty)
//! Heartbeat    seq u64 | sent_us u64
//! Shutdown     code u8 | pad 7        (the guest ended with `code` after this epoch: no takeover)
//! Stop         off u8 | pad 7         (FT suspended, or turned off if off = 1: exit, no takeover)
//! DiskWrite    offset u64 | len u32 | data   (the guest wrote `data` to its disk at byte
//!                                             `offset`; both multiples of 512, len > 0;
//!                                             applied to the secondary's disk on commit)
//! Session      session u64            (epoch 0 only, right after EpochBegin: the protection
//!                                      session this pair belongs to — the number the
//!                                      secondary arbitrates for if it loses its primary)
//! ```
//!
//! `Event::vcpu` is [`NO_VCPU`] for an input no vCPU caused (an interrupt, device input).
//! `DeviceState::device` is one of the ids in [`crate::device`].
use crate::frame::{self, Frame, MAX_PAYLOAD};
use crate::page::{PageEntry, ENTRY_HEADER};
use crate::{corrupt, Error};
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Record kinds; `Invalid = 0` is reserved and never sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    Invalid = 0,
    Hello = 1,
    EpochBegin = 2,
    Event = 3,
    Pages = 4,
    VcpuState = 5,
    DeviceState = 6,
    Output = 7,
    EpochEnd = 8,
    Ack = 9,
    Heartbeat = 10,
    Shutdown = 11,
    Stop = 12,
    DiskWrite = 13,
    Session = 14,
}

impl RecordKind {
    fn from_u8(v: u8) -> Result<Self, Error> {
        use RecordKind::*;
        Ok(match v {
            1 => Hello,
            2 => EpochBegin,
            3 => Event,
            4 => Pages,
            5 => VcpuState,
            6 => DeviceState,
            7 => Output,
            8 => EpochEnd,
            9 => Ack,
            10 => Heartbeat,
            11 => Shutdown,
            12 => Stop,
            13 => DiskWrite,
            14 => Session,
            0 => return Err(corrupt("record kind 0 (Invalid)")),
            k => return Err(Error::Unsupported(format!("record kind {k}"))),
        })
    }
}

/// Which side sent a `Hello`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary = 1,
    Secondary = 2,
}

/// First record each way: versions and the VM both sides must agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub min_version: u8,
    pub max_version: u8,
    pub role: Role,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub vm_id: [u8; 16],
}

/// One nondeterministic input the primary's VMM handed its guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub vcpu: u8,
    /// Order of the event within its epoch.
    pub seq: u32,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    PioRead { port: u16, size: u8, value: u32 },
    MmioRead { addr: u64, size: u8, value: u64 },
    Interrupt { gsi: u32, level: bool },
    DeviceInput { device: u16, data: Bytes },
    Clock { source: u8, value: u64 },
    Entropy { data: Bytes },
}

/// The close of an epoch: what the secondary must have received to commit it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochEnd {
    pub pages: u32,
    pub events: u32,
    /// xxh3 over (gpa, page content) of the epoch's pages in order (see `EpochHasher`);
    /// if the epoch has disk writes, then also over (`u64::MAX`, the xxh3 of their
    /// (offset, data) in order), so pages and disk writes may interleave on the wire.
    pub page_hash: u64,
    /// Cumulative end offset of each output stream after this epoch.
    pub outputs: Vec<(u8, u64)>,
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Hello(Hello),
    EpochBegin {
        vcpus: u8,
    },
    Event(Event),
    Pages(Vec<PageEntry>),
    VcpuState {
        vcpu: u8,
        state: Bytes,
    },
    DeviceState {
        device: u16,
        state: Bytes,
    },
    Output {
        stream: u8,
        offset: u64,
        data: Bytes,
    },
    EpochEnd(EpochEnd),
    Ack,
    Heartbeat {
        seq: u64,
        sent_us: u64,
    },
    /// The guest ended with this exit code; the protected VM is gone, nothing to take over.
    Shutdown {
        code: u8,
    },
    /// The primary stops replicating on purpose (Suspend FT, or Turn Off FT when `off`): the
    /// secondary exits without taking over.
    Stop {
        off: bool,
    },
    /// A guest write to its disk (whole 512-byte sectors), part of the epoch.
    DiskWrite {
        offset: u64,
        data: Bytes,
    },
    /// The protection session of this pair (epoch 0 only).
    Session {
        session: u64,
    },
}

/// `Event::vcpu` of an event no vCPU caused (an interrupt, device input).
pub const NO_VCPU: u8 = u8::MAX;

/// Bounds-checked reader over a payload.
struct Reader(Bytes);

impl Reader {
    fn need(&self, n: usize, what: &str) -> Result<(), Error> {
        if self.0.remaining() < n {
            return Err(corrupt(format!("{what} truncated")));
        }
        Ok(())
    }
    fn u8(&mut self, what: &str) -> Result<u8, Error> {
        self.need(1, what)?;
        Ok(self.0.get_u8())
    }
    fn u16(&mut self, what: &str) -> Result<u16, Error> {
        self.need(2, what)?;
        Ok(self.0.get_u16_le())
    }
    fn u32(&mut self, what: &str) -> Result<u32, Error> {
        self.need(4, what)?;
        Ok(self.0.get_u32_le())
    }
    fn u64(&mut self, what: &str) -> Result<u64, Error> {
        self.need(8, what)?;
        Ok(self.0.get_u64_le())
    }
    fn pad(&mut self, n: usize, what: &str) -> Result<(), Error> {
        self.need(n, what)?;
        if self.0[..n].iter().any(|b| *b != 0) {
            return Err(corrupt(format!("{what}: padding not zero")));
        }
        self.0.advance(n);
        Ok(())
    }
    /// `len u32 | data`, zero-copy.
    fn blob(&mut self, what: &str) -> Result<Bytes, Error> {
        let len = self.u32(what)? as usize;
        self.need(len, what)?;
        Ok(self.0.split_to(len))
    }
    fn finish(self, what: &str) -> Result<(), Error> {
        if self.0.has_remaining() {
            return Err(corrupt(format!(
                "{what}: {} trailing bytes",
                self.0.remaining()
            )));
        }
        Ok(())
    }
}

fn put_blob(out: &mut BytesMut, data: &[u8]) {
    out.put_u32_le(data.len() as u32);
    out.put_slice(data);
}

impl Record {
    pub fn kind(&self) -> RecordKind {
        match self {
            Record::Hello(_) => RecordKind::Hello,
            Record::EpochBegin { .. } => RecordKind::EpochBegin,
            Record::Event(_) => RecordKind::Event,
            Record::Pages(_) => RecordKind::Pages,
            Record::VcpuState { .. } => RecordKind::VcpuState,
            Record::DeviceState { .. } => RecordKind::DeviceState,
            Record::Output { .. } => RecordKind::Output,
            Record::EpochEnd(_) => RecordKind::EpochEnd,
            Record::Ack => RecordKind::Ack,
            Record::Heartbeat { .. } => RecordKind::Heartbeat,
            Record::Shutdown { .. } => RecordKind::Shutdown,
            Record::Stop { .. } => RecordKind::Stop,
            Record::DiskWrite { .. } => RecordKind::DiskWrite,
            Record::Session { .. } => RecordKind::Session,
        }
    }

    /// The record's payload bytes.
    pub fn payload(&self) -> BytesMut {
        let mut p = BytesMut::new();
        match self {
            Record::Hello(h) => {
                p.put_u8(h.min_version);
                p.put_u8(h.max_version);
                p.put_u8(h.role as u8);
                p.put_u8(h.vcpus);
                p.put_u32_le(0);
                p.put_u64_le(h.mem_mib);
                p.put_slice(&h.vm_id);
            }
            Record::EpochBegin { vcpus } => {
                p.put_u8(*vcpus);
                p.put_bytes(0, 7);
            }
            Record::Event(e) => {
                let tag = match e.kind {
                    EventKind::PioRead { .. } => 1,
                    EventKind::MmioRead { .. } => 2,
                    EventKind::Interrupt { .. } => 3,
                    EventKind::DeviceInput { .. } => 4,
                    EventKind::Clock { .. } => 5,
                    EventKind::Entropy { .. } => 6,
                };
                p.put_u8(e.vcpu);
                p.put_u8(tag);
                p.put_u16_le(0);
                p.put_u32_le(e.seq);
                match &e.kind {
                    EventKind::PioRead { port, size, value } => {
                        p.put_u16_le(*port);
                        p.put_u8(*size);
                        p.put_u8(0);
                        p.put_u32_le(*value);
                    }
                    EventKind::MmioRead { addr, size, value } => {
                        p.put_u64_le(*addr);
                        p.put_u8(*size);
                        p.put_bytes(0, 7);
                        p.put_u64_le(*value);
                    }
                    EventKind::Interrupt { gsi, level } => {
                        p.put_u32_le(*gsi);
                        p.put_u8(*level as u8);
                        p.put_bytes(0, 3);
                    }
                    EventKind::DeviceInput { device, data } => {
                        p.put_u16_le(*device);
                        p.put_u16_le(0);
                        put_blob(&mut p, data);
                    }
                    EventKind::Clock { source, value } => {
                        p.put_u8(*source);
                        p.put_bytes(0, 7);
                        p.put_u64_le(*value);
                    }
                    EventKind::Entropy { data } => put_blob(&mut p, data),
                }
            }
            Record::Pages(entries) => {
                p.put_u32_le(entries.len() as u32);
                for e in entries {
                    e.encode(&mut p);
                }
            }
            Record::VcpuState { vcpu, state } => {
                p.put_u8(*vcpu);
                p.put_bytes(0, 3);
                put_blob(&mut p, state);
            }
            Record::DeviceState { device, state } => {
                p.put_u16_le(*device);
                p.put_u16_le(0);
                put_blob(&mut p, state);
            }
            Record::Output {
                stream,
                offset,
                data,
            } => {
                p.put_u8(*stream);
                p.put_bytes(0, 7);
                p.put_u64_le(*offset);
                put_blob(&mut p, data);
            }
            Record::EpochEnd(e) => {
                p.put_u32_le(e.pages);
                p.put_u32_le(e.events);
                p.put_u64_le(e.page_hash);
                p.put_u16_le(e.outputs.len() as u16);
                p.put_bytes(0, 6);
                for (s, end) in &e.outputs {
                    p.put_u8(*s);
                    p.put_bytes(0, 7);
                    p.put_u64_le(*end);
                }
            }
            Record::Ack => {}
            Record::Heartbeat { seq, sent_us } => {
                p.put_u64_le(*seq);
                p.put_u64_le(*sent_us);
            }
            Record::Shutdown { code } => {
                p.put_u8(*code);
                p.put_bytes(0, 7);
            }
            Record::Stop { off } => {
                p.put_u8(*off as u8);
                p.put_bytes(0, 7);
            }
            Record::DiskWrite { offset, data } => {
                p.put_u64_le(*offset);
                put_blob(&mut p, data);
            }
            Record::Session { session } => p.put_u64_le(*session),
        }
        p
    }

    /// Appends the record as one frame of `epoch`.
    ///
    /// # Panics
    /// If the payload exceeds [`MAX_PAYLOAD`]; use [`encode_pages`] for page batches.
    pub fn encode(&self, epoch: u64, out: &mut BytesMut) {
        frame::encode(self.kind() as u8, epoch, &self.payload(), out);
    }

    /// Parses a frame's payload; returns `(epoch, record)`.
    pub fn decode(f: &Frame) -> Result<(u64, Record), Error> {
        let kind = RecordKind::from_u8(f.kind)?;
        let mut r = Reader(f.payload.clone());
        let rec = match kind {
            RecordKind::Invalid => unreachable!("from_u8 refuses 0"),
            RecordKind::Hello => {
                let min_version = r.u8("hello")?;
                let max_version = r.u8("hello")?;
                let role = match r.u8("hello")? {
                    1 => Role::Primary,
                    2 => Role::Secondary,
                    x => return Err(corrupt(format!("hello: role {x}"))),
                };
                let vcpus = r.u8("hello")?;
                r.pad(4, "hello")?;
                let mem_mib = r.u64("hello")?;
                r.need(16, "hello")?;
                let mut vm_id = [0u8; 16];
                r.0.copy_to_slice(&mut vm_id);
                Record::Hello(Hello {
                    min_version,
                    max_version,
                    role,
                    vcpus,
                    mem_mib,
                    vm_id,
                })
            }
            RecordKind::EpochBegin => {
                let vcpus = r.u8("epoch begin")?;
                r.pad(7, "epoch begin")?;
                Record::EpochBegin { vcpus }
            }
            RecordKind::Event => {
                let vcpu = r.u8("event")?;
                let tag = r.u8("event")?;
                r.pad(2, "event")?;
                let seq = r.u32("event")?;
                let kind = match tag {
                    1 => {
                        let port = r.u16("pio event")?;
                        let size = r.u8("pio event")?;
                        r.pad(1, "pio event")?;
                        EventKind::PioRead {
                            port,
                            size,
                            value: r.u32("pio event")?,
                        }
                    }
                    2 => {
                        let addr = r.u64("mmio event")?;
                        let size = r.u8("mmio event")?;
                        r.pad(7, "mmio event")?;
                        EventKind::MmioRead {
                            addr,
                            size,
                            value: r.u64("mmio event")?,
                        }
                    }
                    3 => {
                        let gsi = r.u32("interrupt event")?;
                        let level = match r.u8("interrupt event")? {
                            0 => false,
                            1 => true,
                            x => return Err(corrupt(format!("interrupt level {x}"))),
                        };
                        r.pad(3, "interrupt event")?;
                        EventKind::Interrupt { gsi, level }
                    }
                    4 => {
                        let device = r.u16("device input")?;
                        r.pad(2, "device input")?;
                        EventKind::DeviceInput {
                            device,
                            data: r.blob("device input")?,
                        }
                    }
                    5 => {
                        let source = r.u8("clock event")?;
                        r.pad(7, "clock event")?;
                        EventKind::Clock {
                            source,
                            value: r.u64("clock event")?,
                        }
                    }
                    6 => EventKind::Entropy {
                        data: r.blob("entropy event")?,
                    },
                    t => return Err(Error::Unsupported(format!("event tag {t}"))),
                };
                Record::Event(Event { vcpu, seq, kind })
            }
            RecordKind::Pages => {
                let count = r.u32("pages")? as usize;
                // Bound the allocation by what the payload can hold.
                if count > r.0.remaining() / ENTRY_HEADER {
                    return Err(corrupt(format!(
                        "pages: {count} entries cannot fit in {} bytes",
                        r.0.remaining()
                    )));
                }
                let mut entries = Vec::with_capacity(count);
                for _ in 0..count {
                    entries.push(PageEntry::decode(&mut r.0)?);
                }
                Record::Pages(entries)
            }
            RecordKind::VcpuState => {
                let vcpu = r.u8("vcpu state")?;
                r.pad(3, "vcpu state")?;
                Record::VcpuState {
                    vcpu,
                    state: r.blob("vcpu state")?,
                }
            }
            RecordKind::DeviceState => {
                let device = r.u16("device state")?;
                r.pad(2, "device state")?;
                Record::DeviceState {
                    device,
                    state: r.blob("device state")?,
                }
            }
            RecordKind::Output => {
                let stream = r.u8("output")?;
                r.pad(7, "output")?;
                let offset = r.u64("output")?;
                let data = r.blob("output")?;
                if offset.checked_add(data.len() as u64).is_none() {
                    return Err(corrupt("output offset overflows"));
                }
                Record::Output {
                    stream,
                    offset,
                    data,
                }
            }
            RecordKind::EpochEnd => {
                let pages = r.u32("epoch end")?;
                let events = r.u32("epoch end")?;
                let page_hash = r.u64("epoch end")?;
                let n = r.u16("epoch end")? as usize;
                r.pad(6, "epoch end")?;
                if n > r.0.remaining() / 16 {
                    return Err(corrupt("epoch end: output count exceeds payload"));
                }
                let mut outputs = Vec::with_capacity(n);
                for _ in 0..n {
                    let s = r.u8("epoch end output")?;
                    r.pad(7, "epoch end output")?;
                    outputs.push((s, r.u64("epoch end output")?));
                }
                Record::EpochEnd(EpochEnd {
                    pages,
                    events,
                    page_hash,
                    outputs,
                })
            }
            RecordKind::Ack => Record::Ack,
            RecordKind::Heartbeat => {
                let seq = r.u64("heartbeat")?;
                Record::Heartbeat {
                    seq,
                    sent_us: r.u64("heartbeat")?,
                }
            }
            RecordKind::Shutdown => {
                let code = r.u8("shutdown")?;
                r.pad(7, "shutdown")?;
                Record::Shutdown { code }
            }
            RecordKind::Stop => {
                let off = match r.u8("stop")? {
                    0 => false,
                    1 => true,
                    x => return Err(corrupt(format!("stop: flag {x}"))),
                };
                r.pad(7, "stop")?;
                Record::Stop { off }
            }
            RecordKind::DiskWrite => {
                let offset = r.u64("disk write")?;
                let data = r.blob("disk write")?;
                if offset % 512 != 0 || data.is_empty() || data.len() % 512 != 0 {
                    return Err(corrupt(format!(
                        "disk write of {} bytes at {offset}: not whole 512-byte sectors",
                        data.len()
                    )));
                }
                Record::DiskWrite { offset, data }
            }
            RecordKind::Session => Record::Session {
                session: r.u64("session")?,
            },
        };
        r.finish(&format!("{kind:?}"))?;
        Ok((f.epoch, rec))
    }
}

/// Appends `entries` as as many `Pages` frames of `epoch` as needed to respect
/// [`MAX_PAYLOAD`]; returns the number of frames.
pub fn encode_pages(entries: &[PageEntry], epoch: u64, out: &mut BytesMut) -> usize {
    let budget = MAX_PAYLOAD as usize - 4;
    let mut frames = 0;
    let mut start = 0;
    while start < entries.len() {
        let mut size = 0;
        let mut end = start;
        while end < entries.len() && size + entries[end].encoded_len() <= budget {
            size += entries[end].encoded_len();
            end += 1;
        }
        Record::Pages(entries[start..end].to_vec()).encode(epoch, out);
        frames += 1;
        start = end;
    }
    frames
}

/// Running xxh3 over the pages of an epoch, in the order they are sent: both sides compute it,
/// the secondary compares with `EpochEnd::page_hash` before committing.
///
/// An epoch with disk writes hashes them apart, in their order, with a second `EpochHasher`
/// (`add(offset, data)` per write), and folds that into the page hash once, after the pages
/// ([`EpochHasher::fold_disk`]): pages and disk writes may then interleave on the wire. An
/// epoch without disk writes folds nothing (not even an empty disk hash).
#[derive(Default)]
pub struct EpochHasher(xxhash_rust::xxh3::Xxh3);

impl EpochHasher {
    pub fn new() -> Self {
        EpochHasher::default()
    }
    /// Adds one page as it will be after the epoch is applied.
    pub fn add(&mut self, gpa: u64, page: &[u8]) {
        self.0.update(&gpa.to_le_bytes());
        self.0.update(page);
    }
    pub fn finish(&self) -> u64 {
        self.0.digest()
    }
    /// Folds the hash of the epoch's disk writes in (see the type's docs): as a page at
    /// address `u64::MAX` whose content is the disk hash, little-endian.
    pub fn fold_disk(&mut self, disk: &EpochHasher) {
        self.add(u64::MAX, &disk.finish().to_le_bytes());
    }
}
