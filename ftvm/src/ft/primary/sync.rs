//! The pre-copy sync of a new secondary (epoch 0): the disk, then every non-zero page while
//! the guest runs, round after round until the core says the rounds converged, then the
//! rest with the guest paused.
use super::Primary;
use crate::ft::capture;
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use ft_core::primary::Phase;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vmm::VmEvent;

/// Pages read and sent at a time while the guest runs (pre-copy).
const PRECOPY_BATCH: usize = 1024;
/// Chunk of the full disk copy during a sync.
const DISK_CHUNK: usize = 1 << 20;

impl Primary {
    /// For a sync: the guest's disk (a second handle), with write keeping switched on and
    /// the writes kept so far dropped (the full copy supersedes them). None without a disk.
    pub(super) fn disk_copy_source(&mut self) -> Result<Option<std::fs::File>> {
        let f = self.vm.with_disk(|d| {
            d.keep_writes(true);
            drop(d.take_writes());
            d.disk().try_clone()
        });
        Ok(f.transpose()?)
    }

    /// Sends the disk's size and its contents as epoch-0 records (the core skips all-zero
    /// chunks: the secondary's copy starts all zeros). False if the secondary was lost.
    pub(super) fn send_disk_copy(&mut self, disk: &std::fs::File) -> Result<bool> {
        use std::os::unix::fs::FileExt;
        let size = disk.metadata()?.len();
        let n = self.core.sync_disk_size(size, &mut self.frames);
        self.flush_frames(n);
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(DISK_CHUNK as u64) as usize;
            let mut data = vec![0u8; n];
            disk.read_exact_at(&mut data, off)
                .context("reading the disk for the secondary's copy")?;
            let frames = self
                .core
                .sync_disk_chunk(off, Bytes::from(data), &mut self.frames);
            self.flush_frames(frames);
            if self.link().lost.is_set() {
                return Ok(false);
            }
            off += n as u64;
            self.status.lock().unwrap().note = format!(
                "syncing the secondary: disk {} of {} MiB",
                off >> 20,
                size >> 20
            );
        }
        Ok(true)
    }

    /// Pre-copy sync of a new secondary, as epoch 0: every non-zero page is sent while the
    /// guest runs, then the pages it dirtied meanwhile, round after round, until the core
    /// says the rounds converged; those and the vCPU and device state go with the guest
    /// paused. Called with the guest paused; returns with epoch 0 acknowledged and the guest
    /// running, or with the core out of the sync (the secondary lost, the guest ended).
    pub(super) fn sync(&mut self) -> Result<()> {
        let t0 = Instant::now();
        let from_boot = self.cap.tracked_from_boot.take();
        // A VM protected from boot (chunk tracking on since before its first instruction)
        // starts running only once its secondary holds epoch 0: there is nothing to chase,
        // and the secondary's setup does not share the cores with the guest's first epochs.
        let hold = from_boot.is_some();
        self.cap.choose_tracking(&self.vm, from_boot.is_some());
        // Chunk tracking starts once the guest runs (below), if it is not on since boot;
        // KVM's log would only cost.
        self.vm.set_dirty_logging(!self.cap.chunks)?;
        self.vm.dirty_pages()?; // a clean log: from here every guest write is seen
        self.cap.background_copy(&self.vm, true); // set up now, not in an epoch's pause
        let n = self.core.begin_sync(self.hello.vcpus, &mut self.frames);
        self.flush_frames(n);
        if !hold {
            self.vm.resume()?;
        }
        if self.cap.chunks && from_boot.is_none() && !self.cap.start_chunk_tracking(&self.vm) {
            // Refused: KVM's log from here (it starts clean, and nothing was read yet).
            self.cap.chunks = false;
            self.vm.set_dirty_logging(true)?;
        }
        let lost = |p: &mut Self| -> Result<()> {
            p.poll_link()?;
            p.core.handle_lost(None);
            Ok(())
        };
        if let Some(disk) = self.disk_copy_source()? {
            // The whole disk first, while the guest runs; writes it makes from here on are
            // kept and follow in the epoch, so the secondary's copy ends up exact.
            if !self.send_disk_copy(&disk)? {
                return lost(self);
            }
        }
        // Pages harvested (or found non-zero) and not sent yet. A page is read after the
        // harvest that reported it, so a write the read misses is reported by the next one.
        let mut todo = match from_boot {
            Some(pages) => pages,
            None => capture::all_nonzero_pages(self.vm.memory())?,
        };
        let mut ended = None;
        let mut rounds = 0;
        loop {
            rounds += 1;
            let mut sent_in_round = 0;
            for chunk in todo.chunks(PRECOPY_BATCH) {
                let data = capture::read_pages(self.vm.memory(), chunk)?;
                let (frames, sent) =
                    self.core
                        .precopy_pages(chunk, &data, self.cap.chunks, &mut self.frames);
                sent_in_round += sent;
                self.flush_frames(frames);
                if self.link().lost.is_set() {
                    return lost(self);
                }
                self.status.lock().unwrap().note = format!(
                    "syncing the secondary: round {rounds}, {} pages sent",
                    self.core.precopy_sent()
                );
            }
            if let Some(ev) = self.vm.wait_event(Some(Duration::ZERO)) {
                ended = Some(ev);
                break;
            }
            let dirty = self.vm.dirty_pages()?.all();
            todo = self.cap.take_written(&self.vm, dirty)?;
            if self
                .core
                .precopy_done(rounds, todo.len(), sent_in_round, self.cap.chunks)
            {
                break;
            }
        }
        let paused_at = Instant::now();
        self.vm.pause()?;
        todo.extend(self.vm.dirty_pages()?.all());
        todo.sort_unstable();
        todo.dedup();
        let exit_code = match &ended {
            None => None,
            Some(VmEvent::Exit(c)) => Some(*c),
            Some(other) => bail!("guest stopped: {other:?}"),
        };
        let snap = self.snapshot(0, &todo, exit_code)?;
        if exit_code.is_none() && !hold {
            self.vm.resume()?;
        }
        let pause = paused_at.elapsed();
        let pre_sent = self.core.precopy_sent();
        let paused_pages = snap.pages.len();
        let cut_sent = self.stream(snap)?;
        while self.core.phase() == Phase::Syncing {
            self.wait_link()?;
        }
        if self.core.phase() != Phase::Protected {
            if let Some(code) = exit_code {
                self.core.guest_ended(code);
            }
            return Ok(());
        }
        self.link().synced.store(true, Ordering::SeqCst);
        if exit_code.is_none() && hold {
            self.vm.resume()?;
        }
        eprintln!(
            "ftvm primary: secondary synced in {} ms: {rounds} pre-copy rounds sent {} pages while the guest ran, then {} pages with the guest paused for {} us ({} pages taken at the pause{})",
            t0.elapsed().as_millis(),
            pre_sent,
            cut_sent,
            pause.as_micros(),
            paused_pages,
            if self.cap.chunks { ", whole chunks, sent if changed" } else { "" }
        );
        self.stats.sync_pauses.push(pause);
        {
            let mut st = self.status.lock().unwrap();
            st.protected = true;
            st.note.clear();
        }
        if let Some(code) = exit_code {
            self.core.guest_ended(code);
        }
        Ok(())
    }
}
