//! Taking an epoch out of the VM: which pages the guest wrote (2 MiB chunk tracking with
//! userfaultfd write protection, or KVM's dirty log), their contents (copied in the pause, or
//! protected in the pause and copied after it while the guest runs), and the vCPU and device
//! state. Mechanism only: what is sent of it is the core's choice ([`ft_core::encoder`]).
use super::{EpochCopy, Tracking};
use anyhow::{anyhow, Result};
use bytes::{Bytes, BytesMut};
use ft_log::PAGE_SIZE;
use std::time::{Duration, Instant};
use vmm::persist::VmState;
use vmm::Vmm;

/// Pages in a 2 MiB chunk of chunk tracking.
const CHUNK_PAGES: usize = vmm::wp::CHUNK as usize / PAGE_SIZE;

/// An epoch's page contents: copied in the pause, or protected and copied after it.
pub enum PageCopy {
    Copied(Bytes),
    Copying(vmm::wp::Copying),
}

/// The primary's page capture machinery.
pub struct Capture {
    epoch_copy: EpochCopy,
    tracking: Tracking,
    /// Write protection for `--epoch-copy background` and chunk tracking: None until first
    /// needed, then Err when the kernel refused it (said once; epochs then copy in the pause
    /// and track with KVM's dirty log).
    wp: Option<std::result::Result<vmm::wp::BackgroundCopy, ()>>,
    /// This protection session tracks writes in 2 MiB chunks (`wp`), not KVM's dirty log.
    pub chunks: bool,
    /// Chunk tracking started before the guest first ran: the non-zero pages then. The
    /// first sync starts from these and the chunks written since, instead of reading all
    /// of guest memory.
    pub tracked_from_boot: Option<Vec<u64>>,
    /// The last snapshot's page buffer, for reuse.
    spare: Vec<u8>,
    /// A page buffer outgrown in the last pause, freed once the guest runs again (freeing
    /// a large buffer unmaps it: measured up to 2 ms of a pause when it was freed there).
    retired: Vec<u8>,
    /// (state capture, page copy or protection) of the last snapshot.
    pub split: (Duration, Duration),
    /// (copy after the pause, write faults it served) of the last finished copy.
    pub bg_split: (Duration, u64),
}

impl Capture {
    pub fn new(epoch_copy: EpochCopy, tracking: Tracking) -> Self {
        Capture {
            epoch_copy,
            tracking,
            wp: None,
            chunks: false,
            tracked_from_boot: None,
            spare: Vec::new(),
            retired: Vec::new(),
            split: Default::default(),
            bg_split: Default::default(),
        }
    }

    /// For a VM protected from boot: tracking already on (see [`track_from_boot`]).
    pub fn set_tracked_from_boot(&mut self, wp: vmm::wp::BackgroundCopy, pages: Vec<u64>) {
        self.wp = Some(Ok(wp));
        self.tracked_from_boot = Some(pages);
    }

    /// Nothing is replicated: no userfaultfd on guest memory until the next sync.
    pub fn stop(&mut self) {
        self.wp = None;
        self.chunks = false;
    }

    /// Chooses this session's tracking (`from_boot`: chunk tracking is on since boot).
    pub fn choose_tracking(&mut self, vm: &Vmm, from_boot: bool) {
        self.chunks = from_boot || self.tracking == Tracking::Chunks && self.uffd(vm).is_some();
    }

    /// Write protection of guest memory (set up on first use), unless the kernel refused it.
    pub fn uffd(&mut self, vm: &Vmm) -> Option<&vmm::wp::BackgroundCopy> {
        let mem = vm.memory();
        self.wp
            .get_or_insert_with(|| {
                vmm::wp::BackgroundCopy::new(mem).map_err(|e| {
                    eprintln!(
                        "ftvm primary: {e}: copying dirty pages with the guest paused and tracking writes with KVM's dirty log instead"
                    )
                })
            })
            .as_ref()
            .ok()
    }

    /// The write protection to copy an epoch's pages after the pause with (set up on first
    /// use), if configured, wanted (`resumes`: the guest runs on after this epoch) and
    /// allowed by the kernel.
    pub fn background_copy(&mut self, vm: &Vmm, resumes: bool) -> bool {
        resumes && self.epoch_copy == EpochCopy::Background && self.uffd(vm).is_some()
    }

    /// Backs all guest memory and starts tracking writes in 2 MiB chunks (guest running);
    /// false if the kernel refused (said why).
    pub fn start_chunk_tracking(&mut self, vm: &Vmm) -> bool {
        let mem = vm.memory().clone();
        let Some(wp) = self.uffd(vm) else {
            return false;
        };
        match back_and_track(&mem, wp) {
            Ok(()) => true,
            Err(e) => {
                eprintln!("ftvm primary: {e}: tracking writes with KVM's dirty log instead");
                false
            }
        }
    }

    /// With chunk tracking: `todo` plus every page of the chunks written since the last call.
    pub fn take_written(&mut self, vm: &Vmm, todo: Vec<u64>) -> Result<Vec<u64>> {
        if !self.chunks {
            return Ok(todo);
        }
        match self.uffd(vm) {
            Some(wp) => wp
                .take_written(&todo)
                .map_err(|e| anyhow!("tracking guest writes: {e}")),
            None => Ok(todo),
        }
    }

    /// With the vCPUs paused: captures the VM's state and the epoch's pages (`pages`: the
    /// dirty pages harvested; with chunk tracking the pages of the chunks written join them).
    /// The pages are protected (or copied) on this thread while the vCPU threads save their
    /// state: the two are independent and each costs a fraction of a millisecond.
    /// `resumes`: the guest runs on after this epoch.
    pub fn snapshot(
        &mut self,
        vm: &mut Vmm,
        pages: &[u64],
        resumes: bool,
    ) -> Result<(VmState, Vec<u64>, PageCopy)> {
        let t = Instant::now();
        let mut spare = std::mem::take(&mut self.spare);
        let tracked = match &self.wp {
            Some(Ok(wp)) if self.chunks => Some(wp.written_chunks()),
            _ => None,
        };
        let need = (pages.len() + tracked.unwrap_or(0) * CHUNK_PAGES) * PAGE_SIZE;
        if spare.capacity() < need {
            // Half again as much, so that a growing working set soon stops reallocating.
            let grown = Vec::with_capacity(need + need / 2);
            self.retired = std::mem::replace(&mut spare, grown);
        }
        let background = self.background_copy(vm, resumes);
        let (wp, track) = match &self.wp {
            Some(Ok(wp)) => (background.then_some(wp), self.chunks.then_some(wp)),
            _ => (None, None),
        };
        let mem = vm.memory().clone();
        let mut pages_done = Duration::ZERO;
        let (state, data) = vm.capture_with(|| {
            let r = match (wp, track) {
                (Some(wp), Some(_)) => wp
                    .cut(pages, spare)
                    .map(|(pages, c)| (pages, PageCopy::Copying(c)))
                    .map_err(|e| anyhow!("write-protecting guest memory: {e}")),
                (Some(wp), None) => wp
                    .start(pages, spare)
                    .map(|c| (pages.to_vec(), PageCopy::Copying(c)))
                    .map_err(|e| anyhow!("write-protecting dirty pages: {e}")),
                (None, track) => (|| {
                    let all = match track {
                        Some(wp) => wp
                            .take_written(pages)
                            .map_err(|e| anyhow!("tracking guest writes: {e}"))?,
                        None => pages.to_vec(),
                    };
                    let data = copy_paused_pages(&mem, &all, spare)?;
                    Ok((all, PageCopy::Copied(data)))
                })(),
            };
            pages_done = t.elapsed();
            r
        })?;
        let (pages, data) = data?;
        self.split = (t.elapsed(), pages_done);
        Ok((state, pages, data))
    }

    /// The pages' contents: waits for a background copy to finish (guest running).
    pub fn finish(&mut self, data: PageCopy) -> Result<Bytes> {
        self.retired = Vec::new();
        Ok(match data {
            PageCopy::Copied(b) => {
                self.bg_split = Default::default();
                b
            }
            PageCopy::Copying(c) => {
                let t = Instant::now();
                let copied = c
                    .finish()
                    .map_err(|e| anyhow!("copying dirty pages: {e}"))?;
                self.bg_split = (t.elapsed(), copied.faults);
                Bytes::from(copied.pages)
            }
        })
    }

    /// Takes a page buffer back for the next snapshot (if nothing else holds it).
    pub fn recycle(&mut self, data: Bytes) {
        if let Ok(m) = data.try_into_mut() {
            self.spare = m.into();
        }
    }
}

/// The contents of `pages`, back to back.
pub fn read_pages(mem: &vmm::memory::GuestMemory, pages: &[u64]) -> Result<Bytes> {
    let mut buf = BytesMut::zeroed(pages.len() * PAGE_SIZE);
    for (i, &gpa) in pages.iter().enumerate() {
        read_page(mem, gpa, &mut buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])?;
    }
    Ok(buf.freeze())
}

/// Reads the page at `gpa` of `mem`.
fn read_page(mem: &vmm::memory::GuestMemory, gpa: u64, out: &mut [u8]) -> Result<()> {
    vmm::memory::read_bytes(mem, gpa, out).map_err(|e| anyhow!("reading guest page {gpa:#x}: {e}"))
}

/// As [`read_pages`], with the vCPUs paused (a plain memcpy), into `buf` (grown if needed,
/// never shrunk: the result may be longer than the pages).
fn copy_paused_pages(
    mem: &vmm::memory::GuestMemory,
    pages: &[u64],
    mut buf: Vec<u8>,
) -> Result<Bytes> {
    let need = pages.len() * PAGE_SIZE;
    if buf.len() < need {
        buf.resize(need, 0);
    }
    vmm::memory::copy_pages(mem, pages, &mut buf)
        .map_err(|e| anyhow!("copying dirty pages: {e}"))?;
    Ok(Bytes::from(buf))
}

/// Every page of guest memory that is not all zeros.
pub fn all_nonzero_pages(mem: &vmm::memory::GuestMemory) -> Result<Vec<u64>> {
    let mut pages = Vec::new();
    let mut page = [0u8; PAGE_SIZE];
    let backed = vmm::memory::backed_pages(mem);
    for ((base, _, _), backed) in vmm::memory::host_regions(mem).into_iter().zip(backed) {
        // Never-backed pages are zero, and reading them would slow the guest down (see
        // `backed_pages`).
        for (i, _) in backed.iter().enumerate().filter(|(_, b)| **b) {
            let gpa = base + (i * PAGE_SIZE) as u64;
            read_page(mem, gpa, &mut page)?;
            if !vmm::memory::is_zero(&page) {
                pages.push(gpa);
            }
        }
    }
    Ok(pages)
}

/// For a VM protected from boot (guest not run yet, memory still sparse): its non-zero pages
/// (cheap now: only backed pages are read), then all memory backed and chunk tracking
/// started, so that the first sync need not read all of guest memory. None where the kernel
/// does not allow (the sync then says why and falls back).
pub fn track_from_boot(vm: &Vmm) -> Result<Option<(vmm::wp::BackgroundCopy, Vec<u64>)>> {
    let Ok(wp) = vmm::wp::BackgroundCopy::new(vm.memory()) else {
        return Ok(None);
    };
    let pages = all_nonzero_pages(vm.memory())?;
    Ok(back_and_track(vm.memory(), &wp)
        .is_ok()
        .then_some((wp, pages)))
}

/// Backs all of `mem` (unpopulated memory first written under protection would be backed
/// in 4 KiB pages: a failure costs speed, not correctness), then starts chunk tracking.
fn back_and_track(
    mem: &vmm::memory::GuestMemory,
    wp: &vmm::wp::BackgroundCopy,
) -> std::result::Result<(), vmm::wp::Error> {
    if let Err(e) = vmm::memory::populate(mem) {
        tracing::warn!("cannot back all guest memory in advance: {e}");
    }
    wp.track()
}
