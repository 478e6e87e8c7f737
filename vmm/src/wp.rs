//! Copying an epoch's dirty pages after the guest resumes: userfaultfd write protection.
//!
//! The FT primary must send each epoch's dirty pages as they were at the epoch boundary. A
//! plain copy with the vCPUs paused costs ~0.5 µs per page on this project's host (memory
//! bandwidth), so 4096 pages alone keep the guest paused for ~2 ms. Instead, with the vCPUs
//! paused, [`BackgroundCopy::start`] write-protects the dirty pages (`UFFDIO_WRITEPROTECT`, the
//! mechanism of QEMU's background snapshot) and the guest resumes at once; then
//! [`Copying::finish`] copies the pages while the guest runs, lifting the protection behind
//! it. A write to a page not yet copied — by a vCPU (through KVM, whose mappings the
//! protection invalidates), a device thread or KVM itself — blocks in the kernel and is
//! reported on the userfaultfd; a handler thread copies the dirty pages around it first,
//! then lifts their protection, which wakes the writer. Either way every page is copied
//! before anything can change it, so the copy is the consistent cut the pause defined.
//!
//! Protection works on whole 2 MiB chunks (aligned in the host, clipped to a memory
//! region): every chunk holding a dirty page is protected, and a chunk's protection is
//! lifted only whole, once all its dirty pages are copied. Guest memory is backed by
//! transparent huge pages; protecting a huge page is one entry, while protecting or lifting
//! part of one splits it into 512 small ones for good. Measured on this project's host
//! (write-protecting 96 MiB): 2 µs as huge pages, 350 µs once split, which is what per-page
//! protection had cost every epoch.
//!
//! Rules that keep the copy exact:
//! - each chunk is claimed by exactly one copier (an atomic state per chunk: to do, copying,
//!   done), which copies all of the chunk's dirty pages;
//! - the handler lifts protection only under the job lock, after the chunk is copied, so a
//!   late fault message can never unprotect a chunk of a newer epoch before it is copied;
//! - a job ends (finished or dropped) only with every chunk it protected unprotected again.
//!
//! Needs a kernel with write-protect userfaults on anonymous memory (5.7+) and the right to
//! create a userfaultfd that sees kernel-mode faults (KVM's): `CAP_SYS_PTRACE`,
//! `vm.unprivileged_userfaultfd=1`, or access to `/dev/userfaultfd`. [`BackgroundCopy::new`]
//! says which is missing; the caller then copies with the guest paused.
use crate::memory::{host_regions, page_host, GuestMemory};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

const PAGE: usize = 4096;

// linux/userfaultfd.h (stable ABI).
const UFFD_API: u64 = 0xAA;
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xC018_AA06;
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xAA00;
const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const IOCTL_WRITEPROTECT_BIT: u64 = 1 << 0x06;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg` (32 bytes); only page faults are read.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct UffdMsg {
    event: u8,
    _reserved: [u8; 7],
    flags: u64,
    address: u64,
    _feat: u64,
}

/// The unit of protection: a transparent huge page.
pub const CHUNK: u64 = 2 << 20;

/// [`Copying::finish`] lifts the protection of up to this many copied chunks at once: each
/// lift is one ioctl and one TLB flush (an interrupt to every CPU running the guest).
const LIFT_BATCH_CHUNKS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create a userfaultfd (needs CAP_SYS_PTRACE, vm.unprivileged_userfaultfd=1 or /dev/userfaultfd): {0}")]
    Create(std::io::Error),
    #[error("userfaultfd: {what}: {err}")]
    Ioctl {
        what: &'static str,
        err: std::io::Error,
    },
    #[error("the kernel has no write-protect userfaults (needs Linux 5.7+)")]
    NoWriteProtect,
    #[error("page {0:#x} is outside guest memory or not page-aligned")]
    BadPage(u64),
    #[error("the dirty pages must be sorted, each once")]
    Unsorted,
    #[error("the userfault handler thread: {0}")]
    Thread(std::io::Error),
    #[error("writes are not being tracked (BackgroundCopy::track was not called)")]
    NotTracking,
    #[error("the kernel cannot write-protect unpopulated memory (UFFD_FEATURE_WP_UNPOPULATED, Linux 6.4+), which tracking needs")]
    NoUnpopulated,
}

/// A userfaultfd registered (write-protect mode) over all guest memory, with its fault
/// handler thread. Dropping it stops the thread and closes the fd (which lifts any protection).
pub struct BackgroundCopy {
    inner: Arc<Inner>,
    stop: OwnedFd,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Inner {
    uffd: OwnedFd,
    /// Keeps the mappings alive for the handler thread.
    mem: GuestMemory,
    /// Host (start, length) of each memory region, as `host_regions` lists them.
    regions: Vec<(u64, u64)>,
    /// Guest address of each region's start.
    guest_bases: Vec<u64>,
    /// Protection covers unpopulated pages too (`UFFD_FEATURE_WP_UNPOPULATED`).
    unpopulated: bool,
    /// Faults, cuts and lifts are serialized by this lock.
    state: Mutex<State>,
    /// Write faults served by the handler (cumulative).
    faults: AtomicU64,
}

#[derive(Default)]
struct State {
    /// The copy in progress, if any.
    job: Option<Arc<Job>>,
    /// While tracking ([`BackgroundCopy::track`]): the host start of every chunk whose
    /// protection was lifted since the last cut. A chunk is recorded here before it is
    /// lifted, so at any moment every chunk is either protected or recorded.
    written: Option<std::collections::BTreeSet<u64>>,
}

/// One epoch's copy: page `i` (the `i`-th of the sorted guest pages) is at host address
/// `hvas[i]` and goes to `out + i * PAGE`.
struct Job {
    hvas: Vec<u64>,
    /// Page indices in host-address order (guest memory in two regions may be mapped the
    /// other way round in the host); each chunk's pages are a run of it.
    order: Vec<u32>,
    /// The protected chunks, by host address.
    chunks: Vec<Chunk>,
    /// Protected host ranges: runs of adjacent chunks of one region.
    ranges: Vec<(u64, u64)>,
    out: *mut u8,
    /// The copy lifts the protection of its chunks once copied (false while tracking: the
    /// chunks stay protected until the guest writes them, so the write is recorded).
    lift: bool,
}

struct Chunk {
    start: u64,
    len: u64,
    /// `order[pages]` are the chunk's dirty pages.
    pages: std::ops::Range<u32>,
    state: AtomicU8,
}

// SAFETY: `out` points into the buffer the `Copying` owns, which outlives the job (the job is
// unpublished before `Copying` gives the buffer back or is dropped); each page slot is written
// by exactly the one thread that won its claim.
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

const TODO: u8 = 0;
const COPYING: u8 = 1;
const DONE: u8 = 2;

impl Job {
    /// The chunk holding host address `hva`, if it is one of the job's.
    fn chunk_at(&self, hva: u64) -> Option<usize> {
        let c = self
            .chunks
            .partition_point(|c| c.start <= hva)
            .checked_sub(1)?;
        (hva < self.chunks[c].start + self.chunks[c].len).then_some(c)
    }

    /// Copies chunk `c`'s dirty pages unless another thread claimed them; returns once they
    /// are copied.
    fn ensure_copied(&self, c: usize) {
        let chunk = &self.chunks[c];
        match chunk
            .state
            .compare_exchange(TODO, COPYING, Ordering::Acquire, Ordering::Acquire)
        {
            Ok(_) => {
                for &i in &self.order[chunk.pages.start as usize..chunk.pages.end as usize] {
                    let i = i as usize;
                    // SAFETY: `hvas[i]` is a whole page of a live guest mapping (checked by
                    // `start`); slot `i` of `out` is in bounds and written only by the
                    // claimer of the one chunk holding page `i`; the chunk is
                    // write-protected, so nothing writes the page during the copy.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            self.hvas[i] as *const u8,
                            self.out.add(i * PAGE),
                            PAGE,
                        );
                    }
                }
                chunk.state.store(DONE, Ordering::Release);
            }
            Err(_) => {
                while chunk.state.load(Ordering::Acquire) != DONE {
                    std::hint::spin_loop();
                }
            }
        }
    }
}

/// How an epoch's pages are protected and copied: see [`plan`].
struct Plan {
    /// Page indices in host-address order.
    order: Vec<u32>,
    /// (host start, length, region, `order` run of its pages) of each chunk holding a page,
    /// by host address.
    chunks: Vec<(u64, u64, usize, std::ops::Range<u32>)>,
    /// Runs of adjacent chunks of one region: one ioctl each.
    ranges: Vec<(u64, u64)>,
}

/// Groups pages (host address `hvas[i]` in region `region_of[i]` of `regions`, host
/// (start, length) each) into the 2 MiB chunks that hold them, and the chunks into ranges.
fn plan(regions: &[(u64, u64)], hvas: &[u64], region_of: &[usize]) -> Plan {
    let mut order: Vec<u32> = (0..hvas.len() as u32).collect();
    if hvas.windows(2).any(|w| w[0] > w[1]) {
        order.sort_unstable_by_key(|&i| hvas[i as usize]);
    }
    let mut chunks: Vec<(u64, u64, usize, std::ops::Range<u32>)> = Vec::new();
    for (k, &i) in order.iter().enumerate() {
        let (hva, r) = (hvas[i as usize], region_of[i as usize]);
        let k = k as u32;
        match chunks.last_mut() {
            Some(c) if hva < c.0 + c.1 => c.3.end = k + 1,
            _ => {
                let (start, len) = chunk_of(regions[r].0, regions[r].1, hva);
                chunks.push((start, len, r, k..k + 1));
            }
        }
    }
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for (n, c) in chunks.iter().enumerate() {
        match ranges.last_mut() {
            Some((start, len)) if *start + *len == c.0 && chunks[n - 1].2 == c.2 => *len += c.1,
            _ => ranges.push((c.0, c.1)),
        }
    }
    Plan {
        order,
        chunks,
        ranges,
    }
}

/// The chunk (host start, length) holding host address `hva` of a region at host `start`
/// of `len` bytes: 2 MiB-aligned in the host, clipped to the region.
fn chunk_of(start: u64, len: u64, hva: u64) -> (u64, u64) {
    let from = (hva & !(CHUNK - 1)).max(start);
    let to = ((hva & !(CHUNK - 1)) + CHUNK).min(start + len);
    (from, to - from)
}

impl BackgroundCopy {
    /// Registers all of `mem` for write-protect faults and starts the handler thread.
    pub fn new(mem: &GuestMemory) -> Result<Self, Error> {
        // Write protection that also covers pages the guest never touched (a marker in the
        // empty entry), where the kernel has it (6.4+): tracking needs it. A failed
        // handshake leaves nothing to retry on, so a fresh fd asks again without it.
        let handshake = |features| -> Result<(OwnedFd, u64), Error> {
            let uffd = open_uffd()?;
            let mut api = UffdioApi {
                api: UFFD_API,
                features,
                ioctls: 0,
            };
            ioctl(&uffd, UFFDIO_API, &mut api, "UFFDIO_API").map_err(|_| Error::NoWriteProtect)?;
            Ok((uffd, api.features))
        };
        let (uffd, features) =
            match handshake(UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED) {
                Ok(r) => r,
                Err(Error::NoWriteProtect) => handshake(UFFD_FEATURE_PAGEFAULT_FLAG_WP)?,
                Err(e) => return Err(e),
            };
        if features & UFFD_FEATURE_PAGEFAULT_FLAG_WP == 0 {
            return Err(Error::NoWriteProtect);
        }
        let listed = host_regions(mem);
        let regions: Vec<(u64, u64)> = listed
            .iter()
            .map(|&(_, host, len)| (host as u64, len as u64))
            .collect();
        let guest_bases = listed.iter().map(|&(gpa, _, _)| gpa).collect();
        for &(start, len) in &regions {
            let mut reg = UffdioRegister {
                range: UffdioRange { start, len },
                mode: UFFDIO_REGISTER_MODE_WP,
                ioctls: 0,
            };
            ioctl(&uffd, UFFDIO_REGISTER, &mut reg, "UFFDIO_REGISTER")?;
            if reg.ioctls & IOCTL_WRITEPROTECT_BIT == 0 {
                return Err(Error::NoWriteProtect);
            }
        }
        let inner = Inner {
            uffd,
            mem: mem.clone(),
            regions,
            guest_bases,
            unpopulated: features & UFFD_FEATURE_WP_UNPOPULATED != 0,
            state: Mutex::default(),
            faults: AtomicU64::new(0),
        };
        // SAFETY: plain eventfd creation; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(Error::Thread(std::io::Error::last_os_error()));
        }
        // SAFETY: `efd` is a fresh fd we own.
        let stop = unsafe { OwnedFd::from_raw_fd(efd) };
        let inner = Arc::new(inner);
        let (i, s) = (inner.clone(), stop.as_raw_fd());
        let thread = std::thread::Builder::new()
            .name("uffd-wp".into())
            .spawn(move || i.serve(s))
            .map_err(Error::Thread)?;
        Ok(Self {
            inner,
            stop,
            thread: Some(thread),
        })
    }

    /// With every vCPU paused and no device touching guest memory: write-protects `pages`
    /// (sorted guest addresses, each once) so that [`Copying::finish`] can copy them into
    /// `buf` (grown as needed) while the guest runs.
    pub fn start(&self, pages: &[u64], buf: Vec<u8>) -> Result<Copying, Error> {
        let (job, buf) = self.job(pages, buf, true)?;
        let mut state = self.inner.state.lock().unwrap();
        // Published before any page is protected: every fault finds the job.
        state.job = Some(job.clone());
        let mut copying = self.copying(job, buf);
        for &(start, len) in &copying.job.ranges {
            self.inner.protect(start, len, true)?;
            copying.protected += 1;
        }
        Ok(copying)
    }

    /// The copy of `pages` into `buf`, not published yet.
    fn job(
        &self,
        pages: &[u64],
        mut buf: Vec<u8>,
        lift: bool,
    ) -> Result<(Arc<Job>, Vec<u8>), Error> {
        let (hvas, region_of) = self.locate(pages)?;
        let Plan {
            order,
            chunks,
            ranges,
        } = plan(&self.inner.regions, &hvas, &region_of);
        let chunks = chunks
            .into_iter()
            .map(|(start, len, _, pages)| Chunk {
                start,
                len,
                pages,
                state: AtomicU8::new(TODO),
            })
            .collect();
        // Room for the pages, not written here: zeroing fresh memory page-faults it in, and
        // that cost up to 3.6 ms in a pause (measured: the first large epochs of a pair).
        // The copiers write every slot before `finish` sets the length.
        buf.clear();
        if buf.capacity() < pages.len() * PAGE {
            buf = Vec::with_capacity(pages.len() * PAGE);
        }
        let job = Arc::new(Job {
            hvas,
            order,
            chunks,
            ranges,
            out: buf.as_mut_ptr(),
            lift,
        });
        Ok((job, buf))
    }

    /// Host address and region of each of `pages` (sorted guest addresses, each once).
    fn locate(&self, pages: &[u64]) -> Result<(Vec<u64>, Vec<usize>), Error> {
        if pages.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::Unsorted);
        }
        let regions = host_regions(&self.inner.mem);
        let mut hvas = Vec::with_capacity(pages.len());
        let mut region_of = Vec::with_capacity(pages.len());
        for &gpa in pages {
            let (r, hva) = page_host(&regions, gpa).ok_or(Error::BadPage(gpa))?;
            hvas.push(hva as u64);
            region_of.push(r);
        }
        Ok((hvas, region_of))
    }

    fn copying(&self, job: Arc<Job>, buf: Vec<u8>) -> Copying {
        Copying {
            inner: self.inner.clone(),
            job,
            buf,
            protected: 0,
            finished: false,
            faults_at_start: self.inner.faults.load(Ordering::Relaxed),
        }
    }

    /// Starts tracking writes at 2 MiB granularity instead of KVM's dirty log (which maps
    /// guest memory in 4 KiB pages for as long as it is on; this keeps the huge pages):
    /// write-protects all guest memory, and from now on each chunk's first write after a
    /// cut faults once and the handler records the chunk, then lifts its protection.
    /// [`BackgroundCopy::take_written`] and [`BackgroundCopy::cut`] then say which pages
    /// may have changed: every page of every chunk written since the last of them.
    ///
    /// Needs the kernel to protect unpopulated memory too (else a first write to a page the
    /// guest never touched would go unseen): [`Error::NoUnpopulated`] otherwise.
    /// Back guest memory first ([`crate::memory::populate`]): protection of an unpopulated
    /// range puts a marker in every 4 KiB entry, and a range first written under such
    /// markers is backed in small pages for good (slower to run, and to protect at every
    /// cut).
    pub fn track(&self) -> Result<(), Error> {
        if !self.inner.unpopulated {
            return Err(Error::NoUnpopulated);
        }
        let mut state = self.inner.state.lock().unwrap();
        state.written = Some(Default::default());
        self.inner.protect_all()
    }

    /// While tracking: the pages of the chunks written since the last cut together with
    /// `extra` (any guest pages, e.g. the VMM's own record of its writes), as sorted guest
    /// addresses, each once; every chunk is protected again from now on. For the pre-copy
    /// rounds, which read pages while the guest runs (a write after this is in the next
    /// cut), and for epochs copied with the guest paused.
    pub fn take_written(&self, extra: &[u64]) -> Result<Vec<u64>, Error> {
        let mut state = self.inner.state.lock().unwrap();
        let written = state.written.as_mut().ok_or(Error::NotTracking)?;
        let chunks = std::mem::take(written);
        if let Err(e) = self.inner.protect_chunks(&chunks) {
            state.written = Some(chunks); // nothing is lost: the next cut has them
            return Err(e);
        }
        Ok(self.chunk_pages(&chunks, extra))
    }

    /// While tracking, with every vCPU paused and no device touching guest memory: the
    /// epoch's cut. Returns the pages of the chunks written since the last cut together
    /// with `extra` (sorted guest addresses, each once: pages written where the tracking
    /// cannot see, such as the VMM's own record), and their copy, which
    /// [`Copying::finish`] makes while the guest runs. Every chunk is protected again; a
    /// chunk of the copy is copied before its first write, which is then recorded for the
    /// next cut.
    pub fn cut(&self, extra: &[u64], buf: Vec<u8>) -> Result<(Vec<u64>, Copying), Error> {
        // Checked before anything is taken: an error here loses no record.
        self.locate(extra)?;
        let mut state = self.inner.state.lock().unwrap();
        let written = state.written.as_mut().ok_or(Error::NotTracking)?;
        let chunks = std::mem::take(written);
        let pages = self.chunk_pages(&chunks, extra);
        let made = self.job(&pages, buf, false).and_then(|(job, buf)| {
            // Published under the same lock as the protection: a fault served after it
            // finds the job and copies its chunk before lifting it.
            state.job = Some(job.clone());
            self.inner.protect_chunks(&chunks)?;
            Ok(self.copying(job, buf))
        });
        match made {
            Ok(copying) => Ok((pages, copying)),
            Err(e) => {
                state.job = None;
                state.written = Some(chunks);
                Err(e)
            }
        }
    }

    /// Chunks written since the last cut (an upper bound on what the next cut copies:
    /// 512 pages each).
    pub fn written_chunks(&self) -> usize {
        let state = self.inner.state.lock().unwrap();
        state.written.as_ref().map_or(0, |w| w.len())
    }

    /// Every page of `chunks` (host starts) and `extra`, as sorted guest addresses, each
    /// once.
    fn chunk_pages(&self, chunks: &std::collections::BTreeSet<u64>, extra: &[u64]) -> Vec<u64> {
        let mut pages = Vec::with_capacity(chunks.len() * (CHUNK as usize / PAGE) + extra.len());
        for &hva in chunks {
            let Some((r, (start, len))) = self.inner.region_chunk(hva) else {
                continue; // recorded from a region's own address: cannot happen
            };
            let gpa = self.inner.guest_bases[r] + (start - self.inner.regions[r].0);
            pages.extend((gpa..gpa + len).step_by(PAGE));
        }
        pages.extend_from_slice(extra);
        pages.sort_unstable();
        pages.dedup();
        pages
    }

    /// Write faults the handler has served since this was created.
    pub fn faults(&self) -> u64 {
        self.inner.faults.load(Ordering::Relaxed)
    }
}

impl Drop for BackgroundCopy {
    fn drop(&mut self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A finished [`Copying`].
pub struct Copied {
    /// Page `i` of the pages given to [`BackgroundCopy::start`] at `i * 4096`.
    pub pages: Vec<u8>,
    /// Write faults the handler served while the job was protected (writes that waited).
    pub faults: u64,
}

/// An epoch's pages, protected, being copied. Dropping it without [`Copying::finish`] lifts
/// the protection (the copy is abandoned).
pub struct Copying {
    inner: Arc<Inner>,
    job: Arc<Job>,
    /// Empty, with room for the pages (written through `job.out` until `finish`).
    buf: Vec<u8>,
    /// `job.ranges[..protected]` were protected.
    protected: usize,
    /// Every chunk was copied and unprotected.
    finished: bool,
    /// The handler's fault count when the job was published.
    faults_at_start: u64,
}

impl Copying {
    /// Copies every page not copied yet (the guest may run), lifts the protection and returns
    /// the pages and how many guest writes waited for a copy since `start`.
    pub fn finish(mut self) -> Result<Copied, Error> {
        let job = self.job.clone();
        if !job.lift {
            // Tracking: the chunks stay protected (their next write is recorded).
            for c in 0..job.chunks.len() {
                job.ensure_copied(c);
            }
        }
        let mut c = 0;
        for &(start, len) in job.ranges.iter().filter(|_| job.lift) {
            let end = start + len;
            // Copied chunks are lifted in batches, adjacent chunks in one ioctl.
            let mut from = start;
            let mut batch = 0;
            while c < job.chunks.len() && job.chunks[c].start < end {
                job.ensure_copied(c);
                batch += 1;
                let to = job.chunks[c].start + job.chunks[c].len;
                c += 1;
                if batch == LIFT_BATCH_CHUNKS || to == end {
                    self.inner.protect(from, to - from, false)?;
                    from = to;
                    batch = 0;
                }
            }
        }
        self.finished = true;
        self.inner.state.lock().unwrap().job = None;
        // Every chunk was copied above (by this thread or the handler, which finished its
        // copy before marking it done), so every byte up to here is initialized.
        debug_assert!(job
            .chunks
            .iter()
            .all(|c| c.state.load(Ordering::Acquire) == DONE));
        // SAFETY: the capacity was reserved by `start`; bytes 0..hvas.len()*PAGE were all
        // written (see above).
        unsafe { self.buf.set_len(job.hvas.len() * PAGE) };
        Ok(Copied {
            pages: std::mem::take(&mut self.buf),
            faults: self.inner.faults.load(Ordering::Relaxed) - self.faults_at_start,
        })
    }
}

impl Drop for Copying {
    fn drop(&mut self) {
        let mut state = self.inner.state.lock().unwrap();
        if !self.finished && self.job.lift {
            for &(start, len) in &self.job.ranges[..self.protected] {
                let _ = self.inner.protect(start, len, false);
            }
        }
        if state
            .job
            .as_ref()
            .is_some_and(|j| Arc::ptr_eq(j, &self.job))
        {
            state.job = None;
        }
    }
}

impl Inner {
    /// Sets (`wp`) or lifts write protection of a host range; lifting wakes its waiters.
    fn protect(&self, start: u64, len: u64, wp: bool) -> Result<(), Error> {
        let mut arg = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: if wp { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
        };
        ioctl(
            &self.uffd,
            UFFDIO_WRITEPROTECT,
            &mut arg,
            "UFFDIO_WRITEPROTECT",
        )
    }

    /// The region holding host address `hva`, and the chunk (host start, length) holding it.
    fn region_chunk(&self, hva: u64) -> Option<(usize, (u64, u64))> {
        let r = self
            .regions
            .iter()
            .position(|&(s, l)| (s..s + l).contains(&hva))?;
        let (start, len) = self.regions[r];
        Some((r, chunk_of(start, len, hva)))
    }

    /// Write-protects `chunks` (host starts, as the handler records them), adjacent ones in
    /// one call. While tracking, the chunks written since the last cut are the only ones
    /// unprotected (the handler records a chunk before it lifts it), so protecting them again
    /// protects all guest memory — without telling KVM that all of it changed: every
    /// protection call drops KVM's mappings of its whole range, and under shadow paging (PVM)
    /// the guest then faults on every page it touches again, read or write.
    fn protect_chunks(&self, chunks: &std::collections::BTreeSet<u64>) -> Result<(), Error> {
        let mut run: Option<(u64, u64)> = None;
        for &hva in chunks {
            let Some((_, (start, len))) = self.region_chunk(hva) else {
                continue; // not recorded from outside guest memory: cannot happen
            };
            run = match run {
                Some((s, l)) if s + l == start => Some((s, l + len)),
                Some((s, l)) => {
                    self.protect(s, l, true)?;
                    Some((start, len))
                }
                None => Some((start, len)),
            };
        }
        match run {
            Some((s, l)) => self.protect(s, l, true),
            None => Ok(()),
        }
    }

    /// Write-protects all guest memory.
    fn protect_all(&self) -> Result<(), Error> {
        for &(start, len) in &self.regions {
            self.protect(start, len, true)?;
        }
        Ok(())
    }

    /// The handler thread: serves write faults until `stop` is signalled.
    fn serve(&self, stop: RawFd) {
        let mut msgs = [UffdMsg::default(); 16];
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: polls two live fds described by a live array.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!("uffd-wp: poll: {}", std::io::Error::last_os_error());
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            if fds[0].revents & libc::POLLIN == 0 {
                continue;
            }
            // SAFETY: reads whole messages into a live buffer of that size.
            let got = unsafe {
                libc::read(
                    self.uffd.as_raw_fd(),
                    msgs.as_mut_ptr().cast(),
                    std::mem::size_of_val(&msgs),
                )
            };
            if got <= 0 {
                continue; // EAGAIN (another wake-up took it) or nothing
            }
            let count = got as usize / std::mem::size_of::<UffdMsg>();
            for m in &msgs[..count] {
                if m.event == UFFD_EVENT_PAGEFAULT {
                    self.fault(m.address & !(PAGE as u64 - 1));
                }
            }
        }
    }

    /// A write fault at `hva`: copy the dirty pages of its chunk first if the current job
    /// has it, record the chunk if tracking, then lift the chunk's protection (which wakes
    /// the writer). Under the state lock, so that no newer job or cut can have protected
    /// the chunk again in between.
    fn fault(&self, hva: u64) {
        let mut state = self.state.lock().unwrap();
        let chunk = match state.job.as_ref().and_then(|j| Some((j, j.chunk_at(hva)?))) {
            Some((j, c)) => {
                j.ensure_copied(c);
                (j.chunks[c].start, j.chunks[c].len)
            }
            // Not the current copy's (while tracking: a chunk's first write since the cut),
            // or a late message for a chunk lifted already. Lifted whole (the same chunk as
            // a job's), which keeps its huge page whole.
            None => self
                .region_chunk(hva)
                .map_or((hva, PAGE as u64), |(_, chunk)| chunk),
        };
        if let Some(w) = state.written.as_mut() {
            w.insert(chunk.0);
        }
        // Counted before the writer is woken, so that it sees its own fault counted.
        self.faults.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.protect(chunk.0, chunk.1, false) {
            tracing::error!("uffd-wp: lifting protection of {hva:#x}: {e}");
        }
    }
}

fn open_uffd() -> Result<OwnedFd, Error> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: the userfaultfd syscall takes flags only; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as RawFd;
    if fd >= 0 {
        // SAFETY: a fresh fd we own.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let sys_err = std::io::Error::last_os_error();
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .map_err(|_| Error::Create(sys_err))?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its argument; the result is checked.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
    if fd < 0 {
        return Err(Error::Create(std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl<T>(
    fd: &OwnedFd,
    req: libc::c_ulong,
    arg: &mut T,
    what: &'static str,
) -> Result<(), Error> {
    // SAFETY: `req` is a userfaultfd ioctl whose argument type is `T`, passed as a live
    // exclusive pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T) };
    if r < 0 {
        return Err(Error::Ioctl {
            what,
            err: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn fill(mem: &GuestMemory, gpa: u64, byte: u8) {
        mem.write_slice(&[byte; PAGE], GuestAddress(gpa)).unwrap();
    }

    /// Fills page `n` of `pages` with `n + 1`, protects them, writes 0xaa to `writes` from
    /// other threads while they are protected (each write completes: the handler copies its
    /// page first), then checks that the copy holds the contents from before the writes.
    fn copy_during_writes(mem: &GuestMemory, bg: &BackgroundCopy, pages: &[u64], writes: &[u64]) {
        for (n, &p) in pages.iter().enumerate() {
            fill(mem, p, n as u8 + 1);
        }
        let copying = bg.start(pages, Vec::new()).unwrap();
        let writers: Vec<_> = writes
            .iter()
            .map(|&gpa| {
                let m = mem.clone();
                std::thread::spawn(move || fill(&m, gpa, 0xaa))
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        let copied = copying.finish().unwrap();
        let buf = &copied.pages;
        for n in 0..pages.len() {
            assert!(
                buf[n * PAGE..(n + 1) * PAGE]
                    .iter()
                    .all(|&b| b == n as u8 + 1),
                "page {n} copied after a write"
            );
        }
    }

    #[test]
    fn a_write_during_the_copy_waits_and_the_copy_keeps_the_old_contents() {
        let mem = crate::memory::create(16).unwrap();
        let bg = match BackgroundCopy::new(&mem) {
            Ok(bg) => bg,
            Err(e) => panic!("userfaultfd write protection is needed here: {e}"),
        };
        let pages = [0x10000, 0x11000, 0x13000, 0x40000, 0x7f000, 0x200000];
        // 0x12000 lies in a merged gap, not dirty. Writes to dirty pages (they must wait for
        // the copy) and to that clean page inside a protected range:
        fill(&mem, 0x12000, 0xee);
        copy_during_writes(&mem, &bg, &pages, &[0x40000, 0x200000, 0x12000]);
        // The writes fall in two 2 MiB chunks; each chunk is lifted whole on its first fault.
        assert!(bg.faults() >= 2, "{} write faults served", bg.faults());
        let mut now = [0u8; PAGE];
        for gpa in [0x40000u64, 0x200000, 0x12000] {
            mem.read_slice(&mut now, GuestAddress(gpa)).unwrap();
            assert!(
                now.iter().all(|&b| b == 0xaa),
                "the write to {gpa:#x} was lost"
            );
        }
        // Nothing stays protected: a write now completes at once.
        fill(&mem, 0x10000, 7);
    }

    /// Above 3 GiB guest memory has two regions; the host may map the second below the first,
    /// so host addresses of sorted guest pages are not sorted. A write must still find its page.
    #[test]
    fn a_write_to_the_second_memory_region_waits_for_its_copy() {
        let mem = crate::memory::create(3 * 1024 + 64).unwrap();
        let bg = BackgroundCopy::new(&mem).unwrap();
        let high = crate::layout::MMIO_GAP_END;
        copy_during_writes(
            &mem,
            &bg,
            &[0x10000, 0x20000, high, high + 0x5000],
            &[0x20000, high + 0x5000],
        );
    }

    /// Huge pages of the mapping holding host address `hva` (kB, from /proc/self/smaps).
    fn huge_kb(hva: u64) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ').filter(|(r, _)| r.contains('-')) {
                let (a, b) = range.split_once('-').unwrap();
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    inside = (a..b).contains(&hva);
                    continue;
                }
            }
            if inside {
                if let Some(kb) = line.strip_prefix("AnonHugePages:") {
                    return kb.trim().trim_end_matches(" kB").trim().parse().unwrap();
                }
            }
        }
        panic!("no mapping holds {hva:#x}")
    }

    /// Protection and lifting work on whole 2 MiB chunks, so the huge pages backing guest
    /// memory stay whole (per-page protection split them, and every later epoch paid for
    /// protecting 512 small pages instead of one huge one).
    #[test]
    fn huge_pages_stay_whole_through_a_copy_with_writes() {
        if std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|s| s.contains("[never]"))
        {
            eprintln!("transparent huge pages are switched off on this host: nothing to check");
            return;
        }
        let mem = crate::memory::create(16).unwrap();
        let bg = BackgroundCopy::new(&mem).unwrap();
        for gpa in (0..16u64 << 20).step_by(CHUNK as usize) {
            fill(&mem, gpa, 1);
        }
        let hva = host_regions(&mem)[0].1 as u64;
        let before = huge_kb(hva);
        assert!(
            before >= 4096,
            "only {before} kB of huge pages backing 16 MiB of guest memory"
        );
        let pages: Vec<u64> = (0..40).map(|n| 0x3000 + n * 0x31000).collect();
        copy_during_writes(&mem, &bg, &pages, &[pages[3], pages[20], pages[39]]);
        assert_eq!(huge_kb(hva), before, "huge pages were split");
    }

    /// Every page of the chunk holding each of `gpas` (region 0 of `bg`), sorted.
    fn chunk_pages_of(bg: &BackgroundCopy, gpas: &[u64]) -> Vec<u64> {
        let (host, len) = bg.inner.regions[0];
        let mut pages: Vec<u64> = gpas
            .iter()
            .flat_map(|g| {
                let (start, len) = chunk_of(host, len, host + g);
                (start - host..start - host + len).step_by(PAGE)
            })
            .collect();
        pages.sort_unstable();
        pages.dedup();
        pages
    }

    /// Tracking at 2 MiB: after `track` or a cut, the first write to each chunk faults once
    /// and lifts the whole chunk; further writes to it do not fault; the cut reports every
    /// page of each written chunk, and nothing more.
    #[test]
    fn tracking_faults_once_per_written_chunk_and_reports_its_pages() {
        let mem = crate::memory::create(16).unwrap();
        let bg = BackgroundCopy::new(&mem).unwrap();
        for gpa in (0..16u64 << 20).step_by(PAGE) {
            fill(&mem, gpa, 1);
        }
        assert!(matches!(bg.take_written(&[]), Err(Error::NotTracking)));
        let writes = [
            0x1000u64, 0x2000, 0x1f_f000, 0x40_0000, 0x40_8000, 0xe0_0000,
        ];
        // The chunks they fall in (three where the mapping is 2 MiB-aligned, as Linux 6.7+
        // aligns large anonymous mappings).
        let expect = chunk_pages_of(&bg, &writes);
        bg.track().unwrap();
        for round in 0..3 {
            let before = bg.faults();
            for gpa in writes {
                fill(&mem, gpa, 2 + round);
            }
            let chunks = expect.len().div_ceil(512);
            assert!(bg.written_chunks() <= chunks && bg.written_chunks() > 0);
            assert!(
                bg.faults() - before <= chunks as u64,
                "round {round}: {} faults",
                bg.faults() - before
            );
            assert_eq!(bg.take_written(&[]).unwrap(), expect, "round {round}");
            assert!(
                bg.take_written(&[]).unwrap().is_empty(),
                "nothing written since"
            );
        }
    }

    /// The tracked copy against a writer that keeps writing: at every cut (the writer stopped,
    /// as the vCPUs are in a pause) a replica updated only from the cuts' copies equals
    /// guest memory, while between cuts the writer runs during the copy.
    #[test]
    fn a_replica_fed_by_cuts_equals_memory_at_every_cut() {
        use std::sync::atomic::{AtomicBool, AtomicU32};
        const MIB: u64 = 16;
        let mem = crate::memory::create(MIB).unwrap();
        let bg = BackgroundCopy::new(&mem).unwrap();
        let snapshot = |mem: &GuestMemory| {
            let mut v = vec![0u8; (MIB << 20) as usize];
            mem.read_slice(&mut v, GuestAddress(0)).unwrap();
            v
        };
        bg.track().unwrap();
        let mut replica = snapshot(&mem); // what a full pre-copy would have sent
        let stop = Arc::new(AtomicBool::new(false));
        let paused = Arc::new(AtomicBool::new(false));
        let parked = Arc::new(AtomicU32::new(0));
        let writer = {
            let (mem, stop, paused, parked) =
                (mem.clone(), stop.clone(), paused.clone(), parked.clone());
            std::thread::spawn(move || {
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
                let mut n: u64 = 0;
                let mut far = true;
                while !stop.load(Ordering::SeqCst) {
                    if paused.load(Ordering::SeqCst) {
                        parked.store(1, Ordering::SeqCst);
                        while paused.load(Ordering::SeqCst) {
                            std::hint::spin_loop();
                        }
                        parked.store(0, Ordering::SeqCst);
                        far = true;
                    }
                    // xorshift: 3 MiB of hot memory (up to 3 chunks), and once after each
                    // cut (while the copy runs) anywhere.
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let span = if std::mem::take(&mut far) {
                        MIB << 20
                    } else {
                        3 << 20
                    };
                    let gpa = ((x >> 8) % span) & !7;
                    n += 1;
                    mem.write_obj(n, GuestAddress(gpa)).unwrap();
                }
            })
        };
        let mut copied_pages = 0;
        for round in 0..60 {
            std::thread::sleep(std::time::Duration::from_millis(2));
            paused.store(true, Ordering::SeqCst);
            while parked.load(Ordering::SeqCst) == 0 {
                std::hint::spin_loop();
            }
            let at_cut = snapshot(&mem);
            let extra = [0x5000u64 * (round % 3)]; // as the VMM's own writes would be
            let (pages, copying) = bg.cut(&extra, Vec::new()).unwrap();
            paused.store(false, Ordering::SeqCst);
            let copied = copying.finish().unwrap();
            assert!(pages.contains(&extra[0]));
            for (i, &gpa) in pages.iter().enumerate() {
                let g = gpa as usize;
                replica[g..g + PAGE].copy_from_slice(&copied.pages[i * PAGE..(i + 1) * PAGE]);
            }
            copied_pages += pages.len();
            assert!(
                replica == at_cut,
                "round {round}: the replica differs from memory at the cut"
            );
        }
        stop.store(true, Ordering::SeqCst);
        paused.store(false, Ordering::SeqCst);
        writer.join().unwrap();
        // At most 4 of the 8 chunks were written between two cuts: only those were copied.
        assert!(
            copied_pages <= 60 * (4 * CHUNK as usize / PAGE + 1),
            "{copied_pages} pages copied"
        );
    }

    /// A cut refused for a bad extra page loses no record of written chunks.
    #[test]
    fn a_refused_cut_keeps_the_written_chunks() {
        let mem = crate::memory::create(16).unwrap();
        let bg = BackgroundCopy::new(&mem).unwrap();
        bg.track().unwrap();
        fill(&mem, 0x30000, 1);
        assert!(matches!(
            bg.cut(&[0x2000, 0x1000], Vec::new()),
            Err(Error::Unsorted)
        ));
        assert!(matches!(
            bg.cut(&[1 << 40], Vec::new()),
            Err(Error::BadPage(_))
        ));
        let (pages, copying) = bg.cut(&[], Vec::new()).unwrap();
        assert!(pages.contains(&0x30000));
        assert_eq!(copying.finish().unwrap().pages.len(), pages.len() * PAGE);
    }

    proptest::proptest! {
        /// Any pages of up to two regions (either host order, 2 MiB-aligned or not): every
        /// page lies in exactly one chunk of its region, chunks are whole 2 MiB-aligned
        /// chunks clipped only at region edges, and the ranges cover exactly the chunks.
        #[test]
        fn chunks_hold_every_page_once_and_ranges_cover_exactly_the_chunks(
            base_a in 0u64..64, base_b in 0u64..64, pages_a in 1u64..2048, pages_b in 1u64..2048,
            b_first in proptest::bool::ANY,
            picks in proptest::collection::btree_set(0u64..4096, 0..300),
        ) {
            const P: u64 = PAGE as u64;
            // Region starts: some page-aligned, not 2 MiB-aligned, offset.
            let a = (0x10_0000_0000 + base_a * P, pages_a * P);
            let b_start = if b_first { a.0 - pages_b * P - base_b * P } else { a.0 + a.1 + base_b * P };
            let regions = [a, (b_start, pages_b * P)];
            // Pages in guest order: region a's first, then b's.
            let (mut hvas, mut region_of) = (Vec::new(), Vec::new());
            for &n in &picks {
                let (r, n) = if n < pages_a { (0, n) } else if n - pages_a < pages_b { (1, n - pages_a) } else { continue };
                hvas.push(regions[r].0 + n * P);
                region_of.push(r);
            }
            let plan = plan(&regions, &hvas, &region_of);
            let mut seen = vec![0u32; hvas.len()];
            let mut last_end = 0u64;
            for &(start, len, r, ref pages) in &plan.chunks {
                let (rs, rl) = regions[r];
                proptest::prop_assert!(start >= last_end, "chunks overlap or are unsorted");
                last_end = start + len;
                proptest::prop_assert!(start >= rs && start + len <= rs + rl);
                proptest::prop_assert!(start % CHUNK == 0 || start == rs);
                proptest::prop_assert!((start + len) % CHUNK == 0 || start + len == rs + rl);
                proptest::prop_assert!(len <= CHUNK && len > 0);
                for &i in &plan.order[pages.start as usize..pages.end as usize] {
                    let i = i as usize;
                    seen[i] += 1;
                    proptest::prop_assert!(region_of[i] == r);
                    proptest::prop_assert!(hvas[i] >= start && hvas[i] + P <= start + len);
                }
            }
            proptest::prop_assert!(seen.iter().all(|&n| n == 1), "a page in {seen:?} chunks");
            // The ranges are the chunks, merged where adjacent in one region.
            let covered: u64 = plan.ranges.iter().map(|r| r.1).sum();
            let chunked: u64 = plan.chunks.iter().map(|c| c.1).sum();
            proptest::prop_assert_eq!(covered, chunked);
            for &(start, len) in &plan.ranges {
                proptest::prop_assert!(plan.chunks.iter().any(|c| c.0 == start));
                proptest::prop_assert!(plan.chunks.iter().any(|c| c.0 + c.1 == start + len));
            }
        }
    }

    #[test]
    fn an_abandoned_copy_lifts_the_protection() {
        let mem = crate::memory::create(16).unwrap();
        let bg = BackgroundCopy::new(&mem).unwrap();
        fill(&mem, 0x30000, 1);
        drop(bg.start(&[0x30000], Vec::new()).unwrap());
        let before = bg.faults();
        fill(&mem, 0x30000, 2);
        assert_eq!(bg.faults(), before);
    }

    #[test]
    fn bad_page_lists_are_refused() {
        let mem = crate::memory::create(16).unwrap();
        let bg = BackgroundCopy::new(&mem).unwrap();
        assert!(matches!(
            bg.start(&[0x2000, 0x1000], Vec::new()),
            Err(Error::Unsorted)
        ));
        assert!(matches!(
            bg.start(&[0x1001], Vec::new()),
            Err(Error::BadPage(0x1001))
        ));
        assert!(matches!(
            bg.start(&[1 << 40], Vec::new()),
            Err(Error::BadPage(_))
        ));
    }
}
