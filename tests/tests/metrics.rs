//! The coordinator's metrics as an operator consumes them: a real Prometheus server (Debian's
//! `prometheus`, installed by scripts/test.sh) scrapes a running cluster over HTTPS with the
//! cluster CA and a read-only token, and its query API answers for the protected-VM gauge, the
//! pair's epoch pauses (reported by the VMM through its agent), and the failover counter and
//! time-to-live histogram after a Test Failover.
use ftvm_tests::cluster::{free_loopback_addr, Backend, Cluster};
use ftvm_tests::{require_kvm, TempDir};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A Prometheus server of this test's own, stopped on drop.
struct Prometheus {
    child: Child,
    addr: String,
    log: std::path::PathBuf,
}

impl Prometheus {
    fn start(dir: &TempDir, target: &str, ca: &std::path::Path, token: &str) -> Prometheus {
        let token_file = dir.path("prometheus.token");
        std::fs::write(&token_file, token).unwrap();
        let config = dir.path("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: ftvm\n    scheme: https\n    metrics_path: /metrics\n\
                 \x20   tls_config:\n      ca_file: {}\n\
                 \x20   authorization:\n      type: Bearer\n      credentials_file: {}\n\
                 \x20   static_configs:\n      - targets: ['{target}']\n",
                ca.display(),
                token_file.display()
            ),
        )
        .unwrap();
        let addr = free_loopback_addr();
        let log = dir.path("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("prometheus (Debian package prometheus; scripts/test.sh installs it)");
        Prometheus { child, addr, log }
    }

    /// The value of the one series `query` selects, if it has exactly one.
    fn value(&self, query: &str) -> Option<f64> {
        let o = Command::new("curl")
            .args(["-sS", "--max-time", "5", "-G"])
            .arg(format!("http://{}/api/v1/query", self.addr))
            .args(["--data-urlencode", &format!("query={query}")])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        let r = v["data"]["result"].as_array()?;
        if r.len() != 1 {
            return None;
        }
        r[0]["value"][1].as_str()?.parse().ok()
    }

    /// Waits (up to `secs`) until `query` has one series and `ok` holds for its value.
    fn wait(&self, secs: u64, query: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let t = Instant::now();
        loop {
            if let Some(v) = self.value(query).filter(|v| ok(*v)) {
                return v;
            }
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "Prometheus never saw {query} as wanted (last: {:?}); its log: {}",
                self.value(query),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_the_cluster_and_sees_a_failover() {
    require_kvm!();
    let c = Cluster::start("metrics", &["h1", "h2", "h3"], &[], Backend::File);
    c.create_ft_counter("db");
    // Prometheus reads with a read-only token: metrics need no more.
    let out = c.ftvm(&["token", "create", "prometheus", "--role", "read-only"]);
    assert!(out.status.success(), "{out:?}");
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let dir = TempDir::new("prometheus");
    let p = Prometheus::start(&dir, &c.addr, &c.state.join("pki/ca.pem"), &token);
    p.wait(60, "up{job=\"ftvm\"}", |v| v == 1.0);
    p.wait(20, "ftvm_vm_protected{vm=\"db\"}", |v| v == 1.0);
    p.wait(20, "ftvm_vms{protection=\"protected\"}", |v| v == 1.0);
    p.wait(20, "ftvm_hosts{state=\"up\"}", |v| v == 3.0);
    // The pair's own numbers, from the primary VMM through its host agent.
    p.wait(20, "ftvm_epoch_pause_seconds_count{vm=\"db\"}", |v| v > 0.0);
    p.wait(20, "ftvm_link_bytes_total{vm=\"db\"}", |v| v > 0.0);
    assert_eq!(p.value("ftvm_failovers_total{vm=\"db\"}"), Some(0.0));
    let out = c.ok(&["ft", "test-failover", "db"]);
    assert!(out.contains("re-protected"), "{out}");
    p.wait(20, "ftvm_failovers_total{vm=\"db\"}", |v| v == 1.0);
    p.wait(20, "ftvm_failover_live_seconds_count", |v| v == 1.0);
    // Under a second to live: the bucket of 1 s holds it.
    p.wait(20, "ftvm_failover_live_seconds_bucket{le=\"1\"}", |v| {
        v == 1.0
    });
    p.wait(20, "ftvm_failover_protected_seconds_count", |v| v == 1.0);
    p.wait(20, "ftvm_vm_protected{vm=\"db\"}", |v| v == 1.0);
    // A token that is not the cluster's gets nothing.
    let o = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--cacert")
        .arg(c.state.join("pki/ca.pem"))
        .args(["-H", "authorization: Bearer prometheus.wrong"])
        .arg(format!("https://{}/metrics", c.addr))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "401");
}
