//! KVM's per-vCPU dirty ring (`KVM_CAP_DIRTY_LOG_RING`), the alternative to the dirty bitmap.
//!
//! Each vCPU has a ring of `kvm_dirty_gfn { flags, slot, offset }` entries mmapped from its fd
//! at page `KVM_DIRTY_LOG_PAGE_OFFSET`. KVM pushes an entry (flags = DIRTY) for each page the
//! vCPU dirties; the VMM collects entries in order, marks each RESET, and then asks KVM to
//! re-protect the collected pages with `KVM_RESET_DIRTY_RINGS`. A full ring stops the vCPU with
//! `KVM_EXIT_DIRTY_RING_FULL` until the VMM harvests, so ring mode is for users that harvest
//! regularly (the FT epoch loop), not for plain runs.
use kvm_bindings::{kvm_dirty_gfn, KVM_DIRTY_LOG_PAGE_OFFSET};
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};

const KVM_DIRTY_GFN_F_DIRTY: u32 = 1;
const KVM_DIRTY_GFN_F_RESET: u32 = 2;

/// One vCPU's mapped dirty ring.
pub struct DirtyRing {
    ring: *mut kvm_dirty_gfn,
    bytes: usize,
    entries: u32,
    next: u32,
}

// SAFETY: the ring is a shared mapping that KVM and the VMM coordinate through the per-entry
// flags protocol; the VMM side is only touched through `&mut self` (one harvester at a time).
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps the ring of the vCPU behind `vcpu_fd`, `bytes` long (as enabled on the VM).
    pub fn map(vcpu_fd: &impl AsRawFd, bytes: usize) -> std::io::Result<Self> {
        let page = 4096i64;
        // SAFETY: mapping a KVM-provided region of the vCPU fd; the result is checked, and
        // the mapping is owned by the returned value and unmapped on drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu_fd.as_raw_fd(),
                i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let entries = (bytes / std::mem::size_of::<kvm_dirty_gfn>()) as u32;
        Ok(DirtyRing {
            ring: p.cast(),
            bytes,
            entries,
            next: 0,
        })
    }

    /// Collects every published entry as `(slot, page offset in slot)` and marks it for reset.
    /// Call `KVM_RESET_DIRTY_RINGS` afterwards so KVM reuses the entries.
    pub fn harvest(&mut self, out: &mut Vec<(u32, u64)>) -> usize {
        let mut n = 0;
        loop {
            // SAFETY: index is reduced modulo the ring size, so the entry is inside the mapping.
            let e = unsafe { self.ring.add((self.next % self.entries) as usize) };
            // SAFETY: volatile access to memory KVM writes concurrently; the flags word is
            // read before the payload (acquire) and written after it is consumed (release).
            let flags = unsafe { std::ptr::read_volatile(&(*e).flags) };
            if flags & KVM_DIRTY_GFN_F_DIRTY == 0 {
                break;
            }
            fence(Ordering::Acquire);
            // SAFETY: as above.
            let (slot, offset) = unsafe {
                (
                    std::ptr::read_volatile(&(*e).slot),
                    std::ptr::read_volatile(&(*e).offset),
                )
            };
            out.push((slot & 0xffff, offset));
            fence(Ordering::Release);
            // SAFETY: as above.
            unsafe { std::ptr::write_volatile(&mut (*e).flags, KVM_DIRTY_GFN_F_RESET) };
            self.next = self.next.wrapping_add(1);
            n += 1;
        }
        n
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mapped in `map`.
        unsafe { libc::munmap(self.ring.cast(), self.bytes) };
    }
}
