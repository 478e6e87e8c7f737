//! virtio-blk over virtio-mmio (virtio 1.x, "modern" MMIO version 2), backed by a raw file.
//!
//! Placement: MMIO window [`BLK_MMIO_BASE`]..+[`BLK_MMIO_SIZE`] in the gap below 4 GiB,
//! interrupt on GSI [`BLK_GSI`] (a Linux guest finds it with
//! `virtio_mmio.device=4K@0xd0000000:5`). One request queue of [`QUEUE_MAX`] entries;
//! features offered: `VIRTIO_F_VERSION_1` and `VIRTIO_BLK_F_FLUSH`.
//!
//! Everything the guest controls is validated before use: register accesses (size, offset),
//! the queue's addresses and size (by `virtio-queue`, against guest memory), each descriptor
//! chain (header readable and 16 bytes, data descriptors of the right direction, a final
//! writable status byte, at most [`MAX_CHAIN`] descriptors and [`MAX_REQUEST`] bytes), and
//! every sector range (inside the disk). A bad request completes with
//! `VIRTIO_BLK_S_IOERR`/`UNSUPP`; a chain without a usable status byte completes with length
//! 0. Nothing the guest writes can make the VMM panic or touch memory outside guest RAM.
//!
//! For FT, every write the guest makes to its disk is also kept ([`VirtioBlk::take_writes`])
//! so the primary can ship it in the epoch; the secondary applies them to its own disk copy
//! when the epoch commits.
use super::events::EventLog;
use super::virtio_mmio::{Irq, Transport, TransportState, Written, F_VERSION_1};
use crate::memory::GuestMemory;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

pub const BLK_MMIO_BASE: u64 = 0xd000_0000;
pub const BLK_MMIO_SIZE: u64 = 0x1000;
pub const BLK_GSI: u32 = 5;
pub const QUEUE_MAX: u16 = 256;
pub const SECTOR: u64 = 512;
/// Longest descriptor chain accepted (header + data + status).
pub const MAX_CHAIN: usize = 130;
/// Most data bytes in one request.
pub const MAX_REQUEST: u64 = 1 << 20;

const DEVICE_BLK: u32 = 2;
const F_BLK_FLUSH: u64 = 1 << 9;
const FEATURES: u64 = F_VERSION_1 | F_BLK_FLUSH;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// A guest write to the disk: `data` at byte `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskWrite {
    pub offset: u64,
    pub data: Vec<u8>,
}

/// The device's registers and queue position (the disk's contents are the file's).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct VirtioBlkState {
    pub transport: TransportState,
}

pub struct VirtioBlk {
    disk: File,
    capacity: u64,
    mem: GuestMemory,
    t: Transport,
    /// Guest writes not yet taken (kept only while `keep_writes`).
    writes: Vec<DiskWrite>,
    keep_writes: bool,
}

/// Why a disk could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("disk image: {0}")]
    Io(#[from] std::io::Error),
    #[error("disk image of {0} bytes: the size must be a non-zero multiple of 512")]
    Size(u64),
    #[error(transparent)]
    Transport(#[from] super::virtio_mmio::Error),
}

impl VirtioBlk {
    pub fn new(
        disk: File,
        mem: GuestMemory,
        irq: EventFd,
        events: Arc<EventLog>,
        state: Option<&VirtioBlkState>,
    ) -> Result<Self, Error> {
        let len = disk.metadata()?.len();
        if len == 0 || !len.is_multiple_of(SECTOR) {
            return Err(Error::Size(len));
        }
        let t = Transport::new(
            DEVICE_BLK,
            FEATURES,
            1,
            QUEUE_MAX,
            Irq {
                fd: irq,
                gsi: BLK_GSI,
                events,
            },
            state.map(|s| &s.transport),
        )?;
        Ok(VirtioBlk {
            disk,
            capacity: len / SECTOR,
            mem,
            t,
            writes: Vec::new(),
            keep_writes: false,
        })
    }

    pub fn save(&self) -> VirtioBlkState {
        VirtioBlkState {
            transport: self.t.save(),
        }
    }

    /// Keep every guest write for [`VirtioBlk::take_writes`] (an FT primary) or not.
    pub fn keep_writes(&mut self, on: bool) {
        self.keep_writes = on;
        if !on {
            self.writes.clear();
        }
    }

    /// The guest's disk writes since the last call, in order.
    pub fn take_writes(&mut self) -> Vec<DiskWrite> {
        std::mem::take(&mut self.writes)
    }

    /// The disk file (for an FT sync that copies it, or a secondary applying writes).
    pub fn disk(&self) -> &File {
        &self.disk
    }

    /// A guest read of `data.len()` bytes at `offset` in the MMIO window. Config space:
    /// the capacity (u64, sectors), the rest zero.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 0x40];
        cfg[..8].copy_from_slice(&self.capacity.to_le_bytes());
        self.t.read(offset, data, &cfg);
    }

    /// A guest write at `offset` in the MMIO window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if self.t.write(offset, data) == Written::Notify(0) {
            self.notify();
        }
    }

    /// The guest notified the queue: serve every available request.
    fn notify(&mut self) {
        if !self.t.usable(0, &self.mem) {
            return;
        }
        let mem = self.mem.clone();
        let mut served = false;
        while let Some(chain) = self.t.queues[0].pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let descs: Vec<_> = chain.take(MAX_CHAIN + 1).collect();
            let len = self.serve(&mem, &descs);
            if self.t.queues[0].add_used(&mem, head, len).is_err() {
                // The used ring is outside guest memory: the driver broke the queue.
                self.t.fail();
                break;
            }
            served = true;
        }
        if served {
            self.t.signal();
        }
    }

    /// Serves one request; returns the bytes written into the chain (the used length).
    fn serve(&mut self, mem: &GuestMemory, descs: &[virtio_queue::desc::split::Descriptor]) -> u32 {
        // The last descriptor must be a writable status byte, or nothing can be reported.
        let Some(status) = descs.last().filter(|d| d.is_write_only() && d.len() >= 1) else {
            return 0;
        };
        if descs.len() < 2 || descs.len() > MAX_CHAIN {
            return self.finish(mem, status.addr(), S_IOERR, 0);
        }
        let hdr = &descs[0];
        let mut h = [0u8; 16];
        if hdr.is_write_only() || hdr.len() < 16 || mem.read_slice(&mut h, hdr.addr()).is_err() {
            return self.finish(mem, status.addr(), S_IOERR, 0);
        }
        let kind = u32::from_le_bytes(h[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(h[8..16].try_into().unwrap());
        let data = &descs[1..descs.len() - 1];
        let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        let s = match kind {
            T_IN | T_OUT => {
                let write = kind == T_OUT;
                let in_range = total.is_multiple_of(SECTOR)
                    && total <= MAX_REQUEST
                    && sector
                        .checked_add(total / SECTOR)
                        .is_some_and(|end| end <= self.capacity);
                if !in_range || data.iter().any(|d| d.is_write_only() == write) {
                    S_IOERR
                } else if write {
                    self.write_data(mem, sector * SECTOR, data)
                } else {
                    return self.read_data(mem, sector * SECTOR, data, status.addr());
                }
            }
            T_FLUSH => match self.disk.sync_data() {
                Ok(()) => S_OK,
                Err(_) => S_IOERR,
            },
            T_GET_ID => {
                let id = b"ftvm-virtio-blk\0\0\0\0\0";
                match data.first() {
                    Some(d) if d.is_write_only() => {
                        let n = (d.len() as usize).min(id.len());
                        if mem.write_slice(&id[..n], d.addr()).is_ok() {
                            return self.finish(mem, status.addr(), S_OK, n as u32);
                        }
                        S_IOERR
                    }
                    _ => S_IOERR,
                }
            }
            _ => S_UNSUPP,
        };
        self.finish(mem, status.addr(), s, 0)
    }

    fn write_data(
        &mut self,
        mem: &GuestMemory,
        mut off: u64,
        data: &[virtio_queue::desc::split::Descriptor],
    ) -> u8 {
        for d in data {
            let mut buf = vec![0u8; d.len() as usize];
            if mem.read_slice(&mut buf, d.addr()).is_err()
                || self.disk.write_all_at(&buf, off).is_err()
            {
                return S_IOERR;
            }
            if self.keep_writes {
                self.writes.push(DiskWrite {
                    offset: off,
                    data: buf,
                });
            }
            off += u64::from(d.len());
        }
        S_OK
    }

    fn read_data(
        &mut self,
        mem: &GuestMemory,
        mut off: u64,
        data: &[virtio_queue::desc::split::Descriptor],
        status: GuestAddress,
    ) -> u32 {
        let mut done = 0u32;
        for d in data {
            let mut buf = vec![0u8; d.len() as usize];
            if self.disk.read_exact_at(&mut buf, off).is_err()
                || mem.write_slice(&buf, d.addr()).is_err()
            {
                return self.finish(mem, status, S_IOERR, done);
            }
            off += u64::from(d.len());
            done += d.len();
        }
        self.finish(mem, status, S_OK, done)
    }

    /// Writes the status byte; returns the used length (data bytes + the status byte).
    fn finish(&self, mem: &GuestMemory, status: GuestAddress, s: u8, data_len: u32) -> u32 {
        match mem.write_obj(s, status) {
            Ok(()) => data_len + 1,
            Err(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vm_memory::Address;

    const DESC: u64 = 0x10_0000;
    const AVAIL: u64 = 0x11_0000;
    const USED: u64 = 0x12_0000;
    const DATA: u64 = 0x20_0000;

    /// A driven device: 16 MiB of guest memory, a 64 KiB disk, the queue set up by the
    /// "driver" (registers written as a guest would).
    struct Rig {
        blk: VirtioBlk,
        mem: GuestMemory,
        disk_path: std::path::PathBuf,
        avail_idx: u16,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.disk_path);
        }
    }

    fn w(b: &mut VirtioBlk, off: u64, v: u32) {
        b.write(off, &v.to_le_bytes());
    }

    fn r(b: &mut VirtioBlk, off: u64) -> u32 {
        let mut d = [0u8; 4];
        b.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn rig(tag: &str) -> Rig {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let disk_path = std::env::temp_dir().join(format!(
            "ftvm-blk-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::write(&disk_path, vec![0u8; 64 << 10]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk_path)
            .unwrap();
        let mem = crate::memory::create(16).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut blk = VirtioBlk::new(f, mem.clone(), irq, Arc::default(), None).unwrap();
        assert_eq!(r(&mut blk, 0), super::super::virtio_mmio::MAGIC);
        assert_eq!(r(&mut blk, 8), DEVICE_BLK);
        w(&mut blk, 0x70, 1 | 2);
        w(&mut blk, 0x24, 1);
        w(&mut blk, 0x20, 1);
        w(&mut blk, 0x70, 1 | 2 | 8);
        assert_ne!(
            r(&mut blk, 0x70) & 8,
            0,
            "FEATURES_OK accepted with VERSION_1"
        );
        w(&mut blk, 0x38, 16);
        w(&mut blk, 0x80, DESC as u32);
        w(&mut blk, 0x90, AVAIL as u32);
        w(&mut blk, 0xa0, USED as u32);
        w(&mut blk, 0x44, 1);
        w(&mut blk, 0x70, 1 | 2 | 8 | 4);
        assert_eq!(r(&mut blk, 0x100), 128, "capacity in sectors");
        Rig {
            blk,
            mem,
            disk_path,
            avail_idx: 0,
        }
    }

    impl Rig {
        fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = GuestAddress(DESC + 16 * u64::from(i));
            self.mem.write_obj(addr, at).unwrap();
            self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
            self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
            self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
        }

        /// Offers the chain starting at `head`, notifies; returns the used length.
        fn submit(&mut self, head: u16) -> u32 {
            let slot = u64::from(self.avail_idx % 16);
            self.mem
                .write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.mem
                .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
                .unwrap();
            w(&mut self.blk, 0x50, 0);
            let used: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
            assert_eq!(used, self.avail_idx, "every offered chain is completed");
            let e = USED + 4 + 8 * u64::from((used.wrapping_sub(1)) % 16);
            self.mem.read_obj(GuestAddress(e + 4)).unwrap()
        }

        fn request(&mut self, kind: u32, sector: u64, len: u32, device_writes: bool) -> (u32, u8) {
            self.mem.write_obj(kind, GuestAddress(DATA)).unwrap();
            self.mem.write_obj(sector, GuestAddress(DATA + 8)).unwrap();
            self.mem
                .write_obj(0xffu8, GuestAddress(DATA + 0x100))
                .unwrap();
            self.desc(0, DATA, 16, 1, 1);
            self.desc(
                1,
                DATA + 0x1000,
                len,
                1 | if device_writes { 2 } else { 0 },
                2,
            );
            self.desc(2, DATA + 0x100, 1, 2, 0);
            let used = self.submit(0);
            (used, self.mem.read_obj(GuestAddress(DATA + 0x100)).unwrap())
        }
    }

    #[test]
    fn write_then_read_back_and_the_write_is_kept_for_ft() {
        let mut g = rig("rw");
        g.blk.keep_writes(true);
        g.mem
            .write_slice(&[0xabu8; 1024], GuestAddress(DATA + 0x1000))
            .unwrap();
        assert_eq!(g.request(T_OUT, 3, 1024, false), (1, S_OK));
        let on_disk = std::fs::read(&g.disk_path).unwrap();
        assert!(on_disk[3 * 512..5 * 512].iter().all(|b| *b == 0xab));
        assert!(on_disk[..3 * 512].iter().all(|b| *b == 0));
        assert_eq!(
            g.blk.take_writes(),
            vec![DiskWrite {
                offset: 3 * 512,
                data: vec![0xab; 1024]
            }]
        );
        g.mem
            .write_slice(&[0u8; 1024], GuestAddress(DATA + 0x1000))
            .unwrap();
        assert_eq!(g.request(T_IN, 3, 1024, true), (1025, S_OK));
        let mut back = [0u8; 1024];
        g.mem
            .read_slice(&mut back, GuestAddress(DATA + 0x1000))
            .unwrap();
        assert!(back.iter().all(|b| *b == 0xab));
        assert_ne!(r(&mut g.blk, 0x60) & 1, 0, "interrupt status set");
    }

    #[test]
    fn bad_requests_get_an_error_status_and_change_nothing() {
        let mut g = rig("bad");
        g.blk.keep_writes(true);
        // Past the end of the 128-sector disk; crossing it; not whole sectors.
        assert_eq!(g.request(T_OUT, 128, 512, false).1, S_IOERR);
        assert_eq!(g.request(T_OUT, 127, 1024, false).1, S_IOERR);
        assert_eq!(g.request(T_OUT, u64::MAX, 512, false).1, S_IOERR);
        assert_eq!(g.request(T_OUT, 0, 100, false).1, S_IOERR);
        // Data descriptor of the wrong direction for the request.
        assert_eq!(g.request(T_OUT, 0, 512, true).1, S_IOERR);
        assert_eq!(g.request(T_IN, 0, 512, false).1, S_IOERR);
        // Unknown request type.
        assert_eq!(g.request(99, 0, 512, false).1, S_UNSUPP);
        assert!(g.blk.take_writes().is_empty());
        assert_eq!(std::fs::metadata(&g.disk_path).unwrap().len(), 64 << 10);
        // A chain whose status descriptor is not writable: completed with length 0.
        g.desc(0, DATA, 16, 1, 1);
        g.desc(1, DATA + 0x100, 1, 0, 0);
        assert_eq!(g.submit(0), 0);
        // Data outside guest memory.
        g.desc(0, DATA, 16, 1, 1);
        g.desc(1, 1 << 40, 512, 1, 2);
        g.desc(2, DATA + 0x100, 1, 2, 0);
        g.mem.write_obj(T_OUT, GuestAddress(DATA)).unwrap();
        g.mem.write_obj(0u64, GuestAddress(DATA + 8)).unwrap();
        g.submit(0);
        assert_eq!(
            g.mem.read_obj::<u8>(GuestAddress(DATA + 0x100)).unwrap(),
            S_IOERR
        );
    }

    #[test]
    fn a_device_state_saved_mid_use_continues_the_queue() {
        let mut g = rig("state");
        g.mem
            .write_slice(&[7u8; 512], GuestAddress(DATA + 0x1000))
            .unwrap();
        assert_eq!(g.request(T_OUT, 1, 512, false).1, S_OK);
        let st = g.blk.save();
        let q = &st.transport.queues[0];
        assert_eq!((q.next_avail, q.next_used, q.size), (1, 1, 16));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&g.disk_path)
            .unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        g.blk = VirtioBlk::new(f, g.mem.clone(), irq, Arc::default(), Some(&st)).unwrap();
        assert_eq!(g.blk.save(), st);
        assert_eq!(g.request(T_IN, 1, 512, true), (513, S_OK));
    }

    #[test]
    fn disk_sizes_that_are_not_whole_sectors_are_refused() {
        let p = std::env::temp_dir().join(format!("ftvm-blk-size-{}", std::process::id()));
        for len in [0usize, 100, 513] {
            std::fs::write(&p, vec![0u8; len]).unwrap();
            let f = std::fs::File::open(&p).unwrap();
            let mem = crate::memory::create(16).unwrap();
            let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            assert!(matches!(
                VirtioBlk::new(f, mem, irq, Arc::default(), None),
                Err(Error::Size(_))
            ));
        }
        let _ = std::fs::remove_file(&p);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(crate::devices::fuzz_cases()))]
        /// Hostile descriptor tables and avail rings (any addresses, lengths, flags, next
        /// links, loops): the device never panics, never grows the disk, and writes the disk
        /// only inside it.
        #[test]
        fn hostile_queues_never_crash_or_escape(
            descs in proptest::collection::vec(
                (prop_oneof![Just(DATA), Just(DATA + 0x1000), Just(1u64 << 40), any::<u64>()],
                 prop_oneof![Just(16u32), Just(512), Just(1), any::<u32>()],
                 0u16..8, 0u16..20),
                16),
            heads in proptest::collection::vec(0u16..20, 1..6),
            kind in prop_oneof![Just(T_IN), Just(T_OUT), Just(T_FLUSH), Just(T_GET_ID), any::<u32>()],
            sector in prop_oneof![0u64..130, any::<u64>()],
        ) {
            let mut g = rig("fuzz");
            g.mem.write_obj(kind, GuestAddress(DATA)).unwrap();
            g.mem.write_obj(sector, GuestAddress(DATA + 8)).unwrap();
            for (i, (a, l, f, n)) in descs.iter().enumerate() {
                g.desc(i as u16, *a, *l, *f, *n);
            }
            for h in heads {
                let slot = u64::from(g.avail_idx % 16);
                g.mem.write_obj(h, GuestAddress(AVAIL + 4 + 2 * slot)).unwrap();
                g.avail_idx = g.avail_idx.wrapping_add(1);
                g.mem.write_obj(g.avail_idx, GuestAddress(AVAIL + 2)).unwrap();
                w(&mut g.blk, 0x50, 0);
            }
            prop_assert_eq!(std::fs::metadata(&g.disk_path).unwrap().len(), 64 << 10);
        }
    }
}
