//! The secondary's side of the FT protocol, sans IO: one protection session from the first
//! record to its end — committing epochs into the [`Standby`], acknowledging them after their
//! disk writes, the records that end a session on purpose (Stop, Shutdown), and when the
//! primary is lost, the decisions of a takeover.
//!
//! ```text
//!             record → commit epoch k: ResetDisk? WriteDisk* Ack(k)
//!   Receiving ──────────────────────────────────────────────────▶ Receiving
//!      │  Shutdown(code) / Stop          │ handle_lost (link silent or closed, or a bad epoch)
//!      ▼                                 ▼
//!   Exited                          Confirming ── confirm(): primary's datastore heartbeat
//!                                        │        fresh: Wait (up to CONFIRM_TIMEOUTS timeouts)
//!                                        │ stale, or waited long enough
//!              no epoch committed ◀──────┤
//!              (NothingToTakeOver)       ▼
//!                                   Arbitrating(session) ── handle_arbitration(verdict)
//!                                        │ won                       │ lost, superseded
//!                                        ▼                           ▼
//!                                      Live (takeover())          Halted
//! ```
//!
//! A takeover releases exactly the committed console output the outside world has not seen:
//! the sink's length, measured under the datastore's lock after winning (so no write of the
//! old owner can be in flight), against the committed stream ([`Secondary::takeover`]). The
//! network stream cannot be measured: the last [`Config::resend_epochs`] committed epochs'
//! frames are sent again (TCP drops duplicates; a lost frame would cost a retransmission).
use crate::datastore::{self, Verdict};
use crate::detect::Silence;
use crate::output::OutputLog;
use crate::standby::{self, Standby};
use bytes::Bytes;
use ft_log::frames::NET_STREAM;
use ft_log::Record;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Config {
    /// Committed epochs whose transmitted frames a new primary sends again at takeover:
    /// every epoch the old primary may not have released (it holds at most
    /// `max_in_flight + 1`).
    pub resend_epochs: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            resend_epochs: crate::primary::MAX_IN_FLIGHT + 2,
        }
    }
}

/// What the driver must do, in order, after a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Replace this side's disk copy by a new, all-zero file of `size` bytes (the sync's full
    /// copy follows as writes). A new file, not the old one emptied: a process that still
    /// holds the old one open (an earlier secondary or primary, paused) writes only to a file
    /// nobody reads any more.
    ResetDisk { size: u64 },
    /// Write the guest's disk write into this side's copy.
    WriteDisk { offset: u64, data: Bytes },
    /// Acknowledge epoch `k` to the primary (after the actions before it are done).
    Ack(u64),
}

/// How a session ended on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The guest ended on the primary: exit with its code, no takeover.
    GuestEnded(u8),
    /// The primary stopped replicating (Suspend FT or Turn Off FT): exit, no takeover.
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Receiving,
    /// The primary is lost on the link since `since`; confirming with its datastore
    /// heartbeat.
    Confirming {
        since: Instant,
        silence: Option<Silence>,
    },
    Arbitrating {
        session: u64,
    },
    Live,
    Halted,
    Exited(Exit),
}

/// What [`Secondary::confirm`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirm {
    /// The primary's datastore heartbeat is fresh: ask again later.
    Wait,
    /// Arbitrate for this session (the driver calls [`datastore::take_over`]).
    Arbitrate { session: u64 },
    /// No epoch was ever committed: there is nothing to take over.
    NothingToTakeOver,
}

/// The evidence of a takeover decision, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evidence {
    /// The link's silence (None: the link closed, or the stream went bad).
    pub silence: Option<Silence>,
    /// How stale the primary's datastore heartbeat was when deciding (None: never written).
    pub heartbeat_age: Option<Duration>,
    /// How long the decision waited for the heartbeat to go stale.
    pub confirmed_after: Duration,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error(transparent)]
    Standby(#[from] standby::Error),
    #[error("nothing to take over: the primary was lost before the initial sync completed")]
    NothingCommitted,
    #[error("the console holds {released} bytes, more than the committed output ({committed}): something wrote output that was never committed")]
    SinkAhead { released: u64, committed: u64 },
    #[error("the console holds {released} bytes, but the committed output kept starts at {base}")]
    SinkBehind { released: u64, base: u64 },
}

/// Everything a takeover needs besides the standby's memory and state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Takeover {
    pub epoch: u64,
    /// The committed console bytes the sink lacks: write them, once.
    pub missing: Bytes,
    /// The last committed epochs' frames in stream form: send them again.
    pub resend: Bytes,
    /// Where the new primary's streams continue.
    pub out_offset: u64,
    pub net_offset: u64,
    /// The guest had ended in the committed epoch (with this code): nothing to run.
    pub exit: Option<u8>,
}

/// One secondary's session.
pub struct Secondary {
    cfg: Config,
    standby: Standby,
    phase: Phase,
    /// Network-stream end offsets after the last committed epochs (for the resend).
    net_ends: VecDeque<u64>,
    disk_sized: bool,
    evidence: Option<Evidence>,
}

impl Secondary {
    pub fn new(cfg: Config, standby: Standby) -> Self {
        Secondary {
            cfg,
            standby,
            phase: Phase::Receiving,
            net_ends: VecDeque::new(),
            disk_sized: false,
            evidence: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn standby(&self) -> &Standby {
        &self.standby
    }

    /// Gives up the standby (a takeover builds the VM on it).
    pub fn into_standby(self) -> Standby {
        self.standby
    }

    /// The protection session, once epoch 0 committed.
    pub fn session(&self) -> Option<u64> {
        self.standby.session()
    }

    /// The evidence of the takeover decision, once taken.
    pub fn evidence(&self) -> Option<Evidence> {
        self.evidence
    }

    /// Feeds one record of the primary's stream; the actions it leads to are appended to
    /// `actions`. `Ok(Some(exit))`: the session ended on purpose. `Err`: the epoch being
    /// staged was discarded (the committed standby is intact) — the stream can no longer be
    /// trusted: the driver leaves the link and calls [`Secondary::handle_lost`].
    pub fn handle_record(
        &mut self,
        epoch: u64,
        rec: Record,
        actions: &mut Vec<Action>,
    ) -> Result<Option<Exit>, Error> {
        if self.phase != Phase::Receiving {
            return Ok(None);
        }
        let exit = match rec {
            Record::Shutdown { code } => Some(Exit::GuestEnded(code)),
            Record::Stop { .. } => Some(Exit::Stopped),
            rec => {
                if let Some(k) = self.standby.on_record(epoch, rec)? {
                    self.committed(k, actions);
                }
                None
            }
        };
        if let Some(e) = exit {
            self.phase = Phase::Exited(e);
        }
        Ok(exit)
    }

    fn committed(&mut self, k: u64, actions: &mut Vec<Action>) {
        if !self.disk_sized {
            let size = self
                .standby
                .state()
                .devices
                .get(&ft_log::device::DISK_SIZE)
                .and_then(|b| <[u8; 8]>::try_from(&b[..]).ok())
                .map(u64::from_le_bytes);
            if let Some(size) = size {
                actions.push(Action::ResetDisk { size });
                self.disk_sized = true;
            }
        }
        for (offset, data) in self.standby.take_disk_writes() {
            actions.push(Action::WriteDisk { offset, data });
        }
        self.net_ends
            .push_back(self.standby.output().end(NET_STREAM));
        if self.net_ends.len() > self.cfg.resend_epochs + 1 {
            self.net_ends.pop_front();
        }
        actions.push(Action::Ack(k));
    }

    /// The primary is lost on the link at `now`: silent past the detector's timeout
    /// (`silence`), or the link closed or went bad (None).
    pub fn handle_lost(&mut self, now: Instant, silence: Option<Silence>) {
        if self.phase == Phase::Receiving {
            self.phase = Phase::Confirming {
                since: now,
                silence,
            };
        }
    }

    /// While confirming: the primary's datastore heartbeat was last written `age` ago (None:
    /// never). A primary that is still alive (fresh heartbeat) gets the chance to win the
    /// arbitration first, for up to [`datastore::CONFIRM_TIMEOUTS`] detection timeouts and at
    /// least [`datastore::CONFIRM_MIN`]. `timeout`: the configured detection timeout; the
    /// link's adaptive one (in the silence's evidence) counts if longer.
    pub fn confirm(&mut self, now: Instant, age: Option<Duration>, timeout: Duration) -> Confirm {
        let Phase::Confirming { since, silence } = self.phase else {
            return Confirm::Wait;
        };
        let timeout = silence.map_or(timeout, |s| s.timeout.max(timeout));
        let waited = now.saturating_duration_since(since);
        let patience = (timeout * datastore::CONFIRM_TIMEOUTS).max(datastore::CONFIRM_MIN);
        if !datastore::heartbeat_stale(age, timeout) && waited < patience {
            return Confirm::Wait;
        }
        self.evidence = Some(Evidence {
            silence,
            heartbeat_age: age,
            confirmed_after: waited,
        });
        match self.session() {
            Some(session) => {
                self.phase = Phase::Arbitrating { session };
                Confirm::Arbitrate { session }
            }
            None => {
                self.phase = Phase::Halted;
                Confirm::NothingToTakeOver
            }
        }
    }

    /// The arbitration's verdict: won → live (the driver then runs [`Secondary::takeover`]
    /// under the same lock); otherwise halted.
    pub fn handle_arbitration(&mut self, verdict: Verdict) {
        if let Phase::Arbitrating { .. } = self.phase {
            self.phase = if verdict == Verdict::Won {
                Phase::Live
            } else {
                Phase::Halted
            };
        }
    }

    /// The takeover's plan, given that the console sink already holds its first `released`
    /// bytes (None: a sink that cannot be measured, such as a terminal — then nothing is
    /// written again).
    pub fn takeover(&self, released: Option<u64>) -> Result<Takeover, Error> {
        let epoch = self
            .standby
            .committed_epoch()
            .ok_or(Error::NothingCommitted)?;
        let out = self.standby.output();
        let committed = out.end(0);
        let released = released.unwrap_or(committed);
        let missing = match out.unreleased(0, released) {
            Some(b) => Bytes::copy_from_slice(b),
            None if released > committed => {
                return Err(Error::SinkAhead {
                    released,
                    committed,
                })
            }
            None => {
                return Err(Error::SinkBehind {
                    released,
                    base: out.base(0),
                })
            }
        };
        let resend_from = match self.net_ends.front() {
            Some(&end) if self.net_ends.len() > self.cfg.resend_epochs => end,
            _ => out.base(NET_STREAM),
        };
        let resend = out
            .unreleased(NET_STREAM, resend_from)
            .map(Bytes::copy_from_slice)
            .unwrap_or_default();
        let exit = self
            .standby
            .state()
            .devices
            .get(&ft_log::device::EXIT)
            .and_then(|b| b.first().copied());
        Ok(Takeover {
            epoch,
            missing,
            resend,
            out_offset: committed,
            net_offset: out.end(NET_STREAM),
            exit,
        })
    }

    /// The committed output (status, tests).
    pub fn output(&self) -> &OutputLog {
        self.standby.output()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ft_log::record::{EpochEnd, EpochHasher};

    fn secondary() -> Secondary {
        let mem = vmm::memory::GuestMemory::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 16)])
            .unwrap();
        Secondary::new(Config::default(), Standby::new(mem))
    }

    /// Feeds an epoch with `text` as console output at `offset` (and, for epoch 0, the
    /// session and a disk size).
    fn epoch(s: &mut Secondary, k: u64, offset: u64, text: &str) -> Vec<Action> {
        let mut a = Vec::new();
        let mut recs = vec![Record::EpochBegin { vcpus: 1 }];
        if k == 0 {
            recs.push(Record::Session { session: 9 });
            recs.push(Record::DeviceState {
                device: ft_log::device::DISK_SIZE,
                state: Bytes::copy_from_slice(&4096u64.to_le_bytes()),
            });
        }
        let data = Bytes::from(vec![7u8; 512]);
        let mut d = EpochHasher::new();
        d.add(512, &data);
        let mut h = EpochHasher::new();
        h.fold_disk(&d);
        recs.push(Record::DiskWrite { offset: 512, data });
        if !text.is_empty() {
            recs.push(Record::Output {
                stream: 0,
                offset,
                data: Bytes::copy_from_slice(text.as_bytes()),
            });
        }
        recs.push(Record::EpochEnd(EpochEnd {
            pages: 0,
            events: 0,
            page_hash: h.finish(),
            outputs: vec![(0, offset + text.len() as u64)],
        }));
        for r in recs {
            assert_eq!(s.handle_record(k, r, &mut a), Ok(None));
        }
        a
    }

    #[test]
    fn a_commit_writes_its_disk_writes_before_the_ack_and_the_sync_resets_the_copy_once() {
        let mut s = secondary();
        let a = epoch(&mut s, 0, 0, "1\n");
        assert_eq!(a[0], Action::ResetDisk { size: 4096 });
        assert!(matches!(a[1], Action::WriteDisk { offset: 512, .. }));
        assert_eq!(a[2], Action::Ack(0));
        assert_eq!(s.session(), Some(9));
        let a = epoch(&mut s, 1, 2, "2\n");
        assert!(matches!(a[..], [Action::WriteDisk { .. }, Action::Ack(1)]));
    }

    #[test]
    fn shutdown_and_stop_end_the_session_without_a_takeover() {
        let mut s = secondary();
        let mut a = Vec::new();
        assert_eq!(
            s.handle_record(0, Record::Shutdown { code: 4 }, &mut a),
            Ok(Some(Exit::GuestEnded(4)))
        );
        let mut s = secondary();
        assert_eq!(
            s.handle_record(0, Record::Stop { off: true }, &mut a),
            Ok(Some(Exit::Stopped))
        );
        s.handle_lost(Instant::now(), None);
        assert_eq!(s.phase(), Phase::Exited(Exit::Stopped));
    }

    #[test]
    fn a_fresh_primary_heartbeat_delays_the_arbitration_for_a_while_a_stale_one_not_at_all() {
        let mut s = secondary();
        epoch(&mut s, 0, 0, "1\n");
        let t = Instant::now();
        let to = Duration::from_millis(60);
        s.handle_lost(t, None);
        let fresh = Some(Duration::from_millis(5));
        assert_eq!(s.confirm(t + to * 4, fresh, to), Confirm::Wait);
        assert_eq!(
            s.confirm(t + datastore::CONFIRM_MIN, fresh, to),
            Confirm::Arbitrate { session: 9 }
        );
        // The link's adaptive timeout (a loaded host) lengthens both the staleness and the
        // wait.
        let mut s = secondary();
        epoch(&mut s, 0, 0, "1\n");
        let slow = Silence {
            silent_for: Duration::from_millis(400),
            timeout: Duration::from_millis(400),
            beats: 100,
        };
        s.handle_lost(t, Some(slow));
        let age = Some(Duration::from_millis(200));
        assert_eq!(
            s.confirm(t + Duration::from_millis(1500), age, to),
            Confirm::Wait
        );
        assert_eq!(
            s.confirm(t + Duration::from_millis(1600), age, to),
            Confirm::Arbitrate { session: 9 }
        );
        let mut s = secondary();
        epoch(&mut s, 0, 0, "1\n");
        s.handle_lost(t, None);
        assert_eq!(
            s.confirm(t, Some(to), to),
            Confirm::Arbitrate { session: 9 },
            "a stale heartbeat decides at once"
        );
        assert_eq!(s.evidence().unwrap().heartbeat_age, Some(to));
        s.handle_arbitration(Verdict::Lost);
        assert_eq!(s.phase(), Phase::Halted);
    }

    #[test]
    fn nothing_to_take_over_before_epoch_0_commits() {
        let mut s = secondary();
        s.handle_lost(Instant::now(), None);
        assert_eq!(
            s.confirm(Instant::now(), None, Duration::from_millis(60)),
            Confirm::NothingToTakeOver
        );
        assert_eq!(s.takeover(Some(0)), Err(Error::NothingCommitted));
    }

    #[test]
    fn the_takeover_writes_exactly_what_the_sink_lacks_and_refuses_a_sink_ahead() {
        let mut s = secondary();
        epoch(&mut s, 0, 0, "1\n");
        epoch(&mut s, 1, 2, "2\n3\n");
        let t = s.takeover(Some(2)).unwrap();
        assert_eq!((t.epoch, &t.missing[..]), (1, &b"2\n3\n"[..]));
        assert_eq!(t.out_offset, 6);
        assert_eq!(&s.takeover(Some(6)).unwrap().missing[..], b"");
        assert_eq!(
            &s.takeover(None).unwrap().missing[..],
            b"",
            "unmeasurable sink"
        );
        assert!(matches!(
            s.takeover(Some(7)),
            Err(Error::SinkAhead {
                released: 7,
                committed: 6
            })
        ));
    }
}
