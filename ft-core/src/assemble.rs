//! Epoch assembly: one epoch's records in the order the secondary stages them (see
//! [`ft_log`]'s stream diagram), with the epoch hash both sides compute.
//!
//! ```text
//! EpochBegin (unless the sync's pre-copy rounds opened epoch 0 already)
//! Pages*                 the pages changed since sent
//! DiskWrite*             the guest's disk writes, in order
//! VcpuState*             per vCPU
//! DeviceState KVM, VMM   and EXIT (1 byte) if the guest ended in this epoch
//! Event*                 the device inputs the guest saw, in order (seq from 0)
//! Output stream 0        the console bytes (if any), at their stream offset
//! Output stream 1        the transmitted frames in stream form (if the VM has a network
//!                        device and sent any)
//! EpochEnd               page count, events, epoch hash, each stream's end offset
//! ```
use bytes::{Bytes, BytesMut};
use ft_log::frames::NET_STREAM;
use ft_log::record::{encode_pages, EpochEnd, EpochHasher};
use ft_log::{device, PageEntry, Record, NO_VCPU};
use vmm::devices::events::DeviceEvent;

/// One captured epoch, as the driver hands it to [`crate::primary::Primary::assemble`].
pub struct EpochParts<'a> {
    pub epoch: u64,
    /// The pages taken at the pause (dirty, or every page of each written chunk) and their
    /// contents back to back.
    pub pages: &'a [u64],
    pub data: &'a Bytes,
    /// Send only the pages whose content changed since sent (chunk tracking).
    pub changed_only: bool,
    /// Each vCPU's state blob.
    pub vcpus: &'a [(u8, Bytes)],
    /// The VM's KVM-level state and the VMM's devices' state.
    pub kvm: Bytes,
    pub vmm: Bytes,
    /// The device inputs the guest saw during the epoch, in order.
    pub events: &'a [DeviceEvent],
    /// The guest ended in this epoch with this code.
    pub exit: Option<u8>,
    /// The guest's disk writes during the epoch, in order.
    pub disk: Vec<(u64, Bytes)>,
    /// The console output and the stream offset of its first byte.
    pub output: Bytes,
    pub offset: u64,
    /// The frames transmitted (None: the VM has no network device).
    pub frames: Option<&'a [Vec<u8>]>,
}

/// What the sync's pre-copy rounds already sent of epoch 0, and the streams' positions.
pub(crate) struct Continued {
    pub begun: bool,
    pub pages: u32,
    pub hasher: EpochHasher,
    pub disk: Option<EpochHasher>,
    /// The console stream's end after this epoch.
    pub out_end: u64,
    /// The network stream's offset before this epoch.
    pub net_at: u64,
}

/// A recorded device input as an FT-log event.
pub fn log_event(seq: u32, e: &DeviceEvent) -> ft_log::Event {
    use ft_log::record::EventKind;
    let (vcpu, kind) = match *e {
        DeviceEvent::PioRead {
            vcpu,
            port,
            size,
            value,
        } => (vcpu, EventKind::PioRead { port, size, value }),
        DeviceEvent::MmioRead {
            vcpu,
            addr,
            size,
            value,
        } => (vcpu, EventKind::MmioRead { addr, size, value }),
        DeviceEvent::Interrupt { gsi } => (NO_VCPU, EventKind::Interrupt { gsi, level: true }),
        DeviceEvent::DeviceInput { device, ref data } => (
            NO_VCPU,
            EventKind::DeviceInput {
                device,
                data: Bytes::copy_from_slice(data),
            },
        ),
    };
    ft_log::Event { vcpu, seq, kind }
}

/// Appends the epoch's frames (see the module docs); returns (frames, network-stream end).
pub(crate) fn encode_epoch(
    parts: &EpochParts<'_>,
    entries: &[PageEntry],
    c: Continued,
    b: &mut BytesMut,
) -> (u64, u64) {
    let epoch = parts.epoch;
    let Continued {
        begun,
        pages: pre_pages,
        mut hasher,
        disk: mut disk_hasher,
        out_end,
        net_at,
    } = c;
    // At once, so that an allocation the link has let go of is taken back whole, not grown
    // piecemeal.
    b.reserve(entries.len() * (ft_log::PAGE_SIZE + 32) + 4096);
    let mut frames = 0u64;
    let mut rec = |r: Record, b: &mut BytesMut| {
        r.encode(epoch, b);
        frames += 1;
    };
    if !begun {
        rec(
            Record::EpochBegin {
                vcpus: parts.vcpus.len() as u8,
            },
            b,
        );
    }
    let page_frames = encode_pages(entries, epoch, b) as u64;
    for (offset, data) in &parts.disk {
        disk_hasher
            .get_or_insert_with(EpochHasher::new)
            .add(*offset, data);
        rec(
            Record::DiskWrite {
                offset: *offset,
                data: data.clone(),
            },
            b,
        );
    }
    if let Some(d) = &disk_hasher {
        hasher.fold_disk(d);
    }
    for (vcpu, state) in parts.vcpus {
        rec(
            Record::VcpuState {
                vcpu: *vcpu,
                state: state.clone(),
            },
            b,
        );
    }
    for (device, state) in [(device::KVM, &parts.kvm), (device::VMM, &parts.vmm)] {
        rec(
            Record::DeviceState {
                device,
                state: state.clone(),
            },
            b,
        );
    }
    for (seq, e) in parts.events.iter().enumerate() {
        rec(Record::Event(log_event(seq as u32, e)), b);
    }
    if let Some(code) = parts.exit {
        rec(
            Record::DeviceState {
                device: device::EXIT,
                state: Bytes::copy_from_slice(&[code]),
            },
            b,
        );
    }
    if !parts.output.is_empty() {
        rec(
            Record::Output {
                stream: 0,
                offset: parts.offset,
                data: parts.output.clone(),
            },
            b,
        );
    }
    let mut outputs = vec![(0, out_end)];
    let mut net_end = net_at;
    if let Some(frames) = parts.frames {
        let mut data = Vec::new();
        ft_log::frames::encode(frames.iter().map(Vec::as_slice), &mut data);
        net_end += data.len() as u64;
        outputs.push((NET_STREAM, net_end));
        if !data.is_empty() {
            rec(
                Record::Output {
                    stream: NET_STREAM,
                    offset: net_at,
                    data: Bytes::from(data),
                },
                b,
            );
        }
    }
    rec(
        Record::EpochEnd(EpochEnd {
            pages: pre_pages + entries.len() as u32,
            events: parts.events.len() as u32,
            page_hash: hasher.finish(),
            outputs,
        }),
        b,
    );
    (frames + page_frames, net_end)
}
