//! Copying an epoch's dirty pages after the guest resumes: userfaultfd write protection.
//!
//! The FT primary must send each epoch's dirty pages as they were at the epoch boundary. A
//! plain copy with the vCPUs paused costs ~0.5 µs per page on this project's host (memory
//! bandwidth), so 4096 pages alone keep the guest paused for ~2 ms. Instead, with the vCPUs
//! paused, [`BackgroundCopy::start`] write-protects the dirty pages (`UFFDIO_WRITEPROTECT`, the
//! mechanism of QEMU's background snapshot) and the guest resumes at once; then
//! [`Copying::finish`] copies the pages while the guest runs, lifting the protection range by
//! range behind it. A write to a page not yet copied — by a vCPU (through KVM, whose mappings
//! the protection invalidates), a device thread or KVM itself — blocks in the kernel and is
//! reported on the userfaultfd; a handler thread copies that page first, then lifts its
//! protection, which wakes the writer. Either way every page is copied before anything can
//! change it, so the copy is the consistent cut the pause defined.
//!
//! Rules that keep it so:
//! - each page is claimed by exactly one copier (an atomic state per page: to do, copying,
//!   done);
//! - the handler lifts protection only under the job lock, after the page is copied, so a
//!   late fault message can never unprotect a page of a newer epoch before it is copied;
//! - a job ends (finished or dropped) only with every page it protected unprotected again.
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

/// Clean pages of a gap up to this long between two dirty pages are protected with them:
/// one ioctl instead of two (a write to such a page costs one fault, served at once).
/// (Measured with a paced `dirtier` pair at ~4500 random dirty pages per epoch in 96 MiB: a
/// protection ioctl costs ~4 µs, a page inside a range ~0.04 µs; 16 → 0.79 ms protecting per
/// epoch, 64 → 0.58 ms, 256 → 0.59 ms.)
const MERGE_GAP_PAGES: u64 = 64;

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
    job: Mutex<Option<Arc<Job>>>,
    /// Write faults served by the handler (cumulative).
    faults: AtomicU64,
}

/// One epoch's copy: the pages (sorted), their host addresses, where each goes in `out`.
struct Job {
    hvas: Vec<u64>,
    /// (host address, page index) sorted by address, when `hvas` is not (guest memory in two
    /// regions whose mappings lie the other way round in the host); else empty.
    by_hva: Vec<(u64, usize)>,
    state: Vec<AtomicU8>,
    /// Protected host ranges (dirty runs, small gaps merged).
    ranges: Vec<(u64, u64)>,
    out: *mut u8,
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
    /// The index of the page at host address `hva`, if it is one of the job's.
    fn find(&self, hva: u64) -> Option<usize> {
        if self.by_hva.is_empty() {
            self.hvas.binary_search(&hva).ok()
        } else {
            self.by_hva
                .binary_search_by_key(&hva, |&(h, _)| h)
                .ok()
                .map(|k| self.by_hva[k].1)
        }
    }

    /// Copies page `i` unless another thread claimed it; returns once it is copied.
    fn ensure_copied(&self, i: usize) {
        match self.state[i].compare_exchange(TODO, COPYING, Ordering::Acquire, Ordering::Acquire) {
            Ok(_) => {
                // SAFETY: `hvas[i]` is a whole page of a live guest mapping (checked by
                // `start`); slot `i` of `out` is in bounds and written only by the claimer;
                // the page is write-protected, so nothing writes it during the copy.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.hvas[i] as *const u8,
                        self.out.add(i * PAGE),
                        PAGE,
                    );
                }
                self.state[i].store(DONE, Ordering::Release);
            }
            Err(_) => {
                while self.state[i].load(Ordering::Acquire) != DONE {
                    std::hint::spin_loop();
                }
            }
        }
    }
}

impl BackgroundCopy {
    /// Registers all of `mem` for write-protect faults and starts the handler thread.
    pub fn new(mem: &GuestMemory) -> Result<Self, Error> {
        let uffd = open_uffd()?;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_PAGEFAULT_FLAG_WP,
            ioctls: 0,
        };
        ioctl(&uffd, UFFDIO_API, &mut api, "UFFDIO_API").map_err(|_| Error::NoWriteProtect)?;
        if api.features & UFFD_FEATURE_PAGEFAULT_FLAG_WP == 0 {
            return Err(Error::NoWriteProtect);
        }
        for (_, host, len) in host_regions(mem) {
            let mut reg = UffdioRegister {
                range: UffdioRange {
                    start: host as u64,
                    len: len as u64,
                },
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
            job: Mutex::new(None),
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
    pub fn start(&self, pages: &[u64], mut buf: Vec<u8>) -> Result<Copying, Error> {
        if pages.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::Unsorted);
        }
        let regions = host_regions(&self.inner.mem);
        let mut hvas = Vec::with_capacity(pages.len());
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut last_region = usize::MAX;
        for &gpa in pages {
            let (r, hva) = page_host(&regions, gpa).ok_or(Error::BadPage(gpa))?;
            let hva = hva as u64;
            hvas.push(hva);
            match ranges.last_mut() {
                Some((start, len))
                    if r == last_region
                        && hva - (*start + *len) <= MERGE_GAP_PAGES * PAGE as u64 =>
                {
                    *len = hva + PAGE as u64 - *start;
                }
                _ => ranges.push((hva, PAGE as u64)),
            }
            last_region = r;
        }
        // Room for the pages, not written here: zeroing fresh memory page-faults it in, and
        // that cost up to 3.6 ms in a pause (measured: the first large epochs of a pair).
        // The copiers write every slot before `finish` sets the length.
        buf.clear();
        if buf.capacity() < pages.len() * PAGE {
            buf = Vec::with_capacity(pages.len() * PAGE);
        }
        let by_hva = if hvas.windows(2).all(|w| w[0] < w[1]) {
            Vec::new()
        } else {
            let mut v: Vec<(u64, usize)> = hvas.iter().copied().zip(0..).collect();
            v.sort_unstable();
            v
        };
        let job = Arc::new(Job {
            state: (0..hvas.len()).map(|_| AtomicU8::new(TODO)).collect(),
            hvas,
            by_hva,
            ranges,
            out: buf.as_mut_ptr(),
        });
        // Published before any page is protected: every fault finds the job.
        *self.inner.job.lock().unwrap() = Some(job.clone());
        let mut copying = Copying {
            inner: self.inner.clone(),
            job,
            buf,
            protected: 0,
            lifted: 0,
            faults_at_start: self.inner.faults.load(Ordering::Relaxed),
        };
        for &(start, len) in &copying.job.ranges {
            self.inner.protect(start, len, true)?;
            copying.protected += 1;
        }
        Ok(copying)
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
    /// `job.ranges[lifted..protected]` are protected.
    protected: usize,
    lifted: usize,
    /// The handler's fault count when the job was published.
    faults_at_start: u64,
}

impl Copying {
    /// Copies every page not copied yet (the guest may run), lifts the protection and returns
    /// the pages and how many guest writes waited for a copy since `start`.
    pub fn finish(mut self) -> Result<Copied, Error> {
        let mut i = 0;
        let job = self.job.clone();
        for &(start, len) in &job.ranges {
            let end = start + len;
            while i < job.hvas.len() && job.hvas[i] < end {
                job.ensure_copied(i);
                i += 1;
            }
            self.inner.protect(start, len, false)?;
            self.lifted += 1;
        }
        *self.inner.job.lock().unwrap() = None;
        // Every page was copied above (by this thread or the handler, which finished its copy
        // before marking it done), so every byte up to here is initialized.
        debug_assert!(job.state.iter().all(|s| s.load(Ordering::Acquire) == DONE));
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
        let mut job = self.inner.job.lock().unwrap();
        for &(start, len) in &self.job.ranges[self.lifted..self.protected] {
            let _ = self.inner.protect(start, len, false);
        }
        if job.as_ref().is_some_and(|j| Arc::ptr_eq(j, &self.job)) {
            *job = None;
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

    /// A write fault at `hva`: copy the page first if the current job has it, then lift the
    /// page's protection (which wakes the writer). Under the job lock, so that no newer job
    /// can have protected the page again in between.
    fn fault(&self, hva: u64) {
        let job = self.job.lock().unwrap();
        if let Some(job) = job.as_ref() {
            if let Some(i) = job.find(hva) {
                job.ensure_copied(i);
            }
        }
        // Counted before the writer is woken, so that it sees its own fault counted.
        self.faults.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.protect(hva, PAGE as u64, false) {
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
        assert!(bg.faults() >= 3, "{} write faults served", bg.faults());
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
