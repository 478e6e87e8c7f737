//! `ftvm-bench ft`: what FT costs, measured side by side in one run.
//!
//! `cargo run --release -p ftvm-benches -- ft [--runs N] [--jobs J]`
//!
//! - **Overhead** on `dirtier preset=compile-profile jobs=J` (the stand-in for a kernel
//!   compile), as the guest's own elapsed time, in three modes taken in turn: FT off
//!   (`ftvm run`), dirty tracking only (in-process VM, dirty log harvested every 20 ms, no
//!   network: the cost of write-protection faults), and FT on (a real `ftvm secondary` +
//!   `ftvm primary` pair on loopback). Also the primary's epoch pause and dirty-page
//!   distribution and its replication bytes/s, from the summary line it prints at exit.
//! - **Failover time**: a `counter` pair at 1000 lines/s; the primary is SIGKILLed at a random
//!   moment and the time until the next line lands in the console file is taken.
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vmm::{BootSource, DirtyTracking, VmConfig, Vmm};

#[derive(Serialize, Default)]
struct Overhead {
    jobs: u64,
    guest_ms_off: Vec<u64>,
    guest_ms_dirty_tracking: Vec<u64>,
    guest_ms_ft: Vec<u64>,
    ratio_ft_vs_off: f64,
    ratio_dirty_tracking_vs_off: f64,
    primary_summaries: Vec<String>,
}

#[derive(Serialize)]
struct Report {
    bench: &'static str,
    command: String,
    machine: crate::Machine,
    overhead: Overhead,
    failover_ms: Vec<u64>,
    failover_p50_ms: u64,
    failover_max_ms: u64,
}

fn guest_ms(stdout: &str) -> Result<u64> {
    stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("elapsed_ms="))
        .context(format!("no elapsed_ms in {stdout:?}"))?
        .parse()
        .context("elapsed_ms")
}

fn median(v: &[u64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_unstable();
    s[s.len() / 2] as f64
}

fn ftvm() -> Result<PathBuf> {
    let bin = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join("ftvm");
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --release` first",
            bin.display()
        );
    }
    Ok(bin)
}

fn off(bin: &Path, cmdline: &str) -> Result<u64> {
    let out = Command::new(bin)
        .args(["run", "--guest", "dirtier", "--cmdline", cmdline])
        .output()?;
    guest_ms(&String::from_utf8_lossy(&out.stdout))
}

fn dirty_tracking_only(cmdline: &str) -> Result<u64> {
    #[derive(Clone, Default)]
    struct Cap(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Cap {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let cap = Cap::default();
    let src = BootSource::Kernel {
        image: guests::by_name("dirtier").unwrap().elf.to_vec(),
        initrd: None,
        cmdline: cmdline.into(),
    };
    let cfg = VmConfig {
        vcpus: 1,
        mem_mib: 128,
        dirty: DirtyTracking::Bitmap,
    };
    let mut vm = Vmm::boot(&cfg, &src, Box::new(cap.clone()))?;
    vm.resume()?;
    loop {
        match vm.wait_event(Some(Duration::from_millis(20))) {
            Some(ev) => {
                vm.finish(ev)?;
                break;
            }
            None => {
                vm.pause()?;
                std::hint::black_box(vm.dirty_pages()?);
                vm.resume()?;
            }
        }
    }
    let text = String::from_utf8_lossy(&cap.0.lock().unwrap()).to_string();
    guest_ms(&text)
}

struct Pair {
    dir: PathBuf,
    secondary: std::process::Child,
    primary: std::process::Child,
}

fn pair(bin: &Path, tag: &str, guest: &str, cmdline: &str) -> Result<Pair> {
    let dir = std::env::temp_dir().join(format!("ftvm-bench-ft-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let console = dir.join("console.txt");
    let secondary = Command::new(bin)
        .args(["secondary", "--listen", &addr, "--datastore"])
        .arg(&dir)
        .arg("--serial-out")
        .arg(&console)
        .stderr(Stdio::null())
        .spawn()?;
    let primary = Command::new(bin)
        .args([
            "primary",
            "--guest",
            guest,
            "--cmdline",
            cmdline,
            "--peer",
            &addr,
            "--datastore",
        ])
        .arg(&dir)
        .arg("--serial-out")
        .arg(&console)
        .stderr(Stdio::piped())
        .spawn()?;
    Ok(Pair {
        dir,
        secondary,
        primary,
    })
}

fn ft_on(bin: &Path, cmdline: &str) -> Result<(u64, String)> {
    let mut p = pair(bin, "overhead", "dirtier", cmdline)?;
    let out = p.primary.wait_with_output()?;
    let _ = p.secondary.wait();
    let summary = String::from_utf8_lossy(&out.stderr)
        .lines()
        .find(|l| l.contains("summary"))
        .unwrap_or("")
        .to_string();
    let console = std::fs::read_to_string(p.dir.join("console.txt"))?;
    let _ = std::fs::remove_dir_all(&p.dir);
    Ok((guest_ms(&console)?, summary))
}

fn failover(bin: &Path, seed: u64) -> Result<u64> {
    let mut p = pair(bin, "failover", "counter", "count=100000 rate=1000")?;
    let console = p.dir.join("console.txt");
    let size = |f: &Path| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
    let t = Instant::now();
    while size(&console) == 0 {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("pair never released output");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_millis(200 + seed % 800));
    p.primary.kill()?;
    let killed = Instant::now();
    let at_kill = size(&console);
    let _ = p.primary.wait();
    while size(&console) <= at_kill {
        if killed.elapsed() > Duration::from_secs(30) {
            bail!("no output after the kill");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let ms = killed.elapsed().as_millis() as u64;
    let _ = p.secondary.kill();
    let _ = p.secondary.wait();
    let _ = std::fs::remove_dir_all(&p.dir);
    Ok(ms)
}

pub fn run(args: &[String]) -> Result<()> {
    let mut runs = 5usize;
    let mut jobs = 100u64;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = it.next().context("--runs N")?.parse()?,
            "--jobs" => jobs = it.next().context("--jobs J")?.parse()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    let bin = ftvm()?;
    let cmdline = format!("preset=compile-profile jobs={jobs}");
    let mut o = Overhead {
        jobs,
        ..Default::default()
    };
    for r in 0..runs {
        eprintln!("overhead run {r}");
        o.guest_ms_off.push(off(&bin, &cmdline)?);
        o.guest_ms_dirty_tracking
            .push(dirty_tracking_only(&cmdline)?);
        let (ms, summary) = ft_on(&bin, &cmdline)?;
        o.guest_ms_ft.push(ms);
        o.primary_summaries.push(summary);
    }
    o.ratio_ft_vs_off = median(&o.guest_ms_ft) / median(&o.guest_ms_off);
    o.ratio_dirty_tracking_vs_off = median(&o.guest_ms_dirty_tracking) / median(&o.guest_ms_off);
    let mut failover_ms = Vec::new();
    for r in 0..runs * 2 {
        eprintln!("failover run {r}");
        failover_ms.push(failover(
            &bin,
            (r as u64).wrapping_mul(0x9e37_79b9) ^ 0x5bd1,
        )?);
    }
    let mut sorted = failover_ms.clone();
    sorted.sort_unstable();
    let machine = crate::machine();
    let report = Report {
        bench: "ft",
        command: format!(
            "cargo run --release -p ftvm-benches -- ft{}",
            args.iter().map(|a| format!(" {a}")).collect::<String>()
        ),
        machine,
        failover_p50_ms: sorted[sorted.len() / 2],
        failover_max_ms: *sorted.last().unwrap(),
        failover_ms,
        overhead: o,
    };
    let out = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("results")
        .join("ft.json");
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    let o = &report.overhead;
    println!(
        "Machine: {}\nCommand: `{}`\n",
        report.machine, report.command
    );
    println!("| dirtier compile-profile jobs={} (guest ms, median of {runs}) | FT off | dirty tracking only | FT on |", o.jobs);
    println!("|---|---|---|---|");
    println!(
        "| guest time | {:.0} | {:.0} ({:.2}×) | {:.0} ({:.2}×) |",
        median(&o.guest_ms_off),
        median(&o.guest_ms_dirty_tracking),
        o.ratio_dirty_tracking_vs_off,
        median(&o.guest_ms_ft),
        o.ratio_ft_vs_off
    );
    println!("\nPrimary summaries:\n{}", o.primary_summaries.join("\n"));
    println!(
        "\nFailover, SIGKILL → next console line: p50 {} ms, max {} ms ({:?})",
        report.failover_p50_ms, report.failover_max_ms, report.failover_ms
    );
    eprintln!("wrote {}", out.display());
    Ok(())
}
