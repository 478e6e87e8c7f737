//! Guest memory: anonymous mmaps tracked by vm-memory's dirty bitmap.
//!
//! Every write the VMM itself makes through the [`GuestMemory`] API (boot structures, device
//! data, restored pages, a host handshake in a test) sets a bit in the region's
//! [`AtomicBitmap`]; writes by the guest are tracked by KVM (see [`crate::dirty`]).
use crate::layout;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// ftvm's guest memory type.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("guest memory of {0} MiB is too small (minimum {min} MiB)", min = layout::MIN_MEM_MIB)]
    TooSmall(u64),
    #[error("guest memory of {0} MiB is too large (maximum {max} MiB)", max = layout::MAX_MEM_MIB)]
    TooLarge(u64),
    #[error("cannot allocate {0} MiB of guest memory")]
    Alloc(u64, #[source] vm_memory::mmap::FromRangesError),
}

/// Allocates guest RAM for a guest of `mem_mib` MiB, laid out by [`layout::ram_ranges`].
pub fn create(mem_mib: u64) -> Result<GuestMemory, Error> {
    if mem_mib < layout::MIN_MEM_MIB {
        return Err(Error::TooSmall(mem_mib));
    }
    if mem_mib > layout::MAX_MEM_MIB {
        return Err(Error::TooLarge(mem_mib));
    }
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(mem_mib << 20)
        .into_iter()
        .map(|(a, l)| (GuestAddress(a), l as usize))
        .collect();
    GuestMemory::from_ranges(&ranges).map_err(|e| Error::Alloc(mem_mib, e))
}

/// Whether `bytes` (a page) is all zeros; word-at-a-time.
pub fn is_zero(bytes: &[u8]) -> bool {
    // SAFETY: reinterpreting initialized bytes as u64 is sound; align_to handles alignment.
    let (pre, words, post) = unsafe { bytes.align_to::<u64>() };
    pre.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && post.iter().all(|b| *b == 0)
}

/// Host virtual address and length of each region, in guest-address order.
pub fn host_regions(mem: &GuestMemory) -> Vec<(u64, *mut u8, usize)> {
    mem.iter()
        .map(|r| {
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("region start is always mapped");
            (r.start_addr().0, host, r.len() as usize)
        })
        .collect()
}

/// Writes one `u64` into guest memory (tracked as a VMM write).
pub fn write_u64(mem: &GuestMemory, addr: u64, v: u64) -> Result<(), vm_memory::GuestMemoryError> {
    use vm_memory::Bytes;
    mem.write_obj(v, GuestAddress(addr))
}

/// Writes `bytes` into guest memory at `addr` (tracked as a VMM write).
pub fn write_bytes(
    mem: &GuestMemory,
    addr: u64,
    bytes: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    use vm_memory::Bytes;
    mem.write_slice(bytes, GuestAddress(addr))
}

/// Reads guest memory at `addr` into `out`.
pub fn read_bytes(
    mem: &GuestMemory,
    addr: u64,
    out: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    use vm_memory::Bytes;
    mem.read_slice(out, GuestAddress(addr))
}
