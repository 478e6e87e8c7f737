//! Failure detection on the FT link: each side sends heartbeats on their own stream and
//! declares its peer lost when none has arrived for a timeout.
//!
//! Until the initial sync is done (epoch 0 committed) the timeout is at least
//! [`SYNC_TIMEOUT`]: nothing is protected yet, so a quick verdict buys nothing, while both
//! sides back memory in advance then (the standby, the primary's shadow for deltas) — measured
//! on this project's host, that work on both cores at once now and then kept a heartbeat out
//! past 60 ms and split a pair before it was ever protected.
use std::time::{Duration, Instant};

/// The detection timeout before the initial sync is done (or the configured one if longer).
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(1);
/// Heartbeats per timeout.
pub const BEATS_PER_TIMEOUT: u32 = 6;

/// Detection settings; give both sides the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DetectConfig {
    /// The peer is lost after this long without a heartbeat (once synced).
    pub timeout: Duration,
}

impl DetectConfig {
    /// The default, chosen by measurement (README, Performance): no false detection in the
    /// benchmark runs under full page traffic, failover well under 100 ms.
    pub const DEFAULT_MS: u64 = 60;

    /// How often to send a heartbeat.
    pub fn interval(&self) -> Duration {
        (self.timeout / BEATS_PER_TIMEOUT).max(Duration::from_millis(1))
    }
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            timeout: Duration::from_millis(Self::DEFAULT_MS),
        }
    }
}

/// Why the peer counts as lost: the evidence a takeover logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Silence {
    /// How long no heartbeat had arrived.
    pub silent_for: Duration,
    /// The timeout it exceeded.
    pub timeout: Duration,
    /// Heartbeats received before the silence.
    pub beats: u64,
}

/// One side's detector of its peer.
#[derive(Clone, Debug)]
pub struct Detector {
    cfg: DetectConfig,
    synced: bool,
    /// The last heartbeat, or when detection started.
    last: Instant,
    beats: u64,
}

impl Detector {
    pub fn new(cfg: DetectConfig, now: Instant) -> Self {
        Detector {
            cfg,
            synced: false,
            last: now,
            beats: 0,
        }
    }

    /// A heartbeat arrived.
    pub fn heartbeat(&mut self, now: Instant) {
        self.last = self.last.max(now);
        self.beats += 1;
    }

    /// Epoch 0 is committed: detection at full speed from now on.
    pub fn set_synced(&mut self) {
        self.synced = true;
    }

    /// The timeout in force now.
    pub fn timeout(&self) -> Duration {
        if self.synced {
            self.cfg.timeout
        } else {
            self.cfg.timeout.max(SYNC_TIMEOUT)
        }
    }

    /// When the peer will count as lost if no heartbeat arrives before.
    pub fn deadline(&self) -> Instant {
        self.last + self.timeout()
    }

    /// The peer is lost: no heartbeat for longer than the timeout.
    pub fn check(&self, now: Instant) -> Option<Silence> {
        let silent_for = now.saturating_duration_since(self.last);
        (silent_for >= self.timeout()).then_some(Silence {
            silent_for,
            timeout: self.timeout(),
            beats: self.beats,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_only_after_the_timeout_and_slower_before_the_sync() {
        let t0 = Instant::now();
        let cfg = DetectConfig {
            timeout: Duration::from_millis(60),
        };
        let mut d = Detector::new(cfg, t0);
        assert_eq!(
            d.check(t0 + Duration::from_millis(500)),
            None,
            "not synced yet"
        );
        assert!(d.check(t0 + SYNC_TIMEOUT).is_some());
        d.set_synced();
        d.heartbeat(t0 + Duration::from_millis(1000));
        assert_eq!(d.check(t0 + Duration::from_millis(1059)), None);
        let s = d.check(t0 + Duration::from_millis(1070)).unwrap();
        assert_eq!(s.silent_for, Duration::from_millis(70));
        assert_eq!(s.beats, 1);
        assert_eq!(d.deadline(), t0 + Duration::from_millis(1060));
        assert_eq!(cfg.interval(), Duration::from_millis(10));
    }

    #[test]
    fn a_heartbeat_from_the_past_does_not_move_the_deadline_back() {
        let t0 = Instant::now();
        let mut d = Detector::new(DetectConfig::default(), t0 + Duration::from_millis(10));
        d.heartbeat(t0);
        assert_eq!(d.deadline(), t0 + Duration::from_millis(10) + SYNC_TIMEOUT);
    }
}
