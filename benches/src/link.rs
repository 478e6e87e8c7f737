//! `ftvm-bench link`: the FT link's replication goodput against raw TCP on the same path, and
//! the transport settings of [`net::Tuning`] measured side by side.
//!
//! `cargo run --release -p ftvm-benches -- link [--mib M] [--runs N] [--rtt-us R]` (as root for
//! the namespace paths)
//!
//! One epoch of M MiB of incompressible dirty pages (default 256), encoded as the primary
//! encodes it (`Pages` frames + `EpochEnd`), is sent over a real FT link (QUIC, pinned mutual
//! TLS 1.3) and decoded, CRC-checked and counted by the receiver; goodput = page bytes / time
//! from the first byte sent to the `EpochEnd` decoded. The same bytes then go over a plain TCP
//! connection on the same path (read and dropped: the ceiling of the path without encryption,
//! framing or decoding). Each transport variant gets its own connection; the median of N runs
//! is reported. Two paths:
//! - **loopback**, both ends in this process;
//! - **veth**: the two ends in two network namespaces joined by a veth pair shaped like a
//!   dedicated FT link — `tc netem` 10 Gbit/s, 0.25 ms each way (0.5 ms RTT), MTU 9000, where
//!   the kernel has netem; else `tbf` at 10 Gbit/s without added delay. Each end's sockets are
//!   created by a thread that entered its namespace (`setns`).
//! - **delay line**: two namespaces joined by a userspace wire ([`crate::delay`]) adding R/2
//!   each way (default R = 500 µs RTT), for a real round-trip time on kernels without netem;
//!   its own ceiling is below 10 Gbit/s, so the FT link is compared with iperf3 on the same
//!   wire. ftvm's default tuning and jumbo frames only.
use crate::median_f64 as median;
use crate::sh;
use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use ft_log::page::{PageData, PageEntry, PAGE_SIZE};
use ft_log::record::{encode_pages, EpochEnd};
use ft_log::{Hello, Record, Role};
use net::link::{connect, Listener};
use net::{Congestion, Identity, LinkConfig, Tuning};
use serde::Serialize;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Serialize)]
struct Variant {
    name: String,
    tuning: String,
    gbit_per_s: Vec<f64>,
    median_gbit_per_s: f64,
    ratio_to_tcp: f64,
}

#[derive(Serialize)]
struct PathResult {
    path: &'static str,
    /// Why this path was not measured, if it was not.
    skipped: Option<String>,
    /// How the path differs from its description, if it does.
    note: String,
    tcp_gbit_per_s: Vec<f64>,
    tcp_median_gbit_per_s: f64,
    /// `iperf3` (Debian's) TCP on the same path, 3 s per run: the reference everybody can
    /// rerun. Empty with a reason in `iperf3_note` when it could not run.
    iperf3_gbit_per_s: Vec<f64>,
    iperf3_note: String,
    quic: Vec<Variant>,
}

impl PathResult {
    /// A path that could not be measured, and why.
    fn skipped(path: &Path2, why: String) -> Self {
        PathResult {
            path: path.name(),
            skipped: Some(why),
            note: String::new(),
            tcp_gbit_per_s: vec![],
            tcp_median_gbit_per_s: 0.0,
            iperf3_gbit_per_s: vec![],
            iperf3_note: String::new(),
            quic: vec![],
        }
    }
}

#[derive(Serialize)]
struct Report {
    bench: &'static str,
    command: String,
    machine: crate::Machine,
    epoch_mib: u64,
    page_bytes_per_wire_byte: f64,
    paths: Vec<PathResult>,
}

fn hello(role: Role) -> Hello {
    Hello {
        min_version: ft_log::MIN_VERSION,
        max_version: ft_log::VERSION,
        role,
        vcpus: 1,
        mem_mib: 128,
        vm_id: [0; 16],
    }
}

/// One encoded epoch of pages, as sent.
struct Epoch {
    data: Bytes,
    frames: u64,
    /// The fraction of `data` that is page contents (goodput counts only those).
    share: f64,
}

/// `mib` MiB of pseudo-random pages as one encoded epoch.
fn epoch(mib: u64) -> Epoch {
    let pages = (mib << 20) as usize / PAGE_SIZE;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let entries: Vec<PageEntry> = (0..pages)
        .map(|i| {
            let mut p = vec![0u8; PAGE_SIZE];
            for w in p.chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes());
            }
            PageEntry {
                gpa: (i * PAGE_SIZE) as u64,
                data: PageData::Raw(Bytes::from(p)),
            }
        })
        .collect();
    let mut b = BytesMut::new();
    let frames = encode_pages(&entries, 1, &mut b) as u64 + 1;
    Record::EpochEnd(EpochEnd {
        pages: pages as u32,
        events: 0,
        page_hash: 0,
        outputs: vec![],
    })
    .encode(1, &mut b);
    Epoch {
        share: (mib << 20) as f64 / b.len() as f64,
        data: b.freeze(),
        frames,
    }
}

/// Where the two ends live.
#[derive(Clone)]
enum Path2 {
    Loopback,
    /// Namespaces (server, client) and the server's address in its namespace.
    Veth {
        a: String,
        b: String,
    },
    /// Namespaces joined by the delay line.
    Delayed {
        a: String,
        b: String,
    },
}

const VETH_A: &str = "10.232.0.1";

impl Path2 {
    fn server_addr(&self) -> std::net::SocketAddr {
        match self {
            Path2::Loopback => "127.0.0.1:0".parse().unwrap(),
            Path2::Veth { .. } => format!("{VETH_A}:0").parse().unwrap(),
            Path2::Delayed { .. } => format!("{}:0", crate::delay::ADDR_A).parse().unwrap(),
        }
    }
    fn name(&self) -> &'static str {
        match self {
            Path2::Loopback => "loopback (both ends in one process)",
            Path2::Veth { .. } => {
                "veth between two network namespaces, shaped to 10 Gbit/s (+0.5 ms RTT where netem exists), MTU 9000"
            }
            Path2::Delayed { .. } => {
                "delay line between two network namespaces (userspace wire adding a fixed delay each way), MTU 9000"
            }
        }
    }
    /// Runs `f` on a thread that entered the server's (`server`) or client's namespace.
    fn on<T: Send + 'static>(
        &self,
        server: bool,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let ns = match self {
            Path2::Loopback => None,
            Path2::Veth { a, b } | Path2::Delayed { a, b } => {
                Some(if server { a.clone() } else { b.clone() })
            }
        };
        in_netns(ns, f)
    }
}

/// Runs `f` on a new thread that first entered network namespace `ns` (if any), and waits
/// for it: the sockets and taps `f` opens belong to that namespace.
pub(crate) fn in_netns<T: Send + 'static>(
    ns: Option<String>,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    std::thread::spawn(move || {
        if let Some(ns) = ns {
            enter_netns(&ns)?;
        }
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread panicked"))?
}

fn enter_netns(ns: &str) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/var/run/netns/{ns}"))
        .with_context(|| format!("network namespace {ns}"))?;
    // SAFETY: setns on a valid namespace fd; it only changes this thread's namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    Ok(())
}

/// Two namespaces joined by a shaped veth pair; removed on drop.
struct Veth {
    a: String,
    b: String,
    /// How the shaping differs from the intended one, if it does.
    note: String,
}

impl Veth {
    fn create() -> Result<Self> {
        let id = std::process::id();
        let (a, b) = (format!("ftvm-lb-a-{id}"), format!("ftvm-lb-b-{id}"));
        let (va, vb) = (format!("lba{id}"), format!("lbb{id}"));
        let mut v = Veth {
            a: a.clone(),
            b: b.clone(),
            note: String::new(),
        };
        sh(&["ip", "netns", "add", &a])?;
        sh(&["ip", "netns", "add", &b])?;
        sh(&[
            "ip", "link", "add", &va, "type", "veth", "peer", "name", &vb,
        ])?;
        sh(&["ip", "link", "set", &va, "netns", &a])?;
        sh(&["ip", "link", "set", &vb, "netns", &b])?;
        sh(&[
            "ip",
            "-n",
            &a,
            "addr",
            "add",
            &format!("{VETH_A}/24"),
            "dev",
            &va,
        ])?;
        sh(&["ip", "-n", &b, "addr", "add", "10.232.0.2/24", "dev", &vb])?;
        for (ns, dev) in [(&a, &va), (&b, &vb)] {
            sh(&["ip", "-n", ns, "link", "set", dev, "mtu", "9000"])?;
            sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            // netem (delay) first; kernels without sch_netem (this project's CI machine) get
            // the rate limit alone from tbf, and the report says so.
            let netem = sh(&[
                "tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "netem", "delay", "250us",
                "rate", "10gbit", "limit", "100000",
            ]);
            if let Err(e) = netem {
                sh(&[
                    "tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", "10gbit",
                    "burst", "2mb", "latency", "2ms",
                ])?;
                v.note = format!(
                    "no added delay: {e:#}; shaped by tbf to 10 Gbit/s only (RTT is the veth's own)"
                );
            }
        }
        Ok(v)
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .output();
        }
    }
}

fn quic_once(
    rt: &tokio::runtime::Runtime,
    path: &Path2,
    keys: &Path,
    tuning: Tuning,
    epoch: &Epoch,
) -> Result<f64> {
    let a = Identity::load_or_create(keys, "a")?;
    let b = Identity::load_or_create(keys, "b")?;
    let cfg = |me: &Identity, peer: &Identity| LinkConfig {
        identity: me.clone(),
        peer_cert: peer.cert.clone(),
        idle_timeout: Duration::from_secs(10),
        tuning,
    };
    let (ca, cb) = (cfg(&a, &b), cfg(&b, &a));
    let bind = path.server_addr();
    let h = rt.handle().clone();
    let listener = path.on(true, move || {
        let _rt = h.enter(); // quinn binds its endpoint inside a runtime
        Ok(Listener::bind(bind, &ca)?)
    })?;
    let addr = listener.local_addr();
    // The client's endpoint (its socket) is created where this future is first polled: on
    // the thread that entered the client's namespace (`block_on` polls on the calling thread).
    let handle = rt.handle().clone();
    let (data, frames) = (epoch.data.clone(), epoch.frames);
    path.on(false, move || {
        handle.block_on(async move {
            let server = tokio::spawn(async move {
                let (link, _, _) = listener.accept(&hello(Role::Secondary)).await?;
                let mut parts = link.into_parts();
                let mut page_bytes = 0u64;
                loop {
                    match parts.log_rx.recv_record().await? {
                        (_, Record::Pages(p)) => page_bytes += (p.len() * PAGE_SIZE) as u64,
                        (_, Record::EpochEnd(_)) => break,
                        _ => {}
                    }
                }
                // Keep the connection until the sender has seen the end.
                parts.log_tx.send_record(1, &Record::Ack).await?;
                anyhow::Ok((page_bytes, Instant::now(), parts))
            });
            let (link, _, _) = connect(addr, &cb, &hello(Role::Primary)).await?;
            let mut parts = link.into_parts();
            let t0 = Instant::now();
            parts.log_tx.send_frames(&data, frames).await?;
            let (_, rec) = parts.log_rx.recv_record().await?;
            anyhow::ensure!(rec == Record::Ack, "unexpected {rec:?}");
            let (page_bytes, done, _server_parts) = server.await??;
            parts.control.close("done");
            Ok(page_bytes as f64 * 8.0 / done.duration_since(t0).as_secs_f64() / 1e9)
        })
    })
}

fn tcp_once(path: &Path2, epoch: &Epoch) -> Result<f64> {
    let data = &epoch.data;
    let bind = path.server_addr();
    let l = path.on(true, move || Ok(std::net::TcpListener::bind(bind)?))?;
    let addr = l.local_addr()?;
    let n = data.len();
    let reader = std::thread::spawn(move || -> Result<Instant> {
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < n {
            let k = s.read(&mut buf)?;
            anyhow::ensure!(k > 0, "TCP peer closed early");
            got += k;
        }
        Ok(Instant::now())
    });
    let mut s = path.on(false, move || Ok(std::net::TcpStream::connect(addr)?))?;
    let t0 = Instant::now();
    s.write_all(data)?;
    let done = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    // Same numerator as QUIC: page bytes (the encoded epoch is ~0.3 % larger).
    let page_bytes = n as f64 * epoch.share;
    Ok(page_bytes * 8.0 / done.duration_since(t0).as_secs_f64() / 1e9)
}

/// TCP and every transport variant on one path, interleaved run by run so slow drifts of the
/// machine hit every variant alike.
fn measure(
    rt: &tokio::runtime::Runtime,
    path: &Path2,
    keys: &Path,
    variants: &[(&str, Tuning)],
    epoch: &Epoch,
    runs: usize,
) -> Result<PathResult> {
    let mut tcp = Vec::new();
    let mut quic: Vec<Variant> = variants
        .iter()
        .map(|(name, t)| Variant {
            name: name.to_string(),
            tuning: format!("{t:?}"),
            gbit_per_s: vec![],
            median_gbit_per_s: 0.0,
            ratio_to_tcp: 0.0,
        })
        .collect();
    for r in 0..runs {
        eprintln!("{}: run {r}", path.name());
        tcp.push(tcp_once(path, epoch)?);
        for (v, (_, t)) in quic.iter_mut().zip(variants) {
            v.gbit_per_s.push(quic_once(rt, path, keys, *t, epoch)?);
        }
    }
    let tcp_median = median(&tcp);
    for v in &mut quic {
        v.median_gbit_per_s = median(&v.gbit_per_s);
        v.ratio_to_tcp = v.median_gbit_per_s / tcp_median;
    }
    Ok(PathResult {
        path: path.name(),
        skipped: None,
        note: String::new(),
        tcp_gbit_per_s: tcp,
        tcp_median_gbit_per_s: tcp_median,
        iperf3_gbit_per_s: vec![],
        iperf3_note: String::new(),
        quic,
    })
}

/// The delay-line path: the FT link and iperf3 on a wire with `rtt_us` of round trip.
fn delayed(
    rt: &tokio::runtime::Runtime,
    keys: &Path,
    variants: &[(&str, Tuning)],
    epoch: &Epoch,
    runs: usize,
    rtt_us: u64,
) -> PathResult {
    let placeholder = Path2::Delayed {
        a: String::new(),
        b: String::new(),
    };
    let skipped = |why: String| PathResult::skipped(&placeholder, why);
    let line = match crate::delay::DelayLine::create(Duration::from_micros(rtt_us / 2)) {
        Ok(l) => l,
        Err(e) => return skipped(format!("{e:#} (the delay line needs root)")),
    };
    let path = Path2::Delayed {
        a: line.a.clone(),
        b: line.b.clone(),
    };
    let mut r = match measure(rt, &path, keys, variants, epoch, runs) {
        Ok(r) => r,
        Err(e) => return skipped(format!("{e:#}")),
    };
    r.note = format!(
        "{} µs added each way ({rtt_us} µs RTT); 64-byte UDP round trips across the wire, min / median / max of 50: {}. The wire relays each frame in user space: its frame rate, not 10 Gbit/s, is the ceiling, so compare with iperf3 here (TCP uses 9000-byte frames, the FT link 1452-byte ones unless jumbo frames are allowed)",
        rtt_us / 2,
        line.rtt().unwrap_or_else(|e| format!("{e:#}"))
    );
    for _ in 0..runs {
        match iperf3_once(&line.a, &line.b, crate::delay::ADDR_A) {
            Ok(g) => r.iperf3_gbit_per_s.push(g),
            Err(e) => {
                r.iperf3_note = format!("{e:#}");
                break;
            }
        }
    }
    r
}

/// One `iperf3` TCP run from the client's namespace `b` to the server's `a` at `addr`.
fn iperf3_once(a: &str, b: &str, addr: &str) -> Result<f64> {
    let port = "45201";
    let mut server = std::process::Command::new("ip")
        .args([
            "netns", "exec", a, "iperf3", "-s", "-1", "-B", addr, "-p", port,
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("iperf3 (Debian: iperf3)")?;
    std::thread::sleep(Duration::from_millis(300));
    let out = std::process::Command::new("ip")
        .args([
            "netns", "exec", b, "iperf3", "-c", addr, "-p", port, "-t", "3", "-J",
        ])
        .output()
        .context("iperf3 client")?;
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .with_context(|| format!("iperf3 gave no result: {}", v["error"]))
}

pub fn run(args: &[String]) -> Result<()> {
    let mut runs = 3usize;
    let mut mib = 256u64;
    let mut rtt_us = 500u64;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = it.next().context("--runs N")?.parse()?,
            "--mib" => mib = it.next().context("--mib M")?.parse()?,
            "--rtt-us" => rtt_us = it.next().context("--rtt-us R")?.parse()?,
            other => anyhow::bail!("unknown argument {other:?}"),
        }
    }
    let epoch = epoch(mib);
    let keys = std::env::temp_dir().join(format!("ftvm-bench-link-{}", std::process::id()));
    std::fs::create_dir_all(&keys)?;
    // Two workers per side, as each ftvm process has.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    let chosen = Tuning::default();
    let variants = [
        ("ftvm default", chosen),
        (
            "quinn default windows",
            Tuning {
                window: None,
                ..chosen
            },
        ),
        (
            "64 MiB windows",
            Tuning {
                window: Some(64 << 20),
                ..chosen
            },
        ),
        (
            "NewReno",
            Tuning {
                congestion: Congestion::NewReno,
                ..chosen
            },
        ),
        (
            "BBR",
            Tuning {
                congestion: Congestion::Bbr,
                ..chosen
            },
        ),
        (
            "jumbo frames (MTU discovery up to 8952)",
            Tuning {
                max_mtu: 8952,
                ..chosen
            },
        ),
    ];
    let mut paths = vec![measure(
        &rt,
        &Path2::Loopback,
        &keys,
        &variants,
        &epoch,
        runs,
    )?];
    let veth_path = Path2::Veth {
        a: String::new(),
        b: String::new(),
    };
    match Veth::create() {
        Ok(v) => {
            let path = Path2::Veth {
                a: v.a.clone(),
                b: v.b.clone(),
            };
            let mut r = measure(&rt, &path, &keys, &variants, &epoch, runs)?;
            r.note = v.note.clone();
            for _ in 0..runs {
                match iperf3_once(&v.a, &v.b, VETH_A) {
                    Ok(g) => r.iperf3_gbit_per_s.push(g),
                    Err(e) => {
                        r.iperf3_note = format!("{e:#}");
                        break;
                    }
                }
            }
            paths.push(r);
        }
        Err(e) => paths.push(PathResult::skipped(
            &veth_path,
            format!("{e:#} (the veth path needs root)"),
        )),
    }
    // ftvm's default, and jumbo frames (fewer frames for the wire to relay).
    let on_wire = [variants[0], variants[5]];
    paths.push(delayed(&rt, &keys, &on_wire, &epoch, runs, rtt_us));
    let _ = std::fs::remove_dir_all(&keys);
    let report = Report {
        bench: "link",
        command: crate::command_line("link", args),
        machine: crate::machine(),
        epoch_mib: mib,
        page_bytes_per_wire_byte: epoch.share,
        paths,
    };
    let out = crate::write_results("link", &report)?;
    println!(
        "Machine: {}\nCommand: `{}`\n",
        report.machine, report.command
    );
    for p in &report.paths {
        println!("\n**{}**\n", p.path);
        if let Some(why) = &p.skipped {
            println!("not measured: {why}");
            continue;
        }
        if !p.note.is_empty() {
            println!("Note: {}\n", p.note);
        }
        println!(
            "| transport ({mib} MiB epoch, median of {runs}) | Gbit/s of pages | vs raw TCP |"
        );
        println!("|---|---|---|");
        println!(
            "| raw TCP, same path | {:.2} | 1.00 |",
            p.tcp_median_gbit_per_s
        );
        if !p.iperf3_gbit_per_s.is_empty() {
            let m = median(&p.iperf3_gbit_per_s);
            println!(
                "| iperf3 TCP, same path | {m:.2} | {:.2} |",
                m / p.tcp_median_gbit_per_s
            );
        } else if !p.iperf3_note.is_empty() {
            println!("(iperf3 not measured: {})", p.iperf3_note);
        }
        for v in &p.quic {
            println!(
                "| FT link: {} | {:.2} | {:.2} |",
                v.name, v.median_gbit_per_s, v.ratio_to_tcp
            );
        }
    }
    eprintln!("wrote {}", out.display());
    Ok(())
}
