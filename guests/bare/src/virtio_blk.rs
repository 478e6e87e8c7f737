//! A minimal polled virtio-blk driver over virtio-mmio (modern, version 2), at CPL3 (see
//! [`crate::virtio`]). One
//! request at a time: header, data, status descriptors; notify; spin on the used ring
//! (interrupts stay masked). Each register access is one VM exit.
use crate::virtio::{Desc, Mmio, QueueMem};
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

pub const BASE: usize = 0xd000_0000;
pub const SECTOR: usize = 512;
const QSIZE: usize = 8;
const DEV: Mmio = Mmio(BASE);

#[repr(C, align(16))]
struct Req {
    kind: u32,
    reserved: u32,
    sector: u64,
    status: u8,
}

static mut Q: QueueMem<QSIZE> = QueueMem::EMPTY;
static mut REQ: Req = Req { kind: 0, reserved: 0, sector: 0, status: 0xff };

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

impl From<crate::virtio::Error> for Error {
    fn from(e: crate::virtio::Error) -> Self {
        match e {
            crate::virtio::Error::NoDevice => Error::NoDevice,
            crate::virtio::Error::FeaturesRefused => Error::FeaturesRefused,
        }
    }
}

impl Disk {
    /// Finds and initialises the device (virtio 1.x, section 3.1).
    pub fn open() -> Result<Disk, Error> {
        DEV.init(2, 0)?;
        DEV.setup_queue(0, &raw mut Q);
        DEV.driver_ok();
        let sectors = u64::from(DEV.rd(0x100)) | (u64::from(DEV.rd(0x104)) << 32);
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
            let idx = read_volatile(&raw const (*q).avail.idx);
            write_volatile(&raw mut (*q).avail.ring[idx as usize % QSIZE], 0);
            fence(Ordering::SeqCst);
            write_volatile(&raw mut (*q).avail.idx, idx.wrapping_add(1));
            fence(Ordering::SeqCst);
            DEV.notify(0);
            while read_volatile(&raw const (*q).used.idx) != idx.wrapping_add(1) {
                core::hint::spin_loop();
            }
            fence(Ordering::SeqCst);
            let s = read_volatile(&raw const (*r).status);
            DEV.wr(0x064, DEV.rd(0x060)); // acknowledge the interrupt
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
