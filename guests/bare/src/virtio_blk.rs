//! A minimal polled virtio-blk driver over virtio-mmio (modern, version 2), at CPL3.
//!
//! The MMIO window and guest RAM are identity-mapped and user-accessible (see `boot.rs`), so
//! the queue lives in static memory whose addresses are its guest-physical addresses. One
//! request at a time: header, data, status descriptors; notify; spin on the used ring
//! (interrupts stay masked). Each register access is one VM exit.
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

pub const BASE: usize = 0xd000_0000;
pub const SECTOR: usize = 512;
const QSIZE: u16 = 8;

#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

#[repr(C, align(4096))]
struct QueueMem {
    desc: [Desc; QSIZE as usize],
    avail_flags: u16,
    avail_idx: u16,
    avail_ring: [u16; QSIZE as usize],
    _pad: [u8; 2048],
    used_flags: u16,
    used_idx: u16,
    used_ring: [(u32, u32); QSIZE as usize],
}

#[repr(C, align(16))]
struct Req {
    kind: u32,
    reserved: u32,
    sector: u64,
    status: u8,
}

static mut Q: QueueMem = QueueMem {
    desc: [Desc { addr: 0, len: 0, flags: 0, next: 0 }; QSIZE as usize],
    avail_flags: 0,
    avail_idx: 0,
    avail_ring: [0; QSIZE as usize],
    _pad: [0; 2048],
    used_flags: 0,
    used_idx: 0,
    used_ring: [(0, 0); QSIZE as usize],
};
static mut REQ: Req = Req { kind: 0, reserved: 0, sector: 0, status: 0xff };

fn reg(off: usize) -> *mut u32 {
    (BASE + off) as *mut u32
}

fn rd(off: usize) -> u32 {
    // SAFETY: the virtio-mmio window is identity-mapped device memory.
    unsafe { read_volatile(reg(off)) }
}

fn wr(off: usize, v: u32) {
    // SAFETY: as for `rd`.
    unsafe { write_volatile(reg(off), v) }
}

/// The disk: its size in sectors.
pub struct Disk {
    pub sectors: u64,
}

#[derive(Debug)]
pub enum Error {
    NoDevice,
    FeaturesRefused,
    Io(u8),
}

impl Disk {
    /// Finds and initialises the device (virtio 1.x, section 3.1).
    pub fn open() -> Result<Disk, Error> {
        if rd(0x000) != 0x7472_6976 || rd(0x004) != 2 || rd(0x008) != 2 {
            return Err(Error::NoDevice);
        }
        wr(0x070, 0); // reset
        wr(0x070, 1); // ACKNOWLEDGE
        wr(0x070, 1 | 2); // DRIVER
        wr(0x024, 0);
        wr(0x020, 0); // no optional feature in the low word
        wr(0x024, 1);
        wr(0x020, 1); // VIRTIO_F_VERSION_1
        wr(0x070, 1 | 2 | 8); // FEATURES_OK
        if rd(0x070) & 8 == 0 {
            return Err(Error::FeaturesRefused);
        }
        let q = &raw mut Q;
        wr(0x030, 0);
        wr(0x038, u32::from(QSIZE));
        // SAFETY: taking addresses of the static queue only.
        let (d, a, u) = unsafe {
            (
                &raw const (*q).desc as u64,
                &raw const (*q).avail_flags as u64,
                &raw const (*q).used_flags as u64,
            )
        };
        wr(0x080, d as u32);
        wr(0x084, (d >> 32) as u32);
        wr(0x090, a as u32);
        wr(0x094, (a >> 32) as u32);
        wr(0x0a0, u as u32);
        wr(0x0a4, (u >> 32) as u32);
        wr(0x044, 1); // QueueReady
        wr(0x070, 1 | 2 | 8 | 4); // DRIVER_OK
        let sectors = u64::from(rd(0x100)) | (u64::from(rd(0x104)) << 32);
        Ok(Disk { sectors })
    }

    fn request(&mut self, kind: u32, sector: u64, buf: *mut u8, len: usize, write: bool) -> Result<(), Error> {
        let q = &raw mut Q;
        let r = &raw mut REQ;
        // SAFETY: one request at a time on one CPU; the device reads and writes these
        // structures only between the notify and the used-ring update we wait for.
        unsafe {
            (*r).kind = kind;
            (*r).sector = sector;
            write_volatile(&raw mut (*r).status, 0xff);
            (*q).desc[0] = Desc { addr: r as u64, len: 16, flags: 1, next: 1 };
            (*q).desc[1] = Desc { addr: buf as u64, len: len as u32, flags: 1 | if write { 0 } else { 2 }, next: 2 };
            (*q).desc[2] = Desc { addr: &raw mut (*r).status as u64, len: 1, flags: 2, next: 0 };
            let idx = read_volatile(&raw const (*q).avail_idx);
            write_volatile(&raw mut (*q).avail_ring[(idx % QSIZE) as usize], 0);
            fence(Ordering::SeqCst);
            write_volatile(&raw mut (*q).avail_idx, idx.wrapping_add(1));
            fence(Ordering::SeqCst);
            wr(0x050, 0); // QueueNotify
            while read_volatile(&raw const (*q).used_idx) != idx.wrapping_add(1) {
                core::hint::spin_loop();
            }
            fence(Ordering::SeqCst);
            let s = read_volatile(&raw const (*r).status);
            wr(0x064, rd(0x060)); // acknowledge the interrupt
            if s != 0 {
                return Err(Error::Io(s));
            }
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes (a multiple of 512) from `sector`.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.request(0, sector, buf.as_mut_ptr(), buf.len(), false)
    }

    /// Writes `buf` (a multiple of 512 bytes) at `sector`.
    pub fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), Error> {
        self.request(1, sector, buf.as_ptr() as *mut u8, buf.len(), true)
    }
}
