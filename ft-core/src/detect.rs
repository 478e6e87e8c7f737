//! Failure detection on the FT link: each side sends heartbeats on their own stream and
//! declares its peer lost when none has arrived for a timeout.
//!
//! The timeout adapts to how regularly heartbeats arrive (φ-accrual, Hayashibara et al.
//! 2004, as Cassandra and Akka use it): the detector keeps an exponentially weighted mean μ
//! and deviation σ of the gaps between heartbeats, and a silence counts as a failure only
//! once it is longer than both the configured timeout and μ + [`PHI_SIGMAS`]·σ — the point
//! where, were the gaps normally distributed, a live peer's next heartbeat would be later
//! with probability 10⁻⁸ (φ = 8). On a quiet host (gaps of 10 ms ± 1 ms) that is far below
//! the configured 60 ms, so failover time is unchanged; on a host so loaded that heartbeats
//! arrive in bursts (measured here: gaps past 80 ms with the load average at 7 on 2 cores)
//! the timeout grows with the jitter, up to [`MAX_TIMEOUT_FACTOR`] times the configured one,
//! instead of calling a live peer dead.
//!
//! Until the initial sync is done (epoch 0 committed) the timeout is at least
//! [`SYNC_TIMEOUT`]: nothing is protected yet, so a quick verdict buys nothing, while both
//! sides back memory in advance then (the standby, the primary's shadow for deltas) — measured
//! on this project's host, that work on both cores at once now and then kept a heartbeat out
//! past 60 ms and split a pair before it was ever protected.
use std::time::{Duration, Instant};

/// The detection timeout before the initial sync is done (or the configured one if longer).
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(1);
/// Heartbeats per configured timeout.
pub const BEATS_PER_TIMEOUT: u32 = 6;
/// The adaptive timeout in deviations above the mean gap (φ = 8: a normal tail of 10⁻⁸).
pub const PHI_SIGMAS: f64 = 5.6;
/// The adaptive timeout never exceeds this many configured timeouts.
pub const MAX_TIMEOUT_FACTOR: u32 = 8;
/// Weight of each new gap in the running mean and deviation (about the last 32 gaps).
const ALPHA: f64 = 1.0 / 32.0;

/// Detection settings; give both sides the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DetectConfig {
    /// The peer is lost after this long without a heartbeat (once synced), at the least.
    pub timeout: Duration,
}

impl DetectConfig {
    /// The default, chosen by measurement (README, Performance): failover well under
    /// 100 ms; with the adaptive timeout, no false detection on a loaded host.
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
    /// The timeout it exceeded (adaptive: see the module docs).
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
    /// Running mean and variance of the gaps between heartbeats, in seconds (None until
    /// the second heartbeat).
    mean: Option<f64>,
    var: f64,
}

impl Detector {
    pub fn new(cfg: DetectConfig, now: Instant) -> Self {
        Detector {
            cfg,
            synced: false,
            last: now,
            beats: 0,
            mean: None,
            var: 0.0,
        }
    }

    /// A heartbeat arrived.
    pub fn heartbeat(&mut self, now: Instant) {
        if now > self.last && self.beats > 0 {
            let gap = (now - self.last).as_secs_f64();
            match self.mean {
                None => self.mean = Some(gap),
                Some(m) => {
                    let d = gap - m;
                    let m = m + ALPHA * d;
                    self.var = (1.0 - ALPHA) * (self.var + ALPHA * d * d);
                    self.mean = Some(m);
                }
            }
        }
        self.last = self.last.max(now);
        self.beats += 1;
    }

    /// Epoch 0 is committed: detection at full speed from now on.
    pub fn set_synced(&mut self) {
        self.synced = true;
    }

    /// The timeout in force now: the configured one, raised by the heartbeats' jitter (see
    /// the module docs), and at least [`SYNC_TIMEOUT`] before the sync.
    pub fn timeout(&self) -> Duration {
        let floor = self.cfg.timeout;
        let adaptive = match self.mean {
            Some(m) => {
                let secs = m + PHI_SIGMAS * self.var.sqrt();
                Duration::from_secs_f64(secs.clamp(0.0, 3600.0))
                    .min(floor * MAX_TIMEOUT_FACTOR)
                    .max(floor)
            }
            None => floor,
        };
        if self.synced {
            adaptive
        } else {
            adaptive.max(SYNC_TIMEOUT)
        }
    }

    /// When the peer will count as lost if no heartbeat arrives before.
    pub fn deadline(&self) -> Instant {
        self.last + self.timeout()
    }

    /// The peer is lost: no heartbeat for longer than the timeout.
    pub fn check(&self, now: Instant) -> Option<Silence> {
        let silent_for = now.saturating_duration_since(self.last);
        let timeout = self.timeout();
        (silent_for >= timeout).then_some(Silence {
            silent_for,
            timeout,
            beats: self.beats,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A synced detector fed `gaps` (ms) between heartbeats from `t0`; returns it and the
    /// time of the last heartbeat.
    fn fed(gaps: impl IntoIterator<Item = u64>, t0: Instant) -> (Detector, Instant) {
        let mut d = Detector::new(DetectConfig::default(), t0);
        d.set_synced();
        let mut t = t0;
        d.heartbeat(t);
        for g in gaps {
            t += ms(g);
            d.heartbeat(t);
        }
        (d, t)
    }

    #[test]
    fn lost_only_after_the_timeout_and_slower_before_the_sync() {
        let t0 = Instant::now();
        let cfg = DetectConfig { timeout: ms(60) };
        let mut d = Detector::new(cfg, t0);
        assert_eq!(d.check(t0 + ms(500)), None, "not synced yet");
        assert!(d.check(t0 + SYNC_TIMEOUT).is_some());
        d.set_synced();
        d.heartbeat(t0 + ms(1000));
        assert_eq!(d.check(t0 + ms(1059)), None);
        let s = d.check(t0 + ms(1070)).unwrap();
        assert_eq!(s.silent_for, ms(70));
        assert_eq!(s.beats, 1);
        assert_eq!(d.deadline(), t0 + ms(1060));
        assert_eq!(cfg.interval(), ms(10));
    }

    #[test]
    fn regular_heartbeats_keep_the_configured_timeout() {
        let t0 = Instant::now();
        let (d, last) = fed((0..200).map(|i| 9 + i % 3), t0);
        assert_eq!(d.timeout(), ms(60), "10 ± 1 ms gaps: the floor");
        assert!(d.check(last + ms(61)).is_some());
    }

    #[test]
    fn jittery_heartbeats_raise_the_timeout_up_to_its_cap_and_calm_ones_lower_it_again() {
        let t0 = Instant::now();
        // A loaded host: mostly 10 ms, every fourth gap 70 ms (a burst after a stall).
        let (d, last) = fed((0..200).map(|i| if i % 4 == 3 { 70 } else { 10 }), t0);
        let t = d.timeout();
        assert!(t > ms(100) && t <= ms(60) * MAX_TIMEOUT_FACTOR, "{t:?}");
        assert!(
            d.check(last + ms(90)).is_none(),
            "a 90 ms gap is no failure here"
        );
        assert!(d.check(last + t).is_some());
        // Extreme jitter is capped.
        let (d, _) = fed((0..100).map(|i| if i % 2 == 0 { 1 } else { 900 }), t0);
        assert_eq!(d.timeout(), ms(60) * MAX_TIMEOUT_FACTOR);
        // Back to regular beats: the timeout comes down to the floor again.
        let (mut d, mut t) = fed((0..200).map(|i| if i % 4 == 3 { 70 } else { 10 }), t0);
        for _ in 0..400 {
            t += ms(10);
            d.heartbeat(t);
        }
        assert_eq!(d.timeout(), ms(60));
    }

    #[test]
    fn a_heartbeat_from_the_past_does_not_move_the_deadline_back() {
        let t0 = Instant::now();
        let mut d = Detector::new(DetectConfig::default(), t0 + ms(10));
        d.heartbeat(t0);
        assert_eq!(d.deadline(), t0 + ms(10) + SYNC_TIMEOUT);
    }
}
