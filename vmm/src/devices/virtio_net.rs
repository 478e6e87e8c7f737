//! virtio-net over virtio-mmio (virtio 1.x), backed by a tap device ([`super::tap`]).
//!
//! Placement: MMIO window [`NET_MMIO_BASE`]..+[`NET_MMIO_SIZE`], interrupt on GSI
//! [`NET_GSI`] (a Linux guest finds it with `virtio_mmio.device=4K@0xd0001000:6`). Queue 0
//! receives, queue 1 transmits, [`QUEUE_MAX`] entries each. Features offered:
//! `VIRTIO_F_VERSION_1` and `VIRTIO_NET_F_MAC` (no offloads, no mergeable buffers): every
//! frame travels behind the 12-byte `virtio_net_hdr_v1`, all zero but `num_buffers` = 1.
//!
//! Receive: a thread of the VMM reads the tap and hands each frame to [`VirtioNet::receive`];
//! it is written into the next available receive chain at once, or waits (at most
//! [`BACKLOG`] frames, then frames are dropped, as a NIC with a full ring drops them). While
//! the VM is paused ([`VirtioNet::set_frozen`]) nothing is written into guest memory, so a
//! paused VM's memory and device state form a consistent cut. Every frame delivered is
//! recorded as a nondeterministic input ([`DeviceEvent::DeviceInput`]).
//!
//! Transmit: on the guest's notify, each chain is checked (readable descriptors only, at
//! most [`MAX_CHAIN`] of them, header plus 14 to [`MAX_FRAME`] bytes) and its frame either
//! sent to the tap or — for an FT primary ([`VirtioNet::hold_tx`]) — kept for the FT layer,
//! which sends it once the epoch it left the guest in is acknowledged (the output rule). A
//! bad chain is completed with length 0 and its frame dropped; nothing the guest puts in a
//! queue makes the VMM panic or touch memory outside guest RAM.
use super::events::{DeviceEvent, EventLog};
use super::tap;
use super::virtio_mmio::{Irq, Transport, TransportState, Written, F_VERSION_1};
use crate::memory::GuestMemory;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fs::File;
use std::sync::Arc;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

pub const NET_MMIO_BASE: u64 = 0xd000_1000;
pub const NET_MMIO_SIZE: u64 = 0x1000;
pub const NET_GSI: u32 = 6;
pub const QUEUE_MAX: u16 = 256;
/// `virtio_net_hdr_v1`.
pub const HDR_LEN: usize = 12;
/// Longest Ethernet frame sent (1500-byte MTU, VLAN tag).
pub const MAX_FRAME: usize = 1518;
/// Longest descriptor chain accepted.
pub const MAX_CHAIN: usize = 64;
/// Received frames waiting for receive buffers, at most.
pub const BACKLOG: usize = 256;
/// The FT log's device number for received frames (`DeviceInput` events).
pub const INPUT_DEVICE: u16 = 1;
/// The MAC a VM gets unless told otherwise (locally administered).
pub const DEFAULT_MAC: [u8; 6] = [0x02, 0x46, 0x54, 0x56, 0x4d, 0x01];

const DEVICE_NET: u32 = 1;
const F_MAC: u64 = 1 << 5;
const FEATURES: u64 = F_VERSION_1 | F_MAC;
const RX: usize = 0;
const TX: usize = 1;

/// The device's registers, queues and MAC.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VirtioNetState {
    pub mac: [u8; 6],
    pub transport: TransportState,
}

/// Counters (not part of the saved state).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    pub rx_frames: u64,
    /// Frames dropped: backlog full, or no receive chain could hold them.
    pub rx_dropped: u64,
    pub tx_frames: u64,
    /// Transmit chains refused as malformed.
    pub tx_bad: u64,
}

pub struct VirtioNet {
    t: Transport,
    mac: [u8; 6],
    mem: GuestMemory,
    tap: Arc<File>,
    events: Arc<EventLog>,
    hold_tx: bool,
    held: Vec<Vec<u8>>,
    backlog: VecDeque<Vec<u8>>,
    frozen: bool,
    pub stats: NetStats,
}

impl VirtioNet {
    /// A device on `tap` (any descriptor where one read/write is one frame), continuing
    /// `state` if given (its MAC wins over `mac`). Starts frozen: see [`Self::set_frozen`].
    pub fn new(
        tap: File,
        mac: [u8; 6],
        mem: GuestMemory,
        irq: EventFd,
        events: Arc<EventLog>,
        state: Option<&VirtioNetState>,
    ) -> Result<Self, super::virtio_mmio::Error> {
        let t = Transport::new(
            DEVICE_NET,
            FEATURES,
            2,
            QUEUE_MAX,
            Irq {
                fd: irq,
                gsi: NET_GSI,
                events: events.clone(),
            },
            state.map(|s| &s.transport),
        )?;
        Ok(VirtioNet {
            t,
            mac: state.map_or(mac, |s| s.mac),
            mem,
            tap: Arc::new(tap),
            events,
            hold_tx: false,
            held: Vec::new(),
            backlog: VecDeque::new(),
            frozen: true,
            stats: NetStats::default(),
        })
    }

    pub fn save(&self) -> VirtioNetState {
        VirtioNetState {
            mac: self.mac,
            transport: self.t.save(),
        }
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The tap, for sending frames the FT layer released.
    pub fn tap(&self) -> Arc<File> {
        self.tap.clone()
    }

    /// Keep transmitted frames for [`Self::take_tx`] (an FT primary) instead of sending them.
    /// Switching it off drops nothing: frames kept so far stay until taken.
    pub fn hold_tx(&mut self, on: bool) {
        self.hold_tx = on;
    }

    /// Frames the guest transmitted since the last call, in order.
    pub fn take_tx(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.held)
    }

    /// How many transmitted frames wait to be taken.
    pub fn held_tx(&self) -> usize {
        self.held.len()
    }

    /// While frozen (the VM is paused) received frames only wait; unfreezing delivers them.
    pub fn set_frozen(&mut self, on: bool) {
        self.frozen = on;
        if !on {
            self.deliver();
        }
    }

    /// Whether received frames wait for receive buffers.
    pub fn backlogged(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Looks for receive buffers for waiting frames (the receive thread calls it every
    /// millisecond while frames wait: a polling driver announces returned buffers in batches).
    pub fn retry(&mut self) {
        self.deliver();
    }

    /// A frame arrived from the network.
    pub fn receive(&mut self, frame: Vec<u8>) {
        if self.backlog.len() >= BACKLOG {
            self.stats.rx_dropped += 1;
            return;
        }
        self.backlog.push_back(frame);
        self.deliver();
    }

    /// A guest read of `data.len()` bytes at `offset` in the MMIO window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 8];
        cfg[..6].copy_from_slice(&self.mac);
        self.t.read(offset, data, &cfg);
    }

    /// A guest write at `offset` in the MMIO window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        match self.t.write(offset, data) {
            Written::Notify(q) if usize::from(q) == RX => self.deliver(),
            Written::Notify(q) if usize::from(q) == TX => self.transmit(),
            Written::Reset => self.backlog.clear(),
            _ => {}
        }
    }

    /// Writes waiting frames into available receive chains.
    fn deliver(&mut self) {
        if self.frozen || self.backlog.is_empty() || !self.t.usable(RX, &self.mem) {
            return;
        }
        let mem = self.mem.clone();
        let mut delivered = false;
        while !self.backlog.is_empty() {
            let Some(chain) = self.t.queues[RX].pop_descriptor_chain(&mem) else {
                break; // no buffers: the frames wait for the driver
            };
            let head = chain.head_index();
            let descs: Vec<_> = chain.take(MAX_CHAIN + 1).collect();
            let frame = self.backlog.pop_front().expect("checked non-empty");
            let len = write_chain(&mem, &descs, &frame);
            if len == 0 {
                self.stats.rx_dropped += 1;
            } else {
                self.stats.rx_frames += 1;
                if self.events.is_recording() {
                    self.events.record(DeviceEvent::DeviceInput {
                        device: INPUT_DEVICE,
                        data: frame,
                    });
                }
            }
            if self.t.queues[RX].add_used(&mem, head, len).is_err() {
                self.t.fail();
                return;
            }
            delivered = true;
        }
        if delivered {
            self.t.signal();
        }
    }

    /// Serves every available transmit chain.
    fn transmit(&mut self) {
        if !self.t.usable(TX, &self.mem) {
            return;
        }
        let mem = self.mem.clone();
        let mut served = false;
        while let Some(chain) = self.t.queues[TX].pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let descs: Vec<_> = chain.take(MAX_CHAIN + 1).collect();
            match read_chain(&mem, &descs) {
                Some(frame) => {
                    self.stats.tx_frames += 1;
                    if self.hold_tx {
                        self.held.push(frame);
                    } else {
                        tap::write_frame(&self.tap, &frame);
                    }
                }
                None => self.stats.tx_bad += 1,
            }
            if self.t.queues[TX].add_used(&mem, head, 0).is_err() {
                self.t.fail();
                return;
            }
            served = true;
        }
        if served {
            self.t.signal();
        }
    }
}

/// Writes header + `frame` into a receive chain; returns the bytes written, 0 if the chain
/// cannot take it (a readable descriptor, too long, too small, outside guest memory).
fn write_chain(mem: &GuestMemory, descs: &[Descriptor], frame: &[u8]) -> u32 {
    if descs.len() > MAX_CHAIN || descs.iter().any(|d| !d.is_write_only()) {
        return 0;
    }
    let room: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    let total = HDR_LEN + frame.len();
    if room < total as u64 {
        return 0;
    }
    let mut bytes = Vec::with_capacity(total);
    bytes.extend_from_slice(&[0; HDR_LEN]);
    bytes[10] = 1; // num_buffers
    bytes.extend_from_slice(frame);
    let mut at = 0;
    for d in descs {
        if at == total {
            break;
        }
        let n = (d.len() as usize).min(total - at);
        if mem.write_slice(&bytes[at..at + n], d.addr()).is_err() {
            return 0;
        }
        at += n;
    }
    total as u32
}

/// The frame in a transmit chain (header stripped), or `None` if the chain is malformed.
fn read_chain(mem: &GuestMemory, descs: &[Descriptor]) -> Option<Vec<u8>> {
    if descs.len() > MAX_CHAIN || descs.iter().any(|d| d.is_write_only()) {
        return None;
    }
    let total: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    if total < (HDR_LEN + 14) as u64 || total > (HDR_LEN + MAX_FRAME) as u64 {
        return None;
    }
    let mut buf = vec![0u8; total as usize];
    let mut at = 0;
    for d in descs {
        let n = d.len() as usize;
        mem.read_slice(&mut buf[at..at + n], GuestAddress(d.addr().0))
            .ok()?;
        at += n;
    }
    buf.drain(..HDR_LEN);
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::fd::FromRawFd;
    use vm_memory::Address;

    const RXQ: [u64; 3] = [0x10_0000, 0x11_0000, 0x12_0000];
    const TXQ: [u64; 3] = [0x13_0000, 0x14_0000, 0x15_0000];
    const BUF: u64 = 0x20_0000;
    const QS: u16 = 16;

    /// A device driven as a guest would, on one end of a SOCK_SEQPACKET pair (frames as a
    /// tap delivers them); the test holds the other end as "the network".
    struct Rig {
        net: VirtioNet,
        mem: GuestMemory,
        wire: File,
        avail: [u16; 2],
    }

    fn w(n: &mut VirtioNet, off: u64, v: u32) {
        n.write(off, &v.to_le_bytes());
    }

    fn r(n: &mut VirtioNet, off: u64) -> u32 {
        let mut d = [0u8; 4];
        n.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn pair() -> (File, File) {
        let mut fds = [0i32; 2];
        // SAFETY: `fds` has room for the two descriptors.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: fresh descriptors, each owned by one File.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    fn rig() -> Rig {
        let (dev, wire) = pair();
        let mem = crate::memory::create(16).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let events = Arc::new(EventLog::default());
        events.set_recording(true);
        let mut net = VirtioNet::new(dev, DEFAULT_MAC, mem.clone(), irq, events, None).unwrap();
        assert_eq!(r(&mut net, 0x08), DEVICE_NET);
        w(&mut net, 0x70, 1 | 2);
        w(&mut net, 0x24, 1);
        w(&mut net, 0x20, 1);
        w(&mut net, 0x24, 0);
        w(&mut net, 0x20, F_MAC as u32);
        w(&mut net, 0x70, 1 | 2 | 8);
        assert_ne!(r(&mut net, 0x70) & 8, 0);
        for (q, [d, a, u]) in [(0u32, RXQ), (1, TXQ)] {
            w(&mut net, 0x30, q);
            w(&mut net, 0x38, u32::from(QS));
            w(&mut net, 0x80, d as u32);
            w(&mut net, 0x90, a as u32);
            w(&mut net, 0xa0, u as u32);
            w(&mut net, 0x44, 1);
        }
        w(&mut net, 0x70, 1 | 2 | 8 | 4);
        let mut mac = [0u8; 6];
        net.read(0x100, &mut mac);
        assert_eq!(mac, DEFAULT_MAC);
        net.set_frozen(false);
        Rig {
            net,
            mem,
            wire,
            avail: [0; 2],
        }
    }

    impl Rig {
        fn desc(&self, q: [u64; 3], i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = GuestAddress(q[0] + 16 * u64::from(i));
            self.mem.write_obj(addr, at).unwrap();
            self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
            self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
            self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
        }

        /// Offers chain `head` on queue `n` and notifies.
        fn offer(&mut self, n: usize, head: u16) {
            let q = if n == 0 { RXQ } else { TXQ };
            let slot = u64::from(self.avail[n] % QS);
            self.mem
                .write_obj(head, GuestAddress(q[1] + 4 + 2 * slot))
                .unwrap();
            self.avail[n] = self.avail[n].wrapping_add(1);
            self.mem
                .write_obj(self.avail[n], GuestAddress(q[1] + 2))
                .unwrap();
            w(&mut self.net, 0x50, n as u32);
        }

        /// (used index, length of the last used entry) of queue `n`.
        fn used(&self, n: usize) -> (u16, u32) {
            let q = if n == 0 { RXQ } else { TXQ };
            let idx: u16 = self.mem.read_obj(GuestAddress(q[2] + 2)).unwrap();
            let e = q[2] + 4 + 8 * u64::from(idx.wrapping_sub(1) % QS);
            (idx, self.mem.read_obj(GuestAddress(e + 4)).unwrap())
        }

        fn wire_frame(&self) -> Option<Vec<u8>> {
            let mut b = vec![0u8; 4096];
            tap::read_frame(&self.wire, &mut b).map(|n| b[..n].to_vec())
        }
    }

    fn frame(n: usize, tag: u8) -> Vec<u8> {
        (0..n).map(|i| (i as u8) ^ tag).collect()
    }

    #[test]
    fn frames_flow_both_ways_with_the_header() {
        let mut g = rig();
        // Transmit: header + 60-byte frame in two descriptors.
        g.mem
            .write_slice(&[0u8; HDR_LEN], GuestAddress(BUF))
            .unwrap();
        g.mem
            .write_slice(&frame(60, 7), GuestAddress(BUF + 0x100))
            .unwrap();
        g.desc(TXQ, 0, BUF, HDR_LEN as u32, 1, 1);
        g.desc(TXQ, 1, BUF + 0x100, 60, 0, 0);
        g.offer(1, 0);
        assert_eq!(g.used(1).0, 1);
        assert_eq!(g.wire_frame(), Some(frame(60, 7)));
        // Receive: a frame arrives before any buffer, waits, lands when one is offered.
        g.net.receive(frame(100, 9));
        assert_eq!(g.used(0).0, 0);
        g.desc(RXQ, 0, BUF + 0x1000, 2048, 2, 0);
        g.offer(0, 0);
        assert_eq!(g.used(0), (1, (HDR_LEN + 100) as u32));
        let mut got = vec![0u8; HDR_LEN + 100];
        g.mem
            .read_slice(&mut got, GuestAddress(BUF + 0x1000))
            .unwrap();
        assert_eq!(got[10], 1, "num_buffers");
        assert_eq!(&got[HDR_LEN..], &frame(100, 9)[..]);
        let ev = g.net.events.take();
        assert!(ev.contains(&DeviceEvent::DeviceInput {
            device: INPUT_DEVICE,
            data: frame(100, 9)
        }));
        assert_eq!(g.net.stats.rx_frames, 1);
    }

    #[test]
    fn held_frames_wait_for_the_ft_layer_and_frozen_devices_write_nothing() {
        let mut g = rig();
        g.net.hold_tx(true);
        g.mem
            .write_slice(&frame(HDR_LEN + 64, 1), GuestAddress(BUF))
            .unwrap();
        g.desc(TXQ, 0, BUF, (HDR_LEN + 64) as u32, 0, 0);
        g.offer(1, 0);
        assert_eq!(g.wire_frame(), None, "held, not sent");
        assert_eq!(g.net.held_tx(), 1);
        assert_eq!(
            g.net.take_tx(),
            vec![frame(HDR_LEN + 64, 1)[HDR_LEN..].to_vec()]
        );
        g.net.set_frozen(true);
        g.desc(RXQ, 0, BUF + 0x1000, 2048, 2, 0);
        g.offer(0, 0);
        g.net.receive(frame(80, 3));
        assert_eq!(g.used(0).0, 0, "nothing delivered while frozen");
        let st = g.net.save();
        g.net.set_frozen(false);
        assert_eq!(g.used(0), (1, (HDR_LEN + 80) as u32));
        // The state saved while frozen continues the queues.
        let (dev, _wire) = pair();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let n2 =
            VirtioNet::new(dev, [0; 6], g.mem.clone(), irq, Arc::default(), Some(&st)).unwrap();
        assert_eq!(n2.save(), st);
        assert_eq!(n2.mac(), DEFAULT_MAC, "the saved MAC wins");
    }

    #[test]
    fn malformed_chains_are_completed_empty_and_change_nothing() {
        let mut g = rig();
        // Transmit: a writable descriptor; too short; too long; outside guest memory.
        g.desc(TXQ, 0, BUF, 100, 2, 0);
        g.offer(1, 0);
        g.desc(TXQ, 0, BUF, 10, 0, 0);
        g.offer(1, 0);
        g.desc(TXQ, 0, BUF, 9000, 0, 0);
        g.offer(1, 0);
        g.desc(TXQ, 0, 1 << 40, 100, 0, 0);
        g.offer(1, 0);
        assert_eq!(g.used(1).0, 4);
        assert_eq!(g.net.stats.tx_bad, 4);
        assert_eq!(g.wire_frame(), None);
        // Receive: a readable buffer; a buffer too small.
        g.desc(RXQ, 0, BUF, 2048, 0, 0);
        g.offer(0, 0);
        g.net.receive(frame(100, 1));
        assert_eq!(g.used(0), (1, 0));
        g.desc(RXQ, 1, BUF, 50, 2, 0);
        g.offer(0, 1);
        g.net.receive(frame(100, 1));
        assert_eq!(g.used(0), (2, 0));
        assert_eq!(g.net.stats.rx_dropped, 2);
        // A full backlog drops.
        for _ in 0..BACKLOG + 5 {
            g.net.receive(frame(60, 0));
        }
        assert_eq!(g.net.stats.rx_dropped, 7);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::devices::fuzz_cases()))]
        /// Hostile descriptor tables and avail rings on both queues (any addresses, lengths,
        /// flags, next links, loops) and frames of any size: the device never panics, and
        /// whatever reaches the wire is a frame of a sane size.
        #[test]
        fn hostile_queues_never_crash_or_escape(
            descs in proptest::collection::vec(
                (prop_oneof![Just(BUF), Just(BUF + 0x1000), Just(1u64 << 40), any::<u64>()],
                 prop_oneof![Just(HDR_LEN as u32), Just(60), Just(2048), any::<u32>()],
                 0u16..8, 0u16..20),
                16),
            heads in proptest::collection::vec((0usize..2, 0u16..20), 1..8),
            frames in proptest::collection::vec(0usize..3000, 0..4),
        ) {
            let mut g = rig();
            for (i, (a, l, f, n)) in descs.iter().enumerate() {
                g.desc(RXQ, i as u16, *a, *l, *f, *n);
                g.desc(TXQ, i as u16, *a, *l, *f, *n);
            }
            for f in frames {
                g.net.receive(frame(f, 5));
            }
            for (q, h) in heads {
                g.offer(q, h);
            }
            while let Some(f) = g.wire_frame() {
                prop_assert!((14..=MAX_FRAME).contains(&f.len()));
            }
        }
    }
}
