//! `ftvm-bench detect`: does failure detection fire on a healthy pair of a loaded host, and
//! how fast is a real failover there?
//!
//! Runs two healthy pairs side by side — a `dirtier` with a 1.5 GiB working set and a
//! `counter` — for `--minutes` (default 5) while the host is loaded: a `cargo build` of the
//! workspace, over and over in a target directory of its own, plus `--spinners` CPU-bound
//! threads. Counts every takeover (a secondary going live) and every primary that lost its
//! secondary: on healthy pairs each is a false detection (safe — output is held — but a
//! re-sync). Then, under the same load, kills the primary of a counter pair `--failovers`
//! times and measures from the kill to the new primary's first output (failover p50/p99).
//!
//! `cargo run --release -p ftvm-benches -- detect [--minutes M] [--failovers N]
//! [--spinners S] [--no-load]`
use crate::ft::{ftvm, guest_args};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Serialize)]
struct Report {
    bench: &'static str,
    command: String,
    machine: crate::Machine,
    minutes: f64,
    load: String,
    /// Per healthy pair: guest, takeovers, primaries that lost their secondary, how long it
    /// ran.
    healthy: Vec<Healthy>,
    false_detections: u64,
    failover_ms: Vec<u64>,
    failover_p50_ms: u64,
    failover_p99_ms: u64,
    failover_max_ms: u64,
    /// Load average over the run (1-minute figure sampled every 10 s).
    loadavg: Vec<f64>,
}

#[derive(Serialize)]
struct Healthy {
    guest: String,
    takeovers: u64,
    secondary_lost: u64,
    /// Times the pair split and protection was restored.
    splits: u64,
    /// The evidence lines the processes logged (warn level).
    evidence: Vec<String>,
    seconds: f64,
    /// Both sides' `ftvm ctl status` at the end of the window (protected, epoch, bytes/s).
    status: String,
}

/// The host's load while the bench runs: cargo building the workspace again and again, and
/// busy threads.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    build: Option<Child>,
}

impl Load {
    fn start(spinners: usize) -> Result<Load> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 0..spinners {
            let stop = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("spinner{i}"))
                    .spawn(move || {
                        let mut x = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            for _ in 0..1_000_000 {
                                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                            }
                            std::hint::black_box(x);
                        }
                    })?,
            );
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let target = std::env::temp_dir().join("ftvm-bench-detect-build");
        // A shell loop: a clean build of the whole workspace, then again.
        let build = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while true; do rm -rf '{t}'; cargo build --workspace --offline -j 2 --target-dir '{t}' >/dev/null 2>&1; done",
                t = target.display()
            ))
            .current_dir(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting the cargo build load")?;
        Ok(Load {
            stop,
            threads,
            build: Some(build),
        })
    }
}

/// Stops the load, on every path out of the bench (an error too).
impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(mut b) = self.build.take() {
            // SAFETY: SIGKILL to the build loop's own process group (cargo and rustc).
            unsafe { libc::kill(-(b.id() as i32), libc::SIGKILL) };
            let _ = b.wait();
        }
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join("ftvm-bench-detect-build"));
    }
}

use std::os::unix::process::CommandExt;

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

impl Drop for LoggedPair {
    fn drop(&mut self) {
        // (A secondary started by `ctl resume` is not a child: it leaves once its primary
        // is gone.)
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A healthy pair on loopback: both sides log to files in its datastore `dir`.
struct LoggedPair {
    dir: std::path::PathBuf,
    children: Vec<Child>,
    /// Times protection had to be restored (`ftvm ctl resume`) after the pair split.
    splits: u64,
}

impl LoggedPair {
    fn start(bin: &Path, tag: &str, boot: &[String]) -> Result<LoggedPair> {
        let dir =
            std::env::temp_dir().join(format!("ftvm-bench-detect-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let addr = format!(
            "127.0.0.1:{}",
            std::net::UdpSocket::bind("127.0.0.1:0")?
                .local_addr()?
                .port()
        );
        let console = dir.join("console.txt");
        let side = |args: &[&str], log: &str| -> Result<Child> {
            Ok(Command::new(bin)
                .args(args)
                .arg("--datastore")
                .arg(&dir)
                .arg("--serial-out")
                .arg(&console)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join(log))?)
                .spawn()?)
        };
        let s = side(&["secondary", "--listen", &addr], "secondary.err")?;
        let mut args = vec!["primary"];
        args.extend(boot.iter().map(String::as_str));
        args.extend(["--peer", &addr]);
        let p = side(&args, "primary.err")?;
        Ok(LoggedPair {
            dir,
            children: vec![s, p],
            splits: 0,
        })
    }

    fn status(&self, bin: &Path) -> String {
        Command::new(bin)
            .args(["ctl", "--datastore"])
            .arg(&self.dir)
            .arg("status")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    }

    /// If the pair split (a false detection on a healthy pair), counts it and restores
    /// protection with `ftvm ctl resume`.
    fn mend(&mut self, bin: &Path, what: &str) -> Result<()> {
        let st = self.status(bin);
        if !st.contains("role=primary") {
            bail!("the {what} pair has no primary: see {}", self.dir.display());
        }
        if st.contains("role=primary protected=true") || st.contains("syncing") {
            return Ok(());
        }
        // Unprotected: wait for the halting side to leave, then resume.
        std::thread::sleep(Duration::from_millis(500));
        if self.status(bin).contains("secondary:") {
            return Ok(());
        }
        self.splits += 1;
        eprintln!("detect: the {what} pair split; resuming protection");
        let o = Command::new(bin)
            .args(["ctl", "--datastore"])
            .arg(&self.dir)
            .arg("resume")
            .output()?;
        if !o.status.success() {
            bail!(
                "resuming the {what} pair: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(())
    }

    /// Counts false detections in the pair's logs (after checking it is protected at the
    /// end), then stops it.
    fn judge(mut self, bin: &Path, guest: &str, secs: f64) -> Result<Healthy> {
        let status = self.status(bin);
        let pids: Vec<i32> = status
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("pid=")?.parse().ok())
            .collect();
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in pids {
            // SAFETY: SIGKILL to this bench's own pair processes (started by `ctl resume`).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if !status.contains("role=primary protected=true") {
            bail!("the {guest} pair is not protected at the end of the window: {status}");
        }
        let logs: String = ["primary.err", "secondary.err", "secondary.log"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default())
            .collect();
        let evidence: Vec<String> = logs
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("halting"))
            .map(str::to_string)
            .collect();
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(Healthy {
            guest: guest.into(),
            takeovers: logs.matches("taking over").count() as u64,
            secondary_lost: logs.matches("secondary lost; running unprotected").count() as u64,
            splits: self.splits,
            evidence,
            seconds: secs,
            status,
        })
    }
}

pub fn run(args: &[String]) -> Result<()> {
    let mut minutes = 5.0f64;
    let mut failovers = 30usize;
    let mut spinners = 2usize;
    let mut load_on = true;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--minutes" => minutes = it.next().context("--minutes M")?.parse()?,
            "--failovers" => failovers = it.next().context("--failovers N")?.parse()?,
            "--spinners" => spinners = it.next().context("--spinners S")?.parse()?,
            "--no-load" => load_on = false,
            other => bail!("unknown argument {other:?}"),
        }
    }
    let bin = ftvm()?;
    let load = if load_on {
        Some(Load::start(spinners)?)
    } else {
        None
    };
    let secs = minutes * 60.0;
    // Both pairs run longer than the measured window; they are stopped at its end.
    let dirtier = format!("mib=1536 pages_per_sec=20000 secs={}", secs as u64 + 120);
    let counter = "count=100000000 rate=100";
    let mem = ["--mem-mib".to_string(), "2048".to_string()];
    let mut pd = LoggedPair::start(
        &bin,
        "dirtier",
        &[guest_args("dirtier", &dirtier), mem.to_vec()].concat(),
    )?;
    let mut pc = LoggedPair::start(&bin, "counter", &guest_args("counter", counter))?;
    let t = Instant::now();
    let mut loads = Vec::new();
    let mut last_load = Instant::now();
    while t.elapsed().as_secs_f64() < secs {
        std::thread::sleep(Duration::from_secs(2));
        if last_load.elapsed() >= Duration::from_secs(10) {
            last_load = Instant::now();
            loads.push(loadavg());
            eprintln!(
                "detect: {:.0} s of {secs:.0}, load {:.1}",
                t.elapsed().as_secs_f64(),
                loads.last().unwrap()
            );
        }
        // (Not before the pairs' first sync: the dirtier backs 2 GiB on both sides.)
        if t.elapsed() > Duration::from_secs(30) {
            pd.mend(&bin, "dirtier")?;
            pc.mend(&bin, "counter")?;
        }
    }
    let ran = t.elapsed().as_secs_f64();
    let healthy = vec![
        pd.judge(&bin, "dirtier", ran)?,
        pc.judge(&bin, "counter", ran)?,
    ];
    let mut failover_ms = Vec::new();
    for r in 0..failovers {
        eprintln!("detect: failover {r} under load");
        failover_ms.push(crate::ft::failover(
            &bin,
            (r as u64).wrapping_mul(0x9e37_79b9) ^ 0x77,
        )?);
    }
    drop(load);
    let mut sorted = failover_ms.clone();
    sorted.sort_unstable();
    let q = |f: f64| sorted[((sorted.len() - 1) as f64 * f).round() as usize];
    let report = Report {
        bench: "detect",
        command: crate::command_line("detect", args),
        machine: crate::machine(),
        minutes: ran / 60.0,
        load: if load_on {
            format!("cargo build --workspace -j 2 in a loop + {spinners} spinner threads")
        } else {
            "none".into()
        },
        false_detections: healthy.iter().map(|h| h.splits).sum(),
        healthy,
        failover_p50_ms: q(0.5),
        failover_p99_ms: q(0.99),
        failover_max_ms: *sorted.last().unwrap(),
        failover_ms,
        loadavg: loads,
    };
    let out = crate::write_results(if load_on { "detect" } else { "detect-no-load" }, &report)?;
    println!(
        "Machine: {}\nCommand: `{}`\n",
        report.machine, report.command
    );
    println!(
        "Healthy pairs for {:.1} min, extra load: {} (load average {:.1}–{:.1}):\n",
        report.minutes,
        report.load,
        report.loadavg.iter().copied().fold(f64::MAX, f64::min),
        report.loadavg.iter().copied().fold(0.0, f64::max),
    );
    println!("| pair | splits (false detections) | takeovers | primary lost its secondary | primary's status at the end |\n|---|---|---|---|---|");
    for h in &report.healthy {
        let st = h.status.lines().next().unwrap_or("");
        println!(
            "| {} | {} | {} | {} | `{st}` |",
            h.guest, h.splits, h.takeovers, h.secondary_lost
        );
    }
    println!(
        "\nFailover on the same host, same load ({} kills of a counter pair's primary, kill to the new primary's first output): p50 {} ms, p99 {} ms, max {} ms",
        report.failover_ms.len(),
        report.failover_p50_ms,
        report.failover_p99_ms,
        report.failover_max_ms
    );
    eprintln!("wrote {}", out.display());
    Ok(())
}
