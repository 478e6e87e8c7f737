//! `cargo run --release -p ftvm-benches -- netserve [--runs N] [--mib M] [--rr K]
//! [--min-epoch-ms E]` (as root; E goes to the FT primary, default 2 as its own)
//!
//! TCP through the `netserve` guest (echo server, smoltcp at CPL3, virtio-net on a tap), with
//! FT off (`ftvm run --tap`) and on (`ftvm primary` + `ftvm secondary`, each on its own tap),
//! side by side in one run:
//! - **throughput**: one connection sends M MiB and reads the echo back concurrently; goodput
//!   is M MiB over the time until the last echoed byte arrived (each direction carries M MiB);
//! - **request/response latency**: one connection, K round trips of a 64-byte message (sent,
//!   then the 64 echoed bytes awaited), each timed: p50 and p99.
//!
//! Topology: one network namespace with a bridge holding the two taps and the client's
//! address; the FT link runs over the namespace's loopback. Under FT every frame the guest
//! sends waits for its epoch's acknowledgement (the output rule): this is what that costs.
use crate::link::in_netns;
use crate::{command_line, machine, median_f64, sh, write_results, Machine};
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NS_NET: &str = "10.237.0";

#[derive(Serialize)]
struct Side {
    ft: bool,
    goodput_mib_s: Vec<f64>,
    rr_p50_us: Vec<f64>,
    rr_p99_us: Vec<f64>,
}

#[derive(Serialize)]
struct Report {
    bench: &'static str,
    command: String,
    machine: Machine,
    mib: u64,
    round_trips: usize,
    sides: Vec<Side>,
    /// FT on / FT off, of the medians.
    goodput_ratio: f64,
    rr_p50_ratio: f64,
    rr_p99_ratio: f64,
    note: &'static str,
}

struct Ns(String);

impl Ns {
    fn create() -> Result<Ns> {
        let ns = format!("ftvm-nsb-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        sh(&["ip", "netns", "add", &ns])?;
        let n = Ns(ns.clone());
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        sh(&["ip", "-n", &ns, "link", "add", "br0", "type", "bridge"])?;
        for tap in ["tapp", "taps"] {
            sh(&["ip", "-n", &ns, "tuntap", "add", tap, "mode", "tap"])?;
            sh(&["ip", "-n", &ns, "link", "set", tap, "master", "br0"])?;
            sh(&["ip", "-n", &ns, "link", "set", tap, "up"])?;
        }
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{NS_NET}.1/24"),
            "dev",
            "br0",
        ])?;
        sh(&["ip", "-n", &ns, "link", "set", "br0", "up"])?;
        Ok(n)
    }

    fn cmd(&self, prog: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(prog);
        c
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// The guest's VMM process(es) for one measurement.
struct Vm(Vec<Child>);

impl Drop for Vm {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start(ns: &Ns, ftvm: &Path, ft: bool, dir: &Path, min_epoch_ms: &str) -> Result<Vm> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let cmdline = format!("ip={NS_NET}.2/24");
    let console = dir.join("console.txt");
    let log = |name: &str| std::fs::File::create(dir.join(name));
    let mut procs = Vec::new();
    if ft {
        for (role, extra) in [
            (
                "secondary",
                vec!["--listen", "127.0.0.1:47410", "--tap", "taps"],
            ),
            (
                "primary",
                vec![
                    "--guest",
                    "netserve",
                    "--cmdline",
                    &cmdline,
                    "--tap",
                    "tapp",
                    "--peer",
                    "127.0.0.1:47410",
                    "--min-epoch-ms",
                    min_epoch_ms,
                ],
            ),
        ] {
            procs.push(
                ns.cmd(ftvm)
                    .arg(role)
                    .args(&extra)
                    .arg("--datastore")
                    .arg(dir.join("ds"))
                    .arg("--serial-out")
                    .arg(&console)
                    .stdout(Stdio::null())
                    .stderr(log(&format!("{role}.log"))?)
                    .spawn()?,
            );
        }
    } else {
        procs.push(
            ns.cmd(ftvm)
                .args([
                    "run",
                    "--guest",
                    "netserve",
                    "--tap",
                    "tapp",
                    "--cmdline",
                    &cmdline,
                    "--serial-out",
                ])
                .arg(&console)
                .stdout(Stdio::null())
                .stderr(log("run.log")?)
                .spawn()?,
        );
    }
    let vm = Vm(procs);
    let t = Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("listening")
    {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("netserve did not come up (see {})", dir.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(vm)
}

fn connect() -> Result<TcpStream> {
    let addr = format!("{NS_NET}.2:7");
    let t = Instant::now();
    loop {
        match TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(2)) {
            Ok(s) => {
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                return Ok(s);
            }
            Err(e) if t.elapsed() > Duration::from_secs(20) => {
                return Err(e).context(format!("connecting to {addr}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// MiB/s of echoed data for `mib` MiB, checked byte for byte.
fn throughput(mib: u64) -> Result<f64> {
    let len = (mib << 20) as usize;
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
    let mut s = connect()?;
    let mut w = s.try_clone()?;
    let t = Instant::now();
    let sent = data.clone();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        w.write_all(&sent)?;
        w.shutdown(std::net::Shutdown::Write)
    });
    let mut got = Vec::with_capacity(len);
    s.read_to_end(&mut got)?;
    let secs = t.elapsed().as_secs_f64();
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    ensure!(
        got == data,
        "the echo differs ({} of {len} bytes)",
        got.len()
    );
    Ok(mib as f64 / secs)
}

/// (p50, p99) in µs of `n` 64-byte round trips.
fn round_trips(n: usize) -> Result<(f64, f64)> {
    let mut s = connect()?;
    let mut buf = [0u8; 64];
    let mut rtts = Vec::with_capacity(n);
    for i in 0..n {
        let msg = [(i % 251) as u8; 64];
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut buf)?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
        ensure!(buf == msg, "round trip {i}: wrong echo");
    }
    rtts.sort_by(f64::total_cmp);
    let q = |f: f64| rtts[((rtts.len() - 1) as f64 * f) as usize];
    Ok((q(0.5), q(0.99)))
}

pub fn run(args: &[String]) -> Result<()> {
    let (mut runs, mut mib, mut rr) = (3usize, 32u64, 2000usize);
    let mut min_epoch = "2".to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut v = || it.next().context("a value");
        match a.as_str() {
            "--runs" => runs = v()?.parse()?,
            "--mib" => mib = v()?.parse()?,
            "--rr" => rr = v()?.parse()?,
            "--min-epoch-ms" => min_epoch = v()?.clone(),
            other => bail!("unknown argument {other:?}"),
        }
    }
    let ftvm = crate::ftvm_binary()?;
    let ns = Ns::create().context("making the benchmark's network namespace (run as root)")?;
    let dir = std::env::temp_dir().join(format!("ftvm-bench-net-{}", std::process::id()));
    let mut sides = [false, true].map(|ft| Side {
        ft,
        goodput_mib_s: vec![],
        rr_p50_us: vec![],
        rr_p99_us: vec![],
    });
    for run in 0..runs {
        for side in &mut sides {
            let label = if side.ft { "FT on" } else { "FT off" };
            let vm = start(&ns, &ftvm, side.ft, &dir, &min_epoch)?;
            let g = in_netns(Some(ns.0.clone()), move || throughput(mib))?;
            let (p50, p99) = in_netns(Some(ns.0.clone()), move || round_trips(rr))?;
            drop(vm);
            eprintln!(
                "run {run}, {label}: {g:.1} MiB/s echoed, round trip p50 {p50:.0} µs, p99 {p99:.0} µs"
            );
            side.goodput_mib_s.push(g);
            side.rr_p50_us.push(p50);
            side.rr_p99_us.push(p99);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let m = |v: &[f64]| median_f64(v);
    let [off, on] = &sides;
    let rows = [
        (
            format!("echo goodput, {mib} MiB each way"),
            m(&off.goodput_mib_s),
            m(&on.goodput_mib_s),
            "MiB/s",
        ),
        (
            "64-byte round trip p50".to_string(),
            m(&off.rr_p50_us),
            m(&on.rr_p50_us),
            "µs",
        ),
        (
            "64-byte round trip p99".to_string(),
            m(&off.rr_p99_us),
            m(&on.rr_p99_us),
            "µs",
        ),
    ];
    let report = Report {
        bench: "netserve",
        command: command_line("netserve", args),
        machine: machine(),
        mib,
        round_trips: rr,
        goodput_ratio: rows[0].2 / rows[0].1,
        rr_p50_ratio: rows[1].2 / rows[1].1,
        rr_p99_ratio: rows[2].2 / rows[2].1,
        note: "netserve guest (TCP echo, smoltcp at CPL3) on virtio-net over a tap; client in the same network namespace; FT link on loopback",
        sides: sides.into(),
    };
    let json = write_results("netserve", &report)?;
    println!("Command: `{}` ({})\n", report.command, report.machine);
    println!("| TCP through netserve | FT off | FT on | on / off |");
    println!("|---|---|---|---|");
    for (what, off, on, unit) in &rows {
        println!(
            "| {what} | {off:.1} {unit} | {on:.1} {unit} | {:.2}× |",
            on / off
        );
    }
    println!("\n(medians of {runs} runs; every run is in the JSON)");
    eprintln!("wrote {}", json.display());
    Ok(())
}
