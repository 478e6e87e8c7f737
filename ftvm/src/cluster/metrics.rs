//! The coordinator's Prometheus metrics (`GET /metrics`, text exposition format 0.0.4): the
//! cluster from the coordinator's view, and every VM's pair as its primary reports it
//! through its host agent (epoch, lag, link bytes, held output, epoch pauses).
//!
//! Counters and the failover histograms count what this coordinator saw since it started
//! (Prometheus handles the reset when another one takes over).
use super::proto::ProcReport;
use coordinator::events::Event;
use coordinator::model::{Cluster, FtState};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

/// Upper bounds (seconds) of the failover histograms.
const FAILOVER_BOUNDS_S: [f64; 10] = [0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0];

#[derive(Debug, Clone, Default)]
struct Histogram {
    /// Cumulative counts per bound of [`FAILOVER_BOUNDS_S`].
    buckets: [u64; FAILOVER_BOUNDS_S.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (b, bound) in self.buckets.iter_mut().zip(FAILOVER_BOUNDS_S) {
            if secs <= bound {
                *b += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }
}

/// What the coordinator counts as events happen.
#[derive(Debug, Default)]
pub struct Counters {
    failovers: BTreeMap<String, u64>,
    secondary_restarts: BTreeMap<String, u64>,
    to_live: Histogram,
    to_protected: Histogram,
}

impl Counters {
    /// Counts `e` (the coordinator calls it for every event it records).
    pub fn saw(&mut self, e: &Event) {
        let Some(vm) = &e.vm else { return };
        match e.kind.as_str() {
            "vm.failover" => {
                *self.failovers.entry(vm.clone()).or_default() += 1;
                if let Some(ms) = e.details["live_after_ms"].as_u64() {
                    self.to_live.observe(ms as f64 / 1000.0);
                }
            }
            "vm.protected" => {
                if let Some(ms) = e.details["after_failover"]["protected_after_ms"].as_u64() {
                    self.to_protected.observe(ms as f64 / 1000.0);
                }
            }
            "vm.secondary-lost" => *self.secondary_restarts.entry(vm.clone()).or_default() += 1,
            _ => {}
        }
    }
}

/// A label value, escaped as the exposition format wants.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, help: &str, labels: &str, h: &Histogram) {
    header(out, name, "histogram", help);
    let sep = if labels.is_empty() { "" } else { "," };
    for (b, bound) in h.buckets.iter().zip(FAILOVER_BOUNDS_S) {
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {b}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
}

fn protection(ft: &FtState) -> &'static str {
    match ft {
        FtState::Off => "off",
        FtState::Starting => "starting",
        FtState::Protected => "protected",
        FtState::NotProtected { .. } => "not-protected",
        FtState::Suspended => "suspended",
    }
}

/// The exposition text.
pub fn render(
    c: &Cluster,
    reports: &HashMap<u64, (String, ProcReport)>,
    counters: &Counters,
) -> String {
    let mut out = String::new();
    header(
        &mut out,
        "ftvm_hosts",
        "gauge",
        "Hosts by state: up, UNREACHABLE (isolated or partitioned), DOWN (failed).",
    );
    let mut hosts: BTreeMap<&str, u64> = [("up", 0), ("UNREACHABLE", 0), ("DOWN", 0)].into();
    for h in c.hosts.values() {
        *hosts.entry(h.state()).or_default() += 1;
    }
    for (state, n) in &hosts {
        let _ = writeln!(out, "ftvm_hosts{{state=\"{state}\"}} {n}");
    }
    header(
        &mut out,
        "ftvm_vms",
        "gauge",
        "Running VMs by FT protection state.",
    );
    let mut vms: BTreeMap<&str, u64> = [
        ("protected", 0),
        ("starting", 0),
        ("not-protected", 0),
        ("suspended", 0),
        ("off", 0),
    ]
    .into();
    for v in c.vms.values().filter(|v| v.running) {
        *vms.entry(protection(&v.ft)).or_default() += 1;
    }
    for (p, n) in &vms {
        let _ = writeln!(out, "ftvm_vms{{protection=\"{p}\"}} {n}");
    }
    header(
        &mut out,
        "ftvm_vm_protected",
        "gauge",
        "1 when the VM runs protected by a synced secondary.",
    );
    for v in c.vms.values() {
        let _ = writeln!(
            out,
            "ftvm_vm_protected{{vm=\"{}\"}} {}",
            label(&v.name),
            u8::from(v.running && v.ft == FtState::Protected)
        );
    }
    header(
        &mut out,
        "ftvm_failovers_total",
        "counter",
        "Failovers (a secondary took over) this coordinator saw.",
    );
    for v in c.vms.keys() {
        let n = counters.failovers.get(v).copied().unwrap_or(0);
        let _ = writeln!(out, "ftvm_failovers_total{{vm=\"{}\"}} {n}", label(v));
    }
    header(
        &mut out,
        "ftvm_secondary_restarts_total",
        "counter",
        "Secondaries lost and placed again this coordinator saw.",
    );
    for v in c.vms.keys() {
        let n = counters.secondary_restarts.get(v).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "ftvm_secondary_restarts_total{{vm=\"{}\"}} {n}",
            label(v)
        );
    }
    histogram(
        &mut out,
        "ftvm_failover_live_seconds",
        "From the primary's loss being detected (or Test Failover asked) to the guest running on the new primary.",
        "",
        &counters.to_live,
    );
    histogram(
        &mut out,
        "ftvm_failover_protected_seconds",
        "From a failover to the VM protected again by a new synced secondary.",
        "",
        &counters.to_protected,
    );
    // The pairs, from their primaries' reports.
    let primaries: Vec<(&str, &crate::ctl::Status)> = c
        .vms
        .values()
        .filter_map(|v| {
            let p = v.primary.as_ref()?;
            let st = reports.get(&p.id)?.1.status.as_ref()?;
            Some((v.name.as_str(), st))
        })
        .collect();
    let gauge = |out: &mut String,
                 name: &str,
                 kind: &str,
                 help: &str,
                 f: &dyn Fn(&crate::ctl::Status) -> u64| {
        header(out, name, kind, help);
        for (vm, st) in &primaries {
            let _ = writeln!(out, "{name}{{vm=\"{}\"}} {}", label(vm), f(st));
        }
    };
    gauge(
        &mut out,
        "ftvm_epoch",
        "gauge",
        "The primary's last closed epoch.",
        &|s| s.epoch,
    );
    gauge(
        &mut out,
        "ftvm_epoch_lag",
        "gauge",
        "Epochs sent and not yet acknowledged by the secondary.",
        &|s| s.lag_epochs,
    );
    gauge(
        &mut out,
        "ftvm_link_bytes_total",
        "counter",
        "Bytes the primary sent on the FT link (this primary process).",
        &|s| s.bytes_sent,
    );
    gauge(
        &mut out,
        "ftvm_held_output_bytes",
        "gauge",
        "Guest output (console and frames) held until its epoch is acknowledged.",
        &|s| s.held_bytes,
    );
    header(
        &mut out,
        "ftvm_epoch_pause_seconds",
        "histogram",
        "How long the guest was paused to close an epoch (this primary process).",
    );
    for (vm, st) in &primaries {
        let vm = label(vm);
        if st.pause_buckets.len() == crate::ctl::PAUSE_BOUNDS_US.len() {
            for (b, bound) in st.pause_buckets.iter().zip(crate::ctl::PAUSE_BOUNDS_US) {
                let _ = writeln!(
                    out,
                    "ftvm_epoch_pause_seconds_bucket{{vm=\"{vm}\",le=\"{}\"}} {b}",
                    bound as f64 / 1e6
                );
            }
        }
        let _ = writeln!(
            out,
            "ftvm_epoch_pause_seconds_bucket{{vm=\"{vm}\",le=\"+Inf\"}} {}",
            st.pause_count
        );
        let _ = writeln!(
            out,
            "ftvm_epoch_pause_seconds_sum{{vm=\"{vm}\"}} {}",
            st.pause_sum_us as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "ftvm_epoch_pause_seconds_count{{vm=\"{vm}\"}} {}",
            st.pause_count
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use coordinator::events::Severity;

    #[test]
    fn exposition_counts_hosts_vms_and_failovers() {
        let mut c = Cluster::default();
        c.hosts.insert(
            "h1".into(),
            coordinator::model::Host {
                name: "h1".into(),
                ip: "127.0.0.1".into(),
                last_seen_ms: 0,
                alive: true,
                ds_alive: true,
            },
        );
        let mut counters = Counters::default();
        counters.saw(
            &Event::new(Severity::Warning, "vm.failover", "x")
                .vm("db")
                .details(serde_json::json!({ "live_after_ms": 80 })),
        );
        counters.saw(
            &Event::new(Severity::Info, "vm.protected", "x")
                .vm("db")
                .details(serde_json::json!({ "after_failover": { "protected_after_ms": 900 } })),
        );
        let text = render(&c, &HashMap::new(), &counters);
        assert!(text.contains("ftvm_hosts{state=\"up\"} 1\n"), "{text}");
        assert!(text.contains("ftvm_hosts{state=\"DOWN\"} 0\n"), "{text}");
        assert!(
            text.contains("ftvm_failover_live_seconds_bucket{le=\"0.1\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("ftvm_failover_live_seconds_bucket{le=\"0.05\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("ftvm_failover_protected_seconds_count{} 1\n"),
            "{text}"
        );
        // Every sample follows its family's TYPE line, each family once.
        let mut seen = std::collections::HashSet::new();
        let mut current = String::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().unwrap().to_string();
                assert!(seen.insert(current.clone()), "family {current} twice");
            } else if !l.starts_with('#') {
                assert!(l.starts_with(&current), "{l} outside its family {current}");
            }
        }
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
