//! Dirty page tracking for the FT layer.
//!
//! Two sources, harvested together with the vCPUs paused:
//! - **guest writes**: KVM's dirty log (`KVM_GET_DIRTY_LOG`, cleared with
//!   `KVM_CLEAR_DIRTY_LOG` when the kernel supports manual protection);
//! - **VMM writes**: vm-memory's per-region bitmap, set by every write the VMM makes through
//!   the `GuestMemory` API (device data, boot structures, host handshakes).
//!
//! KVM's per-vCPU dirty ring ([`crate::vstate::dirty_ring`]) is the alternative backend
//! (`DirtyTracking::Ring`). The bitmap is the default: measured side by side
//! (`cargo run --release -p ftvm-benches -- foundation`, results in the README), it harvests as
//! fast or faster whenever the guest dirties pages in guests up to 256 MiB and is within
//! 0.03 ms at 1 GiB, and it never stalls the guest, whereas a full ring stops the vCPU until the
//! VMM harvests.
use crate::layout::PAGE_SIZE;
use crate::memory::GuestMemory;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Pages written since the previous harvest, as sorted guest-physical page addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyPages {
    /// Pages the guest wrote (KVM dirty log).
    pub guest: Vec<u64>,
    /// Pages the VMM wrote (vm-memory bitmap).
    pub vmm: Vec<u64>,
}

impl DirtyPages {
    /// The union of both sources, sorted, each page once.
    pub fn all(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.guest.iter().chain(self.vmm.iter()).copied().collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// Appends the address of every page whose bit is set in `words` (bit i = page i of the
/// range starting at `base`). Shared by the KVM dirty log and the VMM-write bitmap.
pub fn push_set_pages(base: u64, words: &[u64], pages: &mut Vec<u64>) {
    for (w, word) in words.iter().enumerate() {
        let mut bits = *word;
        while bits != 0 {
            let b = u64::from(bits.trailing_zeros());
            pages.push(base + (w as u64 * 64 + b) * PAGE_SIZE);
            bits &= bits - 1;
        }
    }
}

/// Takes and clears the VMM-write bitmap of every region.
pub fn harvest_vmm_writes(mem: &GuestMemory) -> Vec<u64> {
    let mut pages = Vec::new();
    for region in mem.iter() {
        let base = region.start_addr().0;
        push_set_pages(
            base,
            &region.get_mmap().bitmap().get_and_reset(),
            &mut pages,
        );
    }
    pages
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn vmm_writes_are_reported_once() {
        let mem = crate::memory::create(16).unwrap();
        harvest_vmm_writes(&mem);
        mem.write_obj(1u64, GuestAddress(0x5008)).unwrap();
        mem.write_slice(&[1u8; 5000], GuestAddress(0x20000))
            .unwrap();
        assert_eq!(harvest_vmm_writes(&mem), vec![0x5000, 0x20000, 0x21000]);
        assert!(harvest_vmm_writes(&mem).is_empty());
    }
}
