//! The primary's epochs: running the guest until the core closes the epoch, the pause
//! (state and pages), backpressure, streaming, and the acknowledgements coming back.
use super::Primary;
use crate::ctl;
use crate::ft::capture;
use crate::ft::link::Lost;
use crate::ft::stats::EpochStat;
use anyhow::{bail, Result};
use bytes::{Bytes, BytesMut};
use ft_core::assemble::EpochParts;
use ft_core::primary::{Frames, Phase};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vmm::persist::{encode_part, VmState};
use vmm::VmEvent;

/// One epoch as captured while the guest was paused.
pub(super) struct Snapshot {
    epoch: u64,
    state: VmState,
    pub(super) pages: Vec<u64>,
    data: capture::PageCopy,
    output: Bytes,
    /// Console-stream offset of `output`'s first byte.
    offset: u64,
    exit: Option<u8>,
    events: Vec<vmm::devices::events::DeviceEvent>,
    disk: Vec<vmm::devices::virtio_blk::DiskWrite>,
    /// The frames the guest transmitted in the epoch (None: the VM has no network device).
    net: Option<Frames>,
}

impl Primary {
    /// Whether transmitted frames wait in the device (an epoch then closes early).
    pub(super) fn frames_waiting(&self) -> bool {
        self.sinks.tap.is_some() && self.vm.with_net(|n| n.held_tx() > 0).unwrap_or(false)
    }

    /// Acknowledgements that arrived (released as the core allows) and the link's state (a
    /// lost secondary moves the core to arbitration).
    pub(super) fn poll_link(&mut self) -> Result<()> {
        let mut bad = None;
        while let Ok(k) = self.link().acks.try_recv() {
            if let Err(e) = self.core.handle_ack(k) {
                bad = Some(e);
                break;
            }
        }
        if let Some(e) = bad {
            self.link().lost.set(Lost::Closed(e.to_string()));
        }
        self.release()?;
        if let Some(why) = self.link().lost.get() {
            self.core.handle_lost(why.silence());
        }
        Ok(())
    }

    /// Waits up to 5 ms for an acknowledgement, then takes in whatever the link brought (see
    /// [`Primary::poll_link`]). Callers loop on the condition they wait for.
    pub(super) fn wait_link(&mut self) -> Result<()> {
        if let Ok(k) = self.link().acks.recv_timeout(Duration::from_millis(5)) {
            if let Err(e) = self.core.handle_ack(k) {
                self.link().lost.set(Lost::Closed(e.to_string()));
            }
        }
        self.poll_link()
    }

    /// Sends encoded frames; a failure marks the secondary lost.
    pub(super) fn send_owned(&mut self, b: Bytes, frames: u64) {
        let r = self.rt.block_on(
            self.link
                .as_mut()
                .unwrap()
                .log_tx
                .send_frames_owned(b, frames),
        );
        if let Err(e) = r {
            self.link().lost.set(Lost::Closed(format!("sending: {e}")));
        }
    }

    pub(super) fn send_record(&mut self, epoch: u64, rec: &ft_log::Record) {
        let mut b = BytesMut::new();
        rec.encode(epoch, &mut b);
        self.send_owned(b.freeze(), 1);
    }

    /// Sends what the core encoded into the frames buffer.
    pub(super) fn flush_frames(&mut self, frames: u64) {
        if frames > 0 {
            let b = self.frames.split().freeze();
            self.send_owned(b, frames);
        }
    }

    /// One protection session: pre-copy sync (epoch 0), then epochs, until the core leaves
    /// the protected phases (the guest ended and the secondary knows, the secondary is lost,
    /// a stop was requested, or a write was fenced off). Called with the guest paused.
    pub(super) fn protect(&mut self) -> Result<()> {
        self.sync()?;
        for epoch in 1.. {
            if self.core.phase() != Phase::Protected {
                return self.drain();
            }
            // Run the epoch; the core says when it closes.
            let t0 = Instant::now();
            let mut ended = None;
            loop {
                if let Some(ev) = self.vm.wait_event(Some(Duration::from_micros(500))) {
                    ended = Some(ev);
                    break;
                }
                let waiting = !self.held.is_empty() || self.frames_waiting();
                if self
                    .core
                    .epoch_due(Instant::now(), t0, waiting, self.events.len())
                {
                    break;
                }
                self.poll_link()?;
                if self.core.phase() != Phase::Protected {
                    return Ok(());
                }
                if let Ok((req, reply)) = self.requests.try_recv() {
                    match self.core.request_stop(req == ctl::Request::FtOff) {
                        Ok(rec) => {
                            self.vm.pause()?;
                            // The secondary exits without taking over; the arbitration comes
                            // next. No close here: it could discard the Stop in flight.
                            self.send_record(0, &rec);
                            self.stop_reply = Some(reply);
                            return Ok(());
                        }
                        Err(e) => {
                            let _ = reply.send(ctl::Outcome::Error(e.to_string()));
                        }
                    }
                }
            }
            let paused_at = Instant::now();
            self.vm.pause()?;
            let kick = paused_at.elapsed();
            let dirty = self.vm.dirty_pages()?.all();
            let harvest = paused_at.elapsed() - kick;
            let exit_code = match &ended {
                None => None,
                Some(VmEvent::Exit(c)) => Some(*c),
                Some(other) => bail!("guest stopped: {other:?}"),
            };
            let snap = self.snapshot(epoch, &dirty, exit_code)?;
            // Backpressure: with too many epochs unacknowledged the guest stays paused until
            // the secondary catches up, rather than the primary buffering without bound.
            let throttled_at = Instant::now();
            while self.core.throttled() && self.core.phase() == Phase::Protected {
                self.wait_link()?;
            }
            let throttle = throttled_at.elapsed();
            if self.core.phase() != Phase::Protected {
                // Lost while throttled: the epoch is held (released if the arbitration is
                // won) but never sent.
                if let Some(code) = exit_code {
                    self.core.guest_ended(code);
                }
                return Ok(());
            }
            if exit_code.is_none() {
                self.vm.resume()?;
            }
            let pause = paused_at.elapsed();
            let pages = snap.pages.len();
            let sent = self.stream(snap)?;
            self.stats.epochs.push(EpochStat {
                pause,
                pages,
                sent,
                kick,
                harvest,
                capture: self.cap.split.0,
                copy: self.cap.split.1,
                bg_copy: self.cap.bg_split.0,
                bg_faults: self.cap.bg_split.1,
                throttle,
            });
            self.update_status(epoch, pause);
            self.poll_link()?;
            if let Some(code) = exit_code {
                self.core.guest_ended(code);
            }
        }
        unreachable!()
    }

    /// The guest ended: once the secondary has acknowledged everything, tell it.
    pub(super) fn drain(&mut self) -> Result<()> {
        loop {
            self.poll_link()?;
            if !matches!(self.core.phase(), Phase::Draining { .. }) {
                return Ok(());
            }
            if let Some((epoch, rec)) = self.core.poll_shutdown() {
                let link = self.link.as_mut().expect("a protection session has a link");
                let _ = self.rt.block_on(link.log_tx.send_record(epoch, &rec));
                return Ok(());
            }
            self.wait_link()?;
        }
    }

    /// With the vCPUs paused: captures epoch `epoch`'s state and pages and takes its output
    /// into the core (held from this moment). Everything slow (hashing, encoding, sending)
    /// happens later, in [`Primary::stream`], while the guest runs again.
    pub(super) fn snapshot(
        &mut self,
        epoch: u64,
        pages: &[u64],
        exit: Option<u8>,
    ) -> Result<Snapshot> {
        let (state, pages, data) = self.cap.snapshot(&mut self.vm, pages, exit.is_none())?;
        let (output, since) = self.held.take_timed();
        let output = Bytes::from(output);
        let net = self.vm.with_net(|n| Arc::new(n.take_tx()));
        let captured = self
            .core
            .hold(output.clone(), net.clone().unwrap_or_default(), since);
        debug_assert_eq!(captured.epoch, Some(epoch));
        Ok(Snapshot {
            epoch,
            state,
            pages,
            data,
            output,
            offset: captured.offset,
            exit,
            events: self.events.take(),
            disk: self.vm.with_disk(|d| d.take_writes()).unwrap_or_default(),
            net,
        })
    }

    /// Streams a snapshot (guest running); its output is already held. Returns how many of
    /// its pages were sent.
    pub(super) fn stream(&mut self, snap: Snapshot) -> Result<usize> {
        let Snapshot {
            epoch,
            state,
            pages,
            data,
            output,
            offset,
            exit,
            events,
            disk,
            net,
        } = snap;
        let data = self.cap.finish(data)?;
        let vcpus = state
            .vcpus
            .iter()
            .map(|v| Ok((v.id, Bytes::from(encode_part(v)?))))
            .collect::<Result<Vec<_>>>()?;
        let parts = EpochParts {
            epoch,
            pages: &pages,
            data: &data,
            changed_only: self.cap.chunks,
            vcpus: &vcpus,
            kvm: Bytes::from(encode_part(&state.vm)?),
            vmm: Bytes::from(encode_part(&state.devices)?),
            events: &events,
            exit,
            disk: disk
                .into_iter()
                .map(|w| (w.offset, Bytes::from(w.data)))
                .collect(),
            output,
            offset,
            frames: net.as_deref().map(Vec::as_slice),
        };
        self.frames.clear();
        let a = self.core.assemble(parts, &mut self.frames);
        self.status.lock().unwrap().events += events.len() as u64;
        self.flush_frames(a.frames);
        self.cap.recycle(data);
        Ok(a.pages)
    }
}
