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
    let mem = GuestMemory::from_ranges(&ranges).map_err(|e| Error::Alloc(mem_mib, e))?;
    for (_, host, len) in host_regions(&mem) {
        // Transparent huge pages where the host allows them (as QEMU asks too): far fewer
        // faults when the guest first touches its memory. Measured on this project's PVM
        // host: the compile-profile guest ran 1.66× longer without. Only advice: ignore
        // failure (THP disabled or unsupported).
        // SAFETY: madvise on a mapping `mem` owns; MADV_HUGEPAGE changes no contents.
        unsafe { libc::madvise(host.cast(), len, libc::MADV_HUGEPAGE) };
    }
    Ok(mem)
}

/// Backs all of guest memory now (`MADV_POPULATE_WRITE`: as if every page had been
/// written, contents unchanged), in huge pages where allowed. For write tracking at 2 MiB
/// ([`crate::wp::BackgroundCopy::track`]), which keeps huge pages whole only where memory
/// is backed; the memory is then all resident, as vSphere FT requires a protected VM's
/// memory to be fully reserved. Safe while the guest runs.
///
/// Done 2 MiB at a time: the call holds the process's memory-map lock, and one call over
/// all of memory (~0.35 s for 128 MiB measured on this project's host, where first-touching
/// memory is slow) stalled every other thread that mapped memory, heartbeats included.
pub fn populate(mem: &GuestMemory) -> std::io::Result<()> {
    for (_, host, len) in host_regions(mem) {
        // SAFETY: `mem` owns the mapping and keeps it for the call.
        unsafe { populate_raw(host, len) }?;
    }
    Ok(())
}

/// [`populate`] for a buffer of the VMM's own (huge pages asked for first): one that will be
/// written soon in full, e.g. a shadow copy of guest memory, backed at once rather than a
/// page fault per 4 KiB later. Only the whole pages inside `buf` are backed.
pub fn populate_buf(buf: &mut [u8]) -> std::io::Result<()> {
    let page = 4096;
    let start = (buf.as_mut_ptr() as usize).next_multiple_of(page);
    let end = (buf.as_mut_ptr() as usize + buf.len()) / page * page;
    if end <= start {
        return Ok(());
    }
    // SAFETY: the range lies inside `buf`, which the caller holds mutably; MADV_HUGEPAGE and
    // populating change no contents.
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        populate_raw(start as *mut u8, end - start)
    }
}

/// # Safety
/// `host..host + len` must be a page-aligned range of a live private mapping.
unsafe fn populate_raw(host: *mut u8, len: usize) -> std::io::Result<()> {
    const STEP: usize = 2 << 20;
    for off in (0..len).step_by(STEP) {
        let n = STEP.min(len - off);
        // SAFETY: per the caller; populating changes no contents.
        let r = unsafe { libc::madvise(host.add(off).cast(), n, libc::MADV_POPULATE_WRITE) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The guest-physical address just past the end of guest memory.
pub fn end(mem: &GuestMemory) -> u64 {
    use vm_memory::GuestMemoryBackend;
    mem.last_addr().0 + 1
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

/// Where the whole guest page at `gpa` lies in `regions` (as [`host_regions`] lists them):
/// the region's index and the page's host address. None if `gpa` is not page-aligned or the
/// page is not inside one region.
pub fn page_host(regions: &[(u64, *mut u8, usize)], gpa: u64) -> Option<(usize, *mut u8)> {
    const PAGE: u64 = 4096;
    regions
        .iter()
        .enumerate()
        .find_map(|(r, &(base, host, len))| {
            let off = gpa.checked_sub(base)?;
            (gpa.is_multiple_of(PAGE) && off + PAGE <= len as u64)
                .then(|| (r, host.wrapping_add(off as usize)))
        })
}

/// For each region as [`host_regions`] lists them, one flag per page: whether the host has
/// ever backed the page with memory (present, or swapped out; from `/proc/self/pagemap`). A
/// page that is not backed is all zeros and need not be read — and must not be: reading it
/// maps the shared zero page there, and under shadow paging the guest's first write to such
/// a page then costs far more than a write to untouched memory (measured on this project's
/// PVM host: ~37 µs more per page, a 1.5× slowdown of the compile-profile guest after one
/// full-memory scan). If pagemap cannot be read, every page counts as backed.
pub fn backed_pages(mem: &GuestMemory) -> Vec<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let pagemap = std::fs::File::open("/proc/self/pagemap").ok();
    host_regions(mem)
        .into_iter()
        .map(|(_, host, len)| {
            let pages = len / 4096;
            let mut raw = vec![0u8; pages * 8];
            let offset = (host as u64 / 4096) * 8;
            match &pagemap {
                Some(f) if f.read_exact_at(&mut raw, offset).is_ok() => raw
                    .chunks_exact(8)
                    .map(|e| {
                        let e = u64::from_le_bytes(e.try_into().expect("8-byte chunk"));
                        e & (PRESENT | SWAPPED) != 0
                    })
                    .collect(),
                _ => vec![true; pages],
            }
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

/// Copies the pages at `gpas` (page-aligned guest addresses) back to back into `out` with
/// plain `memcpy` from the host mapping — ~3× faster than [`read_bytes`]'s volatile copy,
/// which matters while the guest is paused for an FT epoch.
///
/// The caller must have paused every vCPU and must not emulate a device meanwhile: then
/// nothing writes the guest memory during the copy. An address outside guest memory is an
/// error (nothing is copied for it).
pub fn copy_pages(mem: &GuestMemory, gpas: &[u64], out: &mut [u8]) -> Result<(), String> {
    const PAGE: usize = 4096;
    // Below this many pages one thread copies; above, up to `MAX_THREADS` share the work (one
    // core's memcpy bandwidth is the limit on cloud hosts: ~5-6 GB/s measured here).
    const PARALLEL_FROM: usize = 1024;
    const MAX_THREADS: usize = 4;
    if out.len() < gpas.len() * PAGE {
        return Err(format!(
            "buffer of {} bytes for {} pages",
            out.len(),
            gpas.len()
        ));
    }
    let regions = Regions(host_regions(mem));
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(MAX_THREADS);
    if gpas.len() >= PARALLEL_FROM && threads > 1 {
        let per = gpas.len().div_ceil(threads);
        let regions = &regions;
        return std::thread::scope(|s| {
            let workers: Vec<_> = gpas
                .chunks(per)
                .zip(out.chunks_mut(per * PAGE))
                .map(|(g, o)| s.spawn(move || regions.copy(g, o)))
                .collect();
            workers
                .into_iter()
                .try_for_each(|w| w.join().map_err(|_| "copy thread panicked".to_string())?)
        });
    }
    regions.copy(gpas, out)
}

/// Writes whole pages into memory no vCPU runs on (a secondary's standby): `data` holds the
/// pages for `gpas` back to back. A plain `memcpy` into the host mapping, not marked in the
/// dirty bitmap ([`write_bytes`] marks every page: measured ~20% of a secondary's CPU
/// here, for a bitmap no one reads — a VM started on this memory begins with a full sync).
/// An address that is not a whole page of `mem` is an error, and nothing is written then.
pub fn write_pages(mem: &GuestMemory, gpas: &[u64], data: &[u8]) -> Result<(), String> {
    const PAGE: usize = 4096;
    if data.len() != gpas.len() * PAGE {
        return Err(format!("{} bytes for {} pages", data.len(), gpas.len()));
    }
    let regions = host_regions(mem);
    let hosts = gpas
        .iter()
        .map(|&gpa| {
            page_host(&regions, gpa).map(|(_, h)| h).ok_or_else(|| {
                format!("page {gpa:#x} is outside guest memory or not a whole guest page")
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    for (host, page) in hosts.into_iter().zip(data.chunks_exact(PAGE)) {
        // SAFETY: `host .. + PAGE` lies inside a live mapping owned by `mem` (checked by
        // `page_host`); `data` is ordinary host memory, so they cannot overlap. No vCPU
        // runs on this memory (the caller's contract), so no one else writes it.
        unsafe { std::ptr::copy_nonoverlapping(page.as_ptr(), host, PAGE) };
    }
    Ok(())
}

/// Host mappings of guest memory, shared by copy threads.
struct Regions(Vec<(u64, *mut u8, usize)>);

// SAFETY: the pointers are host mappings owned by the `GuestMemory` that outlives every use
// (the copy threads are scoped); the threads only read through them.
unsafe impl Sync for Regions {}

impl Regions {
    fn copy(&self, gpas: &[u64], out: &mut [u8]) -> Result<(), String> {
        const PAGE: usize = 4096;
        let regions = &self.0;
        for (i, &gpa) in gpas.iter().enumerate() {
            let (_, page) = page_host(regions, gpa).ok_or_else(|| {
                format!("page {gpa:#x} is outside guest memory or not a whole guest page")
            })?;
            // SAFETY: `page .. + PAGE` lies inside a live mapping owned by `mem` (checked by
            // `page_host`), `out` has room (checked by the caller), the two cannot overlap
            // (`out` is ordinary host memory), and by the caller's contract nothing writes the
            // guest page meanwhile.
            unsafe {
                std::ptr::copy_nonoverlapping(page, out.as_mut_ptr().add(i * PAGE), PAGE);
            }
        }
        Ok(())
    }
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
