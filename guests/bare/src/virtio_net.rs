//! A minimal polled virtio-net driver over virtio-mmio (modern, version 2), at CPL3.
//!
//! Queue 0 receives into [`QSIZE`] static 2 KiB buffers, all offered up front and handed
//! back after each frame is consumed; queue 1 transmits from [`QSIZE`] static buffers. No
//! interrupts: the driver polls the used rings in memory (no VM exit) and notifies the device
//! — one MMIO write, one VM exit — only in [`Net::flush`]: once per batch of frames sent, and
//! once per 16 receive buffers returned. Frames travel
//! behind the 12-byte `virtio_net_hdr_v1`, all zero.
use crate::virtio::{Desc, Mmio, QueueMem};
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

pub use crate::virtio::Error;

pub const BASE: usize = 0xd000_1000;
pub const HDR: usize = 12;
pub const QSIZE: u16 = 64;
const BUF: usize = 2048;
const DEV: Mmio = Mmio(BASE);
const Q: usize = QSIZE as usize;

#[repr(C, align(4096))]
struct Bufs([[u8; BUF]; Q]);

static mut RXQ: QueueMem<Q> = QueueMem::EMPTY;
static mut TXQ: QueueMem<Q> = QueueMem::EMPTY;
static mut RXB: Bufs = Bufs([[0; BUF]; Q]);
static mut TXB: Bufs = Bufs([[0; BUF]; Q]);

/// The network device. Only one exists (it owns the static queues).
pub struct Net {
    pub mac: [u8; 6],
    /// Next used-ring entry to look at, per queue.
    rx_seen: u16,
    tx_seen: u16,
    /// Transmit buffers free for use (a stack of descriptor ids).
    tx_free: [u16; QSIZE as usize],
    tx_nfree: usize,
    /// Receive buffers returned since the last receive notify.
    returned: u16,
    notify_tx: bool,
}

impl Net {
    /// Finds and initialises the device (virtio 1.x, section 3.1) and offers every receive
    /// buffer.
    pub fn open() -> Result<Net, Error> {
        DEV.init(1, 1 << 5)?; // VIRTIO_NET_F_MAC
        let (rxq, txq) = (&raw mut RXQ, &raw mut TXQ);
        // SAFETY: the driver owns the static queues and buffers; the device uses them only
        // after QueueReady / the notifies below.
        unsafe {
            for i in 0..QSIZE as usize {
                (*rxq).desc[i] = Desc {
                    addr: &raw mut (*(&raw mut RXB)).0[i] as u64,
                    len: BUF as u32,
                    flags: 2, // device writes
                    next: 0,
                };
                (*rxq).avail.ring[i] = i as u16;
                (*txq).desc[i] = Desc {
                    addr: &raw mut (*(&raw mut TXB)).0[i] as u64,
                    len: 0,
                    flags: 0,
                    next: 0,
                };
            }
            (*rxq).avail.idx = QSIZE;
        }
        DEV.setup_queue(0, rxq);
        DEV.setup_queue(1, txq);
        DEV.driver_ok();
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            *b = DEV.config_byte(i);
        }
        let mut tx_free = [0u16; QSIZE as usize];
        for (i, f) in tx_free.iter_mut().enumerate() {
            *f = i as u16;
        }
        let net = Net {
            mac,
            rx_seen: 0,
            tx_seen: 0,
            tx_free,
            tx_nfree: QSIZE as usize,
            returned: QSIZE,
            notify_tx: false,
        };
        Ok(net)
    }

    /// The next received frame (header stripped), as (descriptor id, length), if any. Give
    /// the buffer back with [`Net::rx_done`].
    pub fn rx_poll(&mut self) -> Option<(u16, usize)> {
        let q = &raw const RXQ;
        // SAFETY: reading the used ring the device writes; fenced before the entry.
        unsafe {
            if read_volatile(&raw const (*q).used.idx) == self.rx_seen {
                return None;
            }
            fence(Ordering::Acquire);
            let (id, len) = read_volatile(&raw const (*q).used.ring[(self.rx_seen % QSIZE) as usize]);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let id = (id as u16) % QSIZE;
            Some((id, (len as usize).saturating_sub(HDR).min(BUF - HDR)))
        }
    }

    /// The received frame in buffer `id`.
    pub fn rx_frame(&self, id: u16, len: usize) -> &[u8] {
        // SAFETY: the device wrote this buffer before publishing it; it is ours until
        // `rx_done`.
        unsafe {
            let b = &*(&raw const RXB);
            &b.0[id as usize][HDR..HDR + len]
        }
    }

    /// Offers receive buffer `id` to the device again.
    pub fn rx_done(&mut self, id: u16) {
        let q = &raw mut RXQ;
        // SAFETY: the driver owns the avail ring.
        unsafe {
            let idx = read_volatile(&raw const (*q).avail.idx);
            write_volatile(&raw mut (*q).avail.ring[(idx % QSIZE) as usize], id);
            fence(Ordering::Release);
            write_volatile(&raw mut (*q).avail.idx, idx.wrapping_add(1));
        }
        self.returned += 1;
    }

    /// Reclaims transmit buffers the device has finished with.
    fn tx_reclaim(&mut self) {
        let q = &raw const TXQ;
        // SAFETY: reading the used ring the device writes.
        unsafe {
            while read_volatile(&raw const (*q).used.idx) != self.tx_seen {
                fence(Ordering::Acquire);
                let (id, _) = read_volatile(&raw const (*q).used.ring[(self.tx_seen % QSIZE) as usize]);
                self.tx_seen = self.tx_seen.wrapping_add(1);
                if self.tx_nfree < QSIZE as usize {
                    self.tx_free[self.tx_nfree] = (id as u16) % QSIZE;
                    self.tx_nfree += 1;
                }
            }
        }
    }

    /// Whether a transmit buffer is free.
    pub fn can_send(&mut self) -> bool {
        self.tx_reclaim();
        self.tx_nfree > 0
    }

    /// Queues a frame of `len` bytes (at most 2036) filled by `fill`; sent at the next
    /// [`Net::flush`]. Returns `None` when every transmit buffer is in flight.
    pub fn send<R>(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
        if !self.can_send() {
            return None;
        }
        self.tx_nfree -= 1;
        let id = self.tx_free[self.tx_nfree];
        let len = len.min(BUF - HDR);
        let (q, b) = (&raw mut TXQ, &raw mut TXB);
        // SAFETY: buffer `id` is free (not in the device's hands) until published below.
        unsafe {
            let bufs = &mut *b;
            let buf = &mut bufs.0[id as usize];
            buf[..HDR].fill(0);
            let r = fill(&mut buf[HDR..HDR + len]);
            (*q).desc[id as usize].len = (HDR + len) as u32;
            let idx = read_volatile(&raw const (*q).avail.idx);
            write_volatile(&raw mut (*q).avail.ring[(idx % QSIZE) as usize], id);
            fence(Ordering::Release);
            write_volatile(&raw mut (*q).avail.idx, idx.wrapping_add(1));
            self.notify_tx = true;
            Some(r)
        }
    }

    /// Tells the device about new transmit frames and returned receive buffers (one VM exit
    /// per queue with news).
    pub fn flush(&mut self) {
        fence(Ordering::SeqCst);
        if self.notify_tx {
            DEV.notify(1);
            self.notify_tx = false;
        }
        // The device also looks for buffers by itself when frames wait (every millisecond),
        // so returned buffers are announced only in batches.
        if self.returned >= QSIZE / 4 {
            DEV.notify(0);
            self.returned = 0;
        }
    }
}
