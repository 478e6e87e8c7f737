//! The primary's per-epoch statistics: `--epoch-stats FILE` (CSV) and the summary line that
//! benchmarks parse.
use std::path::Path;
use std::time::Duration;

/// Where one epoch's pause went.
#[derive(Default)]
pub struct EpochStat {
    pub pause: Duration,
    /// Pages taken at the pause (with chunk tracking every page of each written chunk).
    pub pages: usize,
    /// Pages sent: those whose content changed (all taken pages with raw pages and the dirty
    /// log).
    pub sent: usize,
    /// Stopping the vCPUs.
    pub kick: Duration,
    /// Reading and clearing the dirty log.
    pub harvest: Duration,
    /// vCPU and device state, with `copy` running beside it (from the same start).
    pub capture: Duration,
    /// Copying the dirty pages out (`--epoch-copy paused`) or write-protecting them
    /// (`background`), from the start of the capture.
    pub copy: Duration,
    /// With `--epoch-copy background`: copying the pages after the guest resumed, and the
    /// guest writes that had to wait for a page's copy meanwhile.
    pub bg_copy: Duration,
    pub bg_faults: u64,
    /// Part of the pause spent waiting for the secondary (backpressure).
    pub throttle: Duration,
}

/// The primary's statistics over its life.
#[derive(Default)]
pub struct Stats {
    pub epochs: Vec<EpochStat>,
    /// The guest's pause at the end of each pre-copy sync.
    pub sync_pauses: Vec<Duration>,
    /// Per released epoch with output: how long its first byte was held (the latency the
    /// output rule adds).
    pub holds: Vec<(u64, Duration)>,
}

fn q(v: &[u64], f: f64) -> u64 {
    v.get(((v.len().max(1) - 1) as f64 * f) as usize)
        .copied()
        .unwrap_or(0)
}

impl Stats {
    /// Writes the per-epoch CSV.
    pub fn write_csv(&self, path: &Path) -> std::io::Result<()> {
        let mut csv = String::from(
            "epoch,pause_us,dirty_pages,kick_us,harvest_us,capture_us,copy_us,output_hold_us,bg_copy_us,bg_faults,throttle_us,pages_sent\n",
        );
        let us = |d: Duration| d.as_micros();
        // How long the epoch's first output byte was held (empty: no output).
        let hold: std::collections::HashMap<u64, u128> =
            self.holds.iter().map(|(k, d)| (*k, us(*d))).collect();
        for (i, e) in self.epochs.iter().enumerate() {
            let k = i as u64 + 1;
            csv += &format!(
                "{k},{},{},{},{},{},{},{},{},{},{},{}\n",
                us(e.pause),
                e.pages,
                us(e.kick),
                us(e.harvest),
                us(e.capture),
                us(e.copy),
                hold.get(&k).map_or(String::new(), u128::to_string),
                us(e.bg_copy),
                e.bg_faults,
                us(e.throttle),
                e.sent,
            );
        }
        std::fs::write(path, csv)
    }

    /// One stderr line with the epoch statistics (benchmarks parse it).
    pub fn summary(&self, secs: f64, bytes_sent: u64, pages_sent: u64) -> String {
        let mut pauses: Vec<u64> = self
            .epochs
            .iter()
            .map(|e| e.pause.as_micros() as u64)
            .collect();
        let mut pages: Vec<u64> = self.epochs.iter().map(|e| e.pages as u64).collect();
        let mut holds: Vec<u64> = self
            .holds
            .iter()
            .map(|(_, d)| d.as_micros() as u64)
            .collect();
        pauses.sort_unstable();
        pages.sort_unstable();
        holds.sort_unstable();
        format!(
            "ftvm primary: summary epochs={} pause_us_p50={} pause_us_p99={} pause_us_max={} dirty_pages_p50={} dirty_pages_p99={} bytes_sent={} bytes_per_sec={} pages_sent={} sync_pause_us_max={} output_hold_us_p50={} output_hold_us_p99={}",
            pauses.len(),
            q(&pauses, 0.5),
            q(&pauses, 0.99),
            pauses.last().copied().unwrap_or(0),
            q(&pages, 0.5),
            q(&pages, 0.99),
            bytes_sent,
            (bytes_sent as f64 / secs) as u64,
            pages_sent,
            self.sync_pauses
                .iter()
                .max()
                .map_or(0, |d| d.as_micros() as u64),
            q(&holds, 0.5),
            q(&holds, 0.99),
        )
    }
}
