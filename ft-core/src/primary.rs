//! The primary's side of the FT protocol, sans IO: every decision the primary takes, fed
//! acknowledgements, losses, arbitration verdicts and `now`, answering with what to send and
//! what output may leave. The driver (the `ftvm primary` process, or the simulator) owns the
//! VM, the link, the datastore and the sinks, and does what this says.
//!
//! ```text
//!                 start_session(s)               handle_ack(0)
//!   Unprotected ──────────────────▶ Syncing ────────────────────▶ Protected
//!    ▲    │                           │ handle_lost,                 │ handle_lost,
//!    │    │ guest ended               │ request_stop                 │ request_stop
//!    │    ▼                           ▼                              ▼
//!    │  Ended(code) ◀── won, ended ── Arbitrating ◀──────────────────┤
//!    └───────────────── won ──────────┘   │ lost, superseded         │ guest ended
//!                                         ▼                          ▼
//!                 handle_fenced ──────▶ Halted              Draining(code) ── all acked,
//!                 (any phase)                                  │ lost           Shutdown ──▶ Ended
//!                                                              └──▶ Arbitrating
//! ```
//!
//! # The output rule
//!
//! The guest's output (console bytes, transmitted frames) is handed to [`Primary::hold`] when
//! it is taken from the devices. While protected it belongs to the epoch being closed and
//! leaves ([`Primary::poll_release`]) only once the secondary has acknowledged that epoch;
//! unprotected (no secondary, or after winning the arbitration) it leaves at once. What
//! leaves still passes the datastore's fence ([`crate::datastore::fenced`]) at the moment of
//! writing: a release this core allowed can still be refused there, if the process was
//! paused and someone else took over meanwhile ([`Primary::handle_fenced`]).
//!
//! # Epochs
//!
//! An epoch closes after [`Config::epoch`], or after [`Config::min_epoch`] once output waits
//! (output latency is the epoch plus the acknowledgement), or once the guest has seen
//! [`Config::max_epoch_events`] device inputs. With more than [`Config::max_in_flight`]
//! epochs unacknowledged the guest stays paused until the secondary catches up (backpressure).
use crate::assemble::{self, EpochParts};
use crate::datastore::Verdict;
use crate::detect::Silence;
use crate::encoder::PageEncoder;
use bytes::{Bytes, BytesMut};
use ft_log::record::{encode_pages, EpochHasher};
use ft_log::Record;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The primary's settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// The longest epoch.
    pub epoch: Duration,
    /// An epoch with output waiting closes after this.
    pub min_epoch: Duration,
    /// Epochs sent but not acknowledged before the guest is throttled.
    pub max_in_flight: usize,
    /// An epoch closes once its guest has seen this many device inputs (bounds the epoch's
    /// event records: a guest polling a port produces one per read).
    pub max_epoch_events: usize,
}

/// The longest epoch by default (`ftvm primary --epoch-ms`), chosen by measurement
/// (`ftvm-bench ft`, README Performance): at 1 vCPU the compile-profile stand-in ran 1.07×
/// its unprotected time with 50 ms epochs and 1.21× with 20 ms, with output latency and
/// failover time unchanged (epochs close early when output waits).
pub const DEFAULT_EPOCH_MS: u64 = 50;
/// Epochs streamed but not yet acknowledged before the primary throttles the guest.
pub const MAX_IN_FLIGHT: usize = 4;

impl Default for Config {
    fn default() -> Self {
        Config {
            epoch: Duration::from_millis(DEFAULT_EPOCH_MS),
            min_epoch: Duration::from_millis(2),
            max_in_flight: MAX_IN_FLIGHT,
            max_epoch_events: 16 * 1024,
        }
    }
}

/// Pre-copy sync: rounds of pages sent while the guest runs end when at most this many pages
/// were dirtied during the last round (≈ 4 MiB: a few ms of pause to send with the state)…
pub const PRECOPY_DONE_PAGES: usize = 1024;
/// … or after this many rounds (a guest dirtying faster than the link drains never converges).
pub const PRECOPY_MAX_ROUNDS: usize = 8;

/// Network frames the guest transmitted (shared between the held output and the epoch's
/// record).
pub type Frames = Arc<Vec<Vec<u8>>>;

/// Output taken from the guest and not released yet.
#[derive(Debug, Clone)]
pub struct Held {
    /// The epoch it belongs to; None when it was taken unprotected (it leaves at once).
    pub epoch: Option<u64>,
    pub output: Bytes,
    pub frames: Frames,
    /// When its first byte left the guest (for the output-latency statistics).
    pub since: Option<Instant>,
}

/// Why the primary must arbitrate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The secondary is lost (the link's evidence, if it was silence rather than a close).
    SecondaryLost(Option<Silence>),
    /// Replication stops on request: Suspend FT, or Turn Off FT when `off`.
    Stop { off: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Owning the VM without a secondary: output leaves at once.
    Unprotected,
    /// A protection session's epoch 0 (the pre-copy sync) is in progress.
    Syncing,
    /// Epoch 0 acknowledged: epochs stream, output waits for acknowledgements.
    Protected,
    /// The guest ended in the last epoch sent: once every epoch is acknowledged the
    /// secondary is told ([`Primary::poll_shutdown`]).
    Draining { code: u8 },
    /// The VM must stay paused until the datastore's arbitration says who goes on.
    /// `ended`: the guest had already exited.
    Arbitrating { why: Why, ended: Option<u8> },
    /// Lost the arbitration, or a write was fenced off: someone else owns the VM. Nothing
    /// more may reach the outside world.
    Halted,
    /// The guest ended and everything was released (and the secondary told).
    Ended(u8),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("{0} cannot be done now: {1}")]
    NotNow(&'static str, &'static str),
    #[error("acknowledgement of epoch {epoch}, but the last epoch sent is {sent:?}")]
    BadAck { epoch: u64, sent: Option<u64> },
    #[error("a new protection session while {0} bytes of output are held")]
    OutputHeld(usize),
}

/// Where an epoch's output sits in the console stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Captured {
    pub epoch: Option<u64>,
    /// Console-stream offset of the output's first byte.
    pub offset: u64,
}

/// Epoch 0 as sent so far by the pre-copy rounds.
#[derive(Default)]
struct Sync {
    hasher: EpochHasher,
    pages: u32,
    /// Over the disk writes sent so far in this epoch (see `EpochHasher::fold_disk`).
    disk: Option<EpochHasher>,
}

/// What [`Primary::assemble`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assembled {
    /// Frames appended.
    pub frames: u64,
    /// Pages sent (with `changed_only`, only the changed ones).
    pub pages: usize,
}

/// The primary's protocol state.
pub struct Primary {
    cfg: Config,
    phase: Phase,
    /// The protection session this primary runs (or won).
    session: u64,
    next_epoch: u64,
    acked: Option<u64>,
    held: VecDeque<Held>,
    /// Console-stream offset after the output taken so far.
    out_offset: u64,
    /// Network-stream offset after the frames taken so far (see [`ft_log::frames`]).
    net_offset: u64,
    encoder: PageEncoder,
    sync: Option<Sync>,
}

impl Primary {
    /// A primary owning session `session` without a secondary (it won that session's
    /// arbitration, or started it alone); its console and network streams are at
    /// `out_offset` and `net_offset` (0, or where a takeover continues them).
    pub fn new(
        cfg: Config,
        encoder: PageEncoder,
        session: u64,
        out_offset: u64,
        net_offset: u64,
    ) -> Self {
        Primary {
            cfg,
            phase: Phase::Unprotected,
            session,
            next_epoch: 0,
            acked: None,
            held: VecDeque::new(),
            out_offset,
            net_offset,
            encoder,
            sync: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn session(&self) -> u64 {
        self.session
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Pages encoded so far (all sessions).
    pub fn pages_encoded(&self) -> u64 {
        self.encoder.pages
    }

    /// Epochs sent and not yet acknowledged (the status's lag).
    pub fn in_flight(&self) -> usize {
        let acked = |e: u64| self.acked.is_some_and(|a| e <= a);
        self.held
            .iter()
            .filter(|h| h.epoch.is_some_and(|e| !acked(e)))
            .count()
    }

    /// Whether an epoch is replicated now (a session with a secondary).
    pub fn replicating(&self) -> bool {
        matches!(
            self.phase,
            Phase::Syncing | Phase::Protected | Phase::Draining { .. }
        )
    }

    /// A new protection session `session` with a new secondary (the driver started it in the
    /// datastore, which made this process its owner). Called with the guest paused and all
    /// unprotected output released. `mem_end`: the end of guest memory.
    pub fn start_session(&mut self, session: u64, mem_end: u64) -> Result<(), Error> {
        if self.phase != Phase::Unprotected {
            return Err(Error::NotNow("a new protection session", "not unprotected"));
        }
        if let Some(held) = self.held.front() {
            return Err(Error::OutputHeld(held.output.len()));
        }
        self.session = session;
        self.phase = Phase::Syncing;
        self.next_epoch = 0;
        self.acked = None;
        self.encoder.reset(mem_end);
        self.sync = None;
        Ok(())
    }

    // ---- the sync (epoch 0, sent while the guest runs)

    /// Opens epoch 0: `EpochBegin` and the session's number.
    pub fn begin_sync(&mut self, vcpus: u8, out: &mut BytesMut) -> u64 {
        Record::EpochBegin { vcpus }.encode(0, out);
        Record::Session {
            session: self.session,
        }
        .encode(0, out);
        self.sync = Some(Sync::default());
        2
    }

    /// The disk's size, before its contents (the secondary sizes its copy to it).
    pub fn sync_disk_size(&mut self, size: u64, out: &mut BytesMut) -> u64 {
        Record::DeviceState {
            device: ft_log::device::DISK_SIZE,
            state: Bytes::copy_from_slice(&size.to_le_bytes()),
        }
        .encode(0, out);
        1
    }

    /// One chunk of the full disk copy at `offset`: sent unless all zeros (the secondary's
    /// copy starts all zeros). Returns the frames appended.
    pub fn sync_disk_chunk(&mut self, offset: u64, data: Bytes, out: &mut BytesMut) -> u64 {
        if vmm::memory::is_zero(&data) {
            return 0;
        }
        let sync = self.sync.get_or_insert_with(Sync::default);
        // Only over writes sent: the secondary folds disk writes into the epoch hash only
        // when it staged some (an all-zero disk sends none).
        sync.disk
            .get_or_insert_with(EpochHasher::new)
            .add(offset, &data);
        Record::DiskWrite { offset, data }.encode(0, out);
        1
    }

    /// A batch of pages read while the guest runs, as part of epoch 0. Returns (frames,
    /// pages sent).
    pub fn precopy_pages(
        &mut self,
        pages: &[u64],
        data: &Bytes,
        changed_only: bool,
        out: &mut BytesMut,
    ) -> (u64, usize) {
        let sync = self.sync.get_or_insert_with(Sync::default);
        let entries = self
            .encoder
            .entries(pages, data, &mut sync.hasher, false, changed_only);
        sync.pages += entries.len() as u32;
        (encode_pages(&entries, 0, out) as u64, entries.len())
    }

    /// Pages sent so far in epoch 0.
    pub fn precopy_sent(&self) -> u32 {
        self.sync.as_ref().map_or(0, |s| s.pages)
    }

    /// Whether pre-copy ends after round `round` (1-based), with `left` pages dirtied during
    /// it still to send and `sent` pages sent in it: when few pages are left, or (with chunk
    /// tracking, whose pages left are whole chunks, most unchanged) when a round after the
    /// first found few changed pages, or when the rounds run out.
    pub fn precopy_done(&self, round: usize, left: usize, sent: usize, chunks: bool) -> bool {
        let converged = chunks && round > 1 && sent <= PRECOPY_DONE_PAGES;
        left <= PRECOPY_DONE_PAGES || converged || round >= PRECOPY_MAX_ROUNDS
    }

    // ---- epochs

    /// Whether the epoch that started at `started` must close now. `output_waiting`: the
    /// guest produced output not yet taken; `events`: device inputs it saw in the epoch.
    pub fn epoch_due(
        &self,
        now: Instant,
        started: Instant,
        output_waiting: bool,
        events: usize,
    ) -> bool {
        let el = now.saturating_duration_since(started);
        el >= self.cfg.epoch
            || (el >= self.cfg.min_epoch && output_waiting)
            || events >= self.cfg.max_epoch_events
    }

    /// Takes the output the guest produced (console bytes and frames) at an epoch's pause, or
    /// unprotected whenever the driver collects it. Held from this moment: it leaves when its
    /// epoch is acknowledged, or — unprotected — at once; in either case through
    /// [`Primary::poll_release`].
    pub fn hold(&mut self, output: Bytes, frames: Frames, since: Option<Instant>) -> Captured {
        let epoch = match self.phase {
            Phase::Syncing | Phase::Protected => {
                let e = self.next_epoch;
                self.next_epoch += 1;
                Some(e)
            }
            _ => None,
        };
        let offset = self.out_offset;
        self.out_offset += output.len() as u64;
        if epoch.is_some() || !output.is_empty() || !frames.is_empty() {
            self.held.push_back(Held {
                epoch,
                output,
                frames,
                since,
            });
        }
        Captured { epoch, offset }
    }

    /// Bytes of output (console and frames) taken from the guest and not released yet.
    pub fn held_bytes(&self) -> u64 {
        self.held
            .iter()
            .map(|h| h.output.len() + h.frames.iter().map(Vec::len).sum::<usize>())
            .sum::<usize>() as u64
    }

    /// Too many epochs unacknowledged: the guest must stay paused until an acknowledgement
    /// (or the secondary's loss).
    pub fn throttled(&self) -> bool {
        self.in_flight() > self.cfg.max_in_flight
    }

    /// Encodes a held epoch's records into `out` (the pages, disk writes, state, device
    /// inputs, output and `EpochEnd`), with the pages changed since sent (see
    /// [`crate::encoder`]). Epoch 0 continues what the pre-copy rounds sent.
    pub fn assemble(&mut self, parts: EpochParts<'_>, out: &mut BytesMut) -> Assembled {
        let pre = if parts.epoch == 0 {
            self.sync.take()
        } else {
            None
        };
        let begun = pre.is_some();
        let (mut hasher, pre_pages, disk_hasher) = match pre {
            Some(p) => (p.hasher, p.pages, p.disk),
            None => (EpochHasher::new(), 0, None),
        };
        let entries = self.encoder.entries(
            parts.pages,
            parts.data,
            &mut hasher,
            !begun && parts.epoch > 0,
            parts.changed_only,
        );
        let at = self.net_offset;
        let (frames, net_end) = assemble::encode_epoch(
            &parts,
            &entries,
            assemble::Continued {
                begun,
                pages: pre_pages,
                hasher,
                disk: disk_hasher,
                out_end: parts.offset + parts.output.len() as u64,
                net_at: at,
            },
            out,
        );
        self.net_offset = net_end;
        Assembled {
            frames,
            pages: entries.len(),
        }
    }

    /// The guest ended in the epoch just sent (with its exit code), or while unprotected.
    pub fn guest_ended(&mut self, code: u8) {
        self.phase = match self.phase {
            Phase::Syncing | Phase::Protected => Phase::Draining { code },
            Phase::Unprotected => Phase::Ended(code),
            Phase::Arbitrating { why, .. } => Phase::Arbitrating {
                why,
                ended: Some(code),
            },
            p => p,
        };
    }

    // ---- inputs

    /// The secondary acknowledged epoch `epoch` (and so every epoch before it). Returns
    /// true when this completed the sync.
    pub fn handle_ack(&mut self, epoch: u64) -> Result<bool, Error> {
        let sent = self.next_epoch.checked_sub(1);
        if sent.is_none_or(|s| epoch > s) {
            return Err(Error::BadAck { epoch, sent });
        }
        if !self.replicating() {
            return Ok(false);
        }
        if self.acked.is_none_or(|a| epoch > a) {
            self.acked = Some(epoch);
        }
        if self.phase == Phase::Syncing {
            self.phase = Phase::Protected;
            return Ok(true);
        }
        Ok(false)
    }

    /// The secondary is lost (its heartbeats stopped, the link closed, or a send failed).
    pub fn handle_lost(&mut self, silence: Option<Silence>) {
        let ended = match self.phase {
            Phase::Syncing | Phase::Protected => None,
            Phase::Draining { code } => Some(code),
            _ => return,
        };
        self.phase = Phase::Arbitrating {
            why: Why::SecondaryLost(silence),
            ended,
        };
    }

    /// Suspend FT (`off`: Turn Off FT): the record to send the secondary, which exits without
    /// taking over; the primary then arbitrates (a secondary that missed the Stop and thinks
    /// the primary died must lose).
    pub fn request_stop(&mut self, off: bool) -> Result<Record, Error> {
        match self.phase {
            Phase::Protected => {
                self.phase = Phase::Arbitrating {
                    why: Why::Stop { off },
                    ended: None,
                };
                Ok(Record::Stop { off })
            }
            Phase::Syncing => Err(Error::NotNow(
                if off { "ft-off" } else { "suspend" },
                "the secondary is still syncing",
            )),
            _ => Err(Error::NotNow(
                if off { "ft-off" } else { "suspend" },
                "FT is not on",
            )),
        }
    }

    /// The arbitration's verdict. Won: everything held may leave now (nobody else can show a
    /// different future) and the VM runs on unprotected, or — if the guest had ended — this
    /// primary is done. Otherwise it halts.
    pub fn handle_arbitration(&mut self, verdict: Verdict) {
        let Phase::Arbitrating { ended, .. } = self.phase else {
            return;
        };
        if verdict != Verdict::Won {
            return self.handle_fenced();
        }
        self.phase = match ended {
            Some(code) => Phase::Ended(code),
            None => Phase::Unprotected,
        };
        // Output held with an epoch leaves as if acknowledged.
        for h in &mut self.held {
            h.epoch = None;
        }
    }

    /// A release was refused by the fence, or the arbitration lost: someone else owns the
    /// VM. Halted; the held output is dropped (the owner releases what was committed).
    pub fn handle_fenced(&mut self) {
        self.phase = Phase::Halted;
        self.held.clear();
    }

    // ---- outputs

    /// The next output that may leave now, in order (the caller writes it through the fence).
    pub fn poll_release(&mut self) -> Option<Held> {
        let front = self.held.front()?;
        let may = match (self.phase, front.epoch) {
            (Phase::Halted | Phase::Arbitrating { .. }, _) => false,
            (_, None) => true,
            (_, Some(e)) => self.acked.is_some_and(|a| e <= a),
        };
        if may {
            self.held.pop_front()
        } else {
            None
        }
    }

    /// Draining and everything released: the `Shutdown` record to send (the secondary exits
    /// with the guest's code); the primary has then ended.
    pub fn poll_shutdown(&mut self) -> Option<(u64, Record)> {
        let Phase::Draining { code } = self.phase else {
            return None;
        };
        if !self.held.is_empty() {
            return None;
        }
        self.phase = Phase::Ended(code);
        Some((self.next_epoch.saturating_sub(1), Record::Shutdown { code }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoder::PageEncoding;

    fn primary() -> Primary {
        Primary::new(
            Config::default(),
            PageEncoder::new(PageEncoding::Raw, 1),
            0,
            0,
            0,
        )
    }

    fn out(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn released(p: &mut Primary) -> String {
        let mut s = String::new();
        while let Some(h) = p.poll_release() {
            s += std::str::from_utf8(&h.output).unwrap();
        }
        s
    }

    #[test]
    fn unprotected_output_leaves_at_once_and_protected_output_waits_for_its_ack() {
        let mut p = primary();
        p.hold(out("a"), Frames::default(), None);
        assert_eq!(released(&mut p), "a");
        p.start_session(1, 1 << 20).unwrap();
        assert_eq!(p.hold(out("b"), Frames::default(), None).epoch, Some(0));
        assert_eq!(released(&mut p), "", "epoch 0 not acknowledged");
        assert!(p.handle_ack(0).unwrap(), "the sync is done");
        assert_eq!(p.phase(), Phase::Protected);
        assert_eq!(released(&mut p), "b");
        let c = p.hold(out("cc"), Frames::default(), None);
        assert_eq!(
            c,
            Captured {
                epoch: Some(1),
                offset: 2
            }
        );
        p.hold(out("d"), Frames::default(), None);
        assert!(p.handle_ack(2).is_ok());
        assert_eq!(
            released(&mut p),
            "ccd",
            "an ack covers every epoch before it"
        );
        assert!(p.handle_ack(7).is_err(), "an ack of an epoch never sent");
    }

    #[test]
    fn backpressure_after_max_in_flight_unacknowledged_epochs() {
        let mut p = primary();
        p.start_session(1, 1 << 20).unwrap();
        p.hold(Bytes::new(), Frames::default(), None);
        p.handle_ack(0).unwrap();
        for _ in 0..MAX_IN_FLIGHT {
            p.hold(Bytes::new(), Frames::default(), None);
            assert!(!p.throttled());
        }
        p.hold(Bytes::new(), Frames::default(), None);
        assert!(p.throttled());
        p.handle_ack(1).unwrap();
        assert!(p.poll_release().is_some());
        assert!(!p.throttled());
    }

    #[test]
    fn a_lost_secondary_means_arbitration_and_only_a_win_releases_the_held_output() {
        for (verdict, want, phase) in [
            (Verdict::Won, "xy", Phase::Unprotected),
            (Verdict::Lost, "", Phase::Halted),
            (Verdict::Superseded, "", Phase::Halted),
        ] {
            let mut p = primary();
            p.start_session(1, 1 << 20).unwrap();
            p.hold(Bytes::new(), Frames::default(), None);
            p.handle_ack(0).unwrap();
            p.hold(out("x"), Frames::default(), None);
            p.hold(out("y"), Frames::default(), None);
            p.handle_lost(None);
            assert_eq!(released(&mut p), "", "nothing leaves while arbitrating");
            p.handle_arbitration(verdict);
            assert_eq!(released(&mut p), want);
            assert_eq!(p.phase(), phase);
        }
    }

    #[test]
    fn a_guest_that_ends_drains_then_shuts_down_and_a_fence_halts_everything() {
        let mut p = primary();
        p.start_session(1, 1 << 20).unwrap();
        p.hold(out("z"), Frames::default(), None);
        p.guest_ended(5);
        assert_eq!(p.poll_shutdown(), None, "epoch 0 not acknowledged yet");
        p.handle_ack(0).unwrap();
        assert_eq!(released(&mut p), "z");
        assert_eq!(p.poll_shutdown(), Some((0, Record::Shutdown { code: 5 })));
        assert_eq!(p.phase(), Phase::Ended(5));

        let mut p = primary();
        p.hold(out("q"), Frames::default(), None);
        p.handle_fenced();
        assert_eq!(released(&mut p), "");
        assert_eq!(p.phase(), Phase::Halted);
    }

    #[test]
    fn stop_needs_a_protected_pair_and_epochs_close_by_time_output_or_events() {
        let mut p = primary();
        assert!(p.request_stop(false).is_err());
        p.start_session(1, 1 << 20).unwrap();
        assert!(p.request_stop(true).is_err(), "still syncing");
        p.hold(Bytes::new(), Frames::default(), None);
        p.handle_ack(0).unwrap();
        assert_eq!(p.request_stop(true), Ok(Record::Stop { off: true }));
        assert!(matches!(p.phase(), Phase::Arbitrating { .. }));

        let t = Instant::now();
        let ms = Duration::from_millis;
        assert!(!p.epoch_due(t + ms(1), t, true, 0));
        assert!(p.epoch_due(t + ms(2), t, true, 0));
        assert!(!p.epoch_due(t + ms(49), t, false, 0));
        assert!(p.epoch_due(t + ms(50), t, false, 0));
        assert!(p.epoch_due(t, t, false, 16 * 1024));
        assert!(p.precopy_done(1, 10, 5000, false));
        assert!(!p.precopy_done(1, 5000, 5000, true));
        assert!(p.precopy_done(2, 5000, 10, true));
        assert!(p.precopy_done(PRECOPY_MAX_ROUNDS, 5000, 5000, false));
    }
}
