//! What the polled virtio-mmio drivers share: the register window, device initialisation
//! (virtio 1.x, section 3.1), and the split-queue memory layout.
//!
//! The MMIO windows and guest RAM are identity-mapped and user-accessible (see `boot.rs`), so
//! a queue lives in static memory whose addresses are its guest-physical addresses.
use core::ptr::{read_volatile, write_volatile};

#[repr(C, align(16))]
#[derive(Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    pub const EMPTY: Desc = Desc { addr: 0, len: 0, flags: 0, next: 0 };
}

#[repr(C)]
pub struct Avail<const N: usize> {
    pub flags: u16,
    pub idx: u16,
    pub ring: [u16; N],
}

/// The used ring, page-aligned by its 2 KiB alignment inside the 4 KiB queue page.
#[repr(C, align(2048))]
pub struct Used<const N: usize> {
    pub flags: u16,
    pub idx: u16,
    pub ring: [(u32, u32); N],
}

/// One split virtqueue of `N` entries in one 4 KiB page: descriptors and the available ring
/// in the first half, the used ring in the second (so `N` ≤ 64).
#[repr(C, align(4096))]
pub struct QueueMem<const N: usize> {
    pub desc: [Desc; N],
    pub avail: Avail<N>,
    pub used: Used<N>,
}

impl<const N: usize> QueueMem<N> {
    pub const EMPTY: Self = QueueMem {
        desc: [Desc::EMPTY; N],
        avail: Avail { flags: 0, idx: 0, ring: [0; N] },
        used: Used { flags: 0, idx: 0, ring: [(0, 0); N] },
    };
}

#[derive(Debug)]
pub enum Error {
    NoDevice,
    FeaturesRefused,
}

/// A virtio-mmio register window at a base address.
#[derive(Clone, Copy)]
pub struct Mmio(pub usize);

impl Mmio {
    pub fn rd(self, off: usize) -> u32 {
        // SAFETY: the virtio-mmio window is identity-mapped device memory.
        unsafe { read_volatile((self.0 + off) as *const u32) }
    }

    pub fn wr(self, off: usize, v: u32) {
        // SAFETY: as for `rd`.
        unsafe { write_volatile((self.0 + off) as *mut u32, v) }
    }

    /// Byte `i` of the device's configuration space.
    pub fn config_byte(self, i: usize) -> u8 {
        // SAFETY: as for `rd`.
        unsafe { read_volatile((self.0 + 0x100 + i) as *const u8) }
    }

    /// Resets device `device_id` and negotiates `VIRTIO_F_VERSION_1` plus `features` (low
    /// word); the queues are set up next, then [`Mmio::driver_ok`].
    pub fn init(self, device_id: u32, features: u32) -> Result<(), Error> {
        if self.rd(0x000) != 0x7472_6976 || self.rd(0x004) != 2 || self.rd(0x008) != device_id {
            return Err(Error::NoDevice);
        }
        self.wr(0x070, 0); // reset
        self.wr(0x070, 1); // ACKNOWLEDGE
        self.wr(0x070, 1 | 2); // DRIVER
        self.wr(0x024, 0);
        self.wr(0x020, features);
        self.wr(0x024, 1);
        self.wr(0x020, 1); // VIRTIO_F_VERSION_1
        self.wr(0x070, 1 | 2 | 8); // FEATURES_OK
        if self.rd(0x070) & 8 == 0 {
            return Err(Error::FeaturesRefused);
        }
        Ok(())
    }

    /// Gives queue `n` its memory and makes it ready.
    pub fn setup_queue<const N: usize>(self, n: u32, q: *mut QueueMem<N>) {
        self.wr(0x030, n);
        self.wr(0x038, N as u32);
        // SAFETY: taking addresses of the static queue only.
        let (d, a, u) = unsafe {
            (&raw const (*q).desc as u64, &raw const (*q).avail as u64, &raw const (*q).used as u64)
        };
        for (reg, addr) in [(0x080, d), (0x090, a), (0x0a0, u)] {
            self.wr(reg, addr as u32);
            self.wr(reg + 4, (addr >> 32) as u32);
        }
        self.wr(0x044, 1); // QueueReady
    }

    pub fn driver_ok(self) {
        self.wr(0x070, 1 | 2 | 8 | 4);
    }

    pub fn notify(self, queue: u32) {
        self.wr(0x050, queue);
    }
}
