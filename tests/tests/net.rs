//! The guest network under FT, end to end: the `netserve` guest (a TCP echo server, smoltcp at
//! CPL3) on virtio-net, a real client from Debian (`socat`) in its own network namespace.
//!
//! Topology (all namespaces and links made here, removed on drop):
//!
//! ```text
//!  client ns ── veth ──┐
//!                      ├── LAN bridge (root ns) ──┬── veth ── host h1 ns: br0 (NET.11) ─ tap fttap
//!                      │                          └── veth ── host h2 ns: br0 (NET.12) ─ tap fttap
//! ```
//!
//! The primary runs on h1 on its tap, the secondary on h2 with its own tap; the FT link goes
//! over the LAN. The guest is NET.2 with the same MAC on either host.
use ftvm_tests::netns::{self, sh};
use ftvm_tests::{ftvm_bin, require_kvm, Rng, TempDir};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One topology at a time (fixed names).
static SERIAL: Mutex<()> = Mutex::new(());

const NET: &str = "10.236.0";
const GUEST_MAC: &str = "02:46:54:56:4d:01";
const FT_PORT: u16 = 47_300;

struct Lan {
    tag: String,
    bridge: String,
    /// Namespaces: h1, h2, client.
    ns: [String; 3],
}

impl Lan {
    fn create() -> Lan {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("{}{n}", std::process::id() % 10_000);
        let bridge = format!("ftlan{tag}");
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        sh(&["ip", "link", "add", &bridge, "type", "bridge"]);
        sh(&["ip", "link", "set", &bridge, "up"]);
        let ns = [
            format!("ftvm-n{tag}-h1"),
            format!("ftvm-n{tag}-h2"),
            format!("ftvm-n{tag}-c"),
        ];
        for (i, n) in ns.iter().enumerate() {
            let (v, vb) = (format!("fnh{i}-{tag}"), format!("fnb{i}-{tag}"));
            let _ = Command::new("ip").args(["link", "del", &vb]).output();
            netns::add(n);
            sh(&["ip", "link", "add", &v, "type", "veth", "peer", "name", &vb]);
            sh(&["ip", "link", "set", &v, "netns", n]);
            sh(&["ip", "link", "set", &vb, "master", &bridge]);
            sh(&["ip", "link", "set", &vb, "up"]);
            sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
            sh(&["ip", "-n", n, "link", "set", &v, "up"]);
            if i < 2 {
                // A host: its uplink and the VM's tap on one bridge, the host's address on it.
                sh(&["ip", "-n", n, "link", "add", "br0", "type", "bridge"]);
                sh(&["ip", "-n", n, "link", "set", &v, "master", "br0"]);
                sh(&["ip", "-n", n, "tuntap", "add", "fttap", "mode", "tap"]);
                sh(&["ip", "-n", n, "link", "set", "fttap", "master", "br0"]);
                sh(&["ip", "-n", n, "link", "set", "fttap", "up"]);
                let addr = format!("{NET}.{}/24", 11 + i);
                sh(&["ip", "-n", n, "addr", "add", &addr, "dev", "br0"]);
                sh(&["ip", "-n", n, "link", "set", "br0", "up"]);
            } else {
                sh(&[
                    "ip",
                    "-n",
                    n,
                    "addr",
                    "add",
                    &format!("{NET}.100/24"),
                    "dev",
                    &v,
                ]);
            }
        }
        Lan { tag, bridge, ns }
    }

    /// A command run inside namespace `i` (0 = h1, 1 = h2, 2 = client).
    fn cmd(&self, i: usize, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns[i]]).arg(prog);
        c
    }

    /// The LAN bridge port the guest's MAC was last seen on: `Some(0)` = h1, `Some(1)` = h2.
    fn guest_port(&self) -> Option<usize> {
        let o = Command::new("bridge")
            .args(["fdb", "show", "br", &self.bridge])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        let line = text.lines().find(|l| l.starts_with(GUEST_MAC))?;
        (0..2).find(|i| line.contains(&format!("dev fnb{i}-{} ", self.tag)))
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        netns::remove(&self.ns, &[&self.bridge]);
    }
}

/// A protected netserve pair: primary on h1, secondary on h2.
struct Pair {
    primary: Child,
    secondary: Child,
    /// The datastore: every process of this pair has it on its command line.
    ds: std::path::PathBuf,
}

impl Pair {
    fn start(lan: &Lan, dir: &TempDir, conns: u32) -> Pair {
        let ds = dir.path("ds");
        let peer = format!("{NET}.12:{FT_PORT}");
        let side = |i: usize, args: &[&str], log: &str| {
            lan.cmd(i, ftvm_bin())
                .args(args)
                .arg("--datastore")
                .arg(&ds)
                .arg("--serial-out")
                .arg(ds.join("console.txt"))
                .args(["--tap", "fttap"])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path(log)).unwrap())
                .spawn()
                .unwrap()
        };
        let secondary = side(1, &["secondary", "--listen", &peer], "secondary.log");
        let cmdline = format!("ip={NET}.2/24 conns={conns}");
        let primary = side(
            0,
            &[
                "primary",
                "--guest",
                "netserve",
                "--cmdline",
                &cmdline,
                "--peer",
                &peer,
            ],
            "primary.log",
        );
        let mut p = Pair {
            primary,
            secondary,
            ds: ds.clone(),
        };
        // Output is released only once the sync's epoch is acknowledged: the console line
        // means the pair is protecting.
        let t = Instant::now();
        while !console(dir).contains("netserve: listening") {
            if let Some(st) = p.primary.try_wait().unwrap() {
                panic!("primary exited early ({st}): {}", log(dir, "primary.log"));
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "the pair never released output: {}",
                log(dir, "primary.log")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        p
    }

    /// Both processes end (the guest exited after its connections) with status 0.
    fn wait_clean_exit(&mut self, dir: &TempDir) {
        for (c, name) in [
            (&mut self.primary, "primary"),
            (&mut self.secondary, "secondary"),
        ] {
            let t = Instant::now();
            let st = loop {
                if let Some(st) = c.try_wait().unwrap() {
                    break st;
                }
                if t.elapsed() > Duration::from_secs(60) {
                    let _ = c.kill();
                    panic!("{name} did not exit: {}", log(dir, &format!("{name}.log")));
                }
                std::thread::sleep(Duration::from_millis(10));
            };
            // A primary that was killed has no status 0 to give.
            if st.signal().is_none() {
                assert_eq!(
                    st.code(),
                    Some(0),
                    "{name}: {}",
                    log(dir, &format!("{name}.log"))
                );
            }
        }
    }
}

use std::os::unix::process::ExitStatusExt;

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = self.primary.kill();
        let _ = self.secondary.kill();
        let _ = self.primary.wait();
        let _ = self.secondary.wait();
        // A secondary `ftvm ctl test-failover` started is not our child.
        let _ = Command::new("pkill")
            .arg("-9")
            .arg("-f")
            .arg(&self.ds)
            .status();
    }
}

fn console(dir: &TempDir) -> String {
    std::fs::read_to_string(dir.path("ds").join("console.txt")).unwrap_or_default()
}

fn log(dir: &TempDir, name: &str) -> String {
    std::fs::read_to_string(dir.path(name)).unwrap_or_default()
}

/// `socat` in the client namespace sending `input` to the guest's echo port, the echo
/// written to `output`.
fn socat(lan: &Lan, input: &std::path::Path, output: &std::path::Path) -> Child {
    lan.cmd(2, "socat")
        .args(["-t", "60", "-T", "120", "-", &format!("TCP:{NET}.2:7")])
        .stdin(std::fs::File::open(input).unwrap())
        .stdout(std::fs::File::create(output).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .expect("socat (Debian package socat) must be installed")
}

fn finish(mut c: Child, secs: u64, what: &str) -> Output {
    let t = Instant::now();
    while c.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(secs) {
            let _ = c.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let o = c.wait_with_output().unwrap();
    assert!(o.status.success(), "{what}: {o:?}");
    o
}

fn random_file(path: &std::path::Path, len: usize, rng: &mut Rng) -> Vec<u8> {
    let data: Vec<u8> = (0..len / 8)
        .flat_map(|_| rng.next_u64().to_le_bytes())
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}

/// `ftvm run --tap` without FT: socat's bytes come back exactly.
#[test]
fn netserve_echoes_a_stream_without_ft() {
    require_kvm!();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lan = Lan::create();
    let dir = TempDir::new("net-run");
    let mut rng = Rng::from_env("net_run");
    let data = random_file(&dir.path("in"), 4 << 20, &mut rng);
    let vm = lan
        .cmd(0, ftvm_bin())
        .args(["run", "--guest", "netserve", "--tap", "fttap", "--cmdline"])
        .arg(format!("ip={NET}.2/24 conns=1"))
        .output_file(&dir.path("console"));
    let t = Instant::now();
    while !std::fs::read_to_string(dir.path("console"))
        .unwrap_or_default()
        .contains("listening")
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "netserve never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    finish(socat(&lan, &dir.path("in"), &dir.path("out")), 60, "socat");
    assert!(
        std::fs::read(dir.path("out")).unwrap() == data,
        "echo differs"
    );
    let o = finish(vm, 20, "ftvm run");
    let text = std::fs::read_to_string(dir.path("console")).unwrap();
    assert!(
        text.contains(&format!(
            "connection 1 ended after {} bytes echoed",
            data.len()
        )),
        "{text} {o:?}"
    );
}

trait SpawnToFile {
    fn output_file(&mut self, path: &std::path::Path) -> Child;
}

impl SpawnToFile for Command {
    fn output_file(&mut self, path: &std::path::Path) -> Child {
        self.stdout(std::fs::File::create(path).unwrap())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

/// The acceptance test: a socat stream through netserve, the primary failed mid-stream (even
/// rounds: SIGKILL; odd rounds: `ftvm ctl test-failover`, which also brings protection back
/// with a new secondary), ten times. Each time the connection survives (socat ends
/// normally), the bytes echoed equal the bytes sent, the secondary took over and announced the
/// MAC, a new connection works, and the VM ends cleanly after it.
#[test]
fn tcp_stream_survives_ten_failovers_mid_stream() {
    require_kvm!();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lan = Lan::create();
    let mut rng = Rng::from_env("net_failover");
    for round in 0..10 {
        let dir = TempDir::new("net-ft");
        let len = 6 << 20;
        let data = random_file(&dir.path("in"), len, &mut rng);
        let mut pair = Pair::start(&lan, &dir, 2);
        let client = socat(&lan, &dir.path("in"), &dir.path("out"));
        // Fail somewhere in the first half of the echo.
        let at = rng.range(64 << 10, (len / 2) as u64);
        let t = Instant::now();
        while std::fs::metadata(dir.path("out")).map_or(0, |m| m.len()) < at {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "round {round}: the echo stalled before {at} bytes: {}",
                log(&dir, "primary.log")
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let failed_at = Instant::now();
        // Test Failover also starts a new secondary (on h2, beside the new primary) and waits
        // until protection is back.
        let ctl = if round % 2 == 0 {
            let _ = pair.primary.kill();
            None
        } else {
            Some(
                lan.cmd(1, ftvm_bin())
                    .args(["ctl", "--datastore"])
                    .arg(dir.path("ds"))
                    .arg("test-failover")
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap(),
            )
        };
        let how = if ctl.is_some() {
            "test-failover"
        } else {
            "SIGKILL"
        };
        let o = finish(client, 120, &format!("round {round}: socat"));
        let rest = failed_at.elapsed();
        if let Some(ctl) = ctl {
            let out = finish(ctl, 90, &format!("round {round}: ftvm ctl test-failover"));
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains("secondary is live after")
                    && text.contains("protection restored after"),
                "round {round}: {text}"
            );
        }
        let got = std::fs::read(dir.path("out")).unwrap();
        assert_eq!(got.len(), len, "round {round} ({how} at {at} bytes)");
        assert!(
            got == data,
            "round {round}: the echo differs from what was sent"
        );
        assert!(o.stderr.is_empty(), "round {round}: socat: {o:?}");
        // A new connection to the new primary; the guest ends after it.
        std::fs::write(dir.path("bye"), b"bye\n").unwrap();
        finish(
            socat(&lan, &dir.path("bye"), &dir.path("bye.out")),
            30,
            "second socat",
        );
        assert_eq!(std::fs::read(dir.path("bye.out")).unwrap(), b"bye\n");
        pair.wait_clean_exit(&dir);
        let sec = log(&dir, "secondary.log");
        assert!(
            sec.contains("taking over") && sec.contains("announced MAC"),
            "round {round}: {sec}"
        );
        eprintln!(
            "round {round}: {how} at {at} bytes: all {len} bytes echoed exactly, the stream ended {} ms after the failure",
            rest.as_millis()
        );
    }
}

/// After a takeover the new primary announces the guest's MAC: the LAN switch moves it to the
/// secondary's port while the guest itself sends nothing, and a new client connection works.
#[test]
fn a_new_primary_announces_the_guest_mac_to_the_switch() {
    require_kvm!();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lan = Lan::create();
    let dir = TempDir::new("net-rarp");
    std::fs::write(dir.path("in"), b"hello\n").unwrap();
    let mut pair = Pair::start(&lan, &dir, 2);
    finish(socat(&lan, &dir.path("in"), &dir.path("out")), 30, "socat");
    assert_eq!(std::fs::read(dir.path("out")).unwrap(), b"hello\n");
    assert_eq!(
        lan.guest_port(),
        Some(0),
        "the switch learnt the guest on h1"
    );
    // Fail once the connection's end is committed (its console line is released), so that
    // the new primary has nothing of it to send again: only the announcement moves the MAC.
    let t = Instant::now();
    while !console(&dir).contains("connection 1 ended") {
        assert!(t.elapsed() < Duration::from_secs(10), "{}", console(&dir));
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    let _ = pair.primary.kill();
    let t = Instant::now();
    while lan.guest_port() != Some(1) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the switch still sends the guest's frames to h1: {}",
            log(&dir, "secondary.log")
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    finish(
        socat(&lan, &dir.path("in"), &dir.path("out")),
        30,
        "socat after takeover",
    );
    assert_eq!(std::fs::read(dir.path("out")).unwrap(), b"hello\n");
    pair.wait_clean_exit(&dir);
}

/// A connection being opened when the primary freezes (SIGSTOP for 0.2–1.5 s, the secondary
/// takes over, the thawed primary halts): the client's retried SYN is answered by the new
/// primary and the echo completes.
#[test]
fn a_connection_opened_across_a_frozen_primary_completes() {
    require_kvm!();
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lan = Lan::create();
    let mut rng = Rng::from_env("net_frozen_connect");
    let rounds = std::env::var("FTVM_NET_FREEZE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    for round in 0..rounds {
        let dir = TempDir::new("net-freeze");
        let data = random_file(&dir.path("in"), 64 << 10, &mut rng);
        let mut pair = Pair::start(&lan, &dir, 2);
        let client = socat(&lan, &dir.path("in"), &dir.path("out"));
        std::thread::sleep(Duration::from_millis(rng.range(0, 30)));
        let pid = pair.primary.id().to_string();
        sh(&["kill", "-STOP", &pid]);
        let frozen = Duration::from_millis(rng.range(200, 1500));
        let t = Instant::now();
        let mut fdb = Vec::new();
        while t.elapsed() < frozen {
            fdb.push((t.elapsed().as_millis(), lan.guest_port()));
            std::thread::sleep(Duration::from_millis(50));
        }
        sh(&["kill", "-CONT", &pid]);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(3) {
            fdb.push((
                frozen.as_millis() + t.elapsed().as_millis(),
                lan.guest_port(),
            ));
            std::thread::sleep(Duration::from_millis(100));
        }
        let c = client;
        let o = {
            let mut c = c;
            let t = Instant::now();
            while c.try_wait().unwrap().is_none() && t.elapsed() < Duration::from_secs(40) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            c.wait_with_output().unwrap()
        };
        let got = std::fs::read(dir.path("out")).unwrap_or_default();
        assert!(
            o.status.success() && got == data,
            "round {round} (frozen {frozen:?}): socat {:?}: {} of {} bytes echoed: {}\nfdb: {fdb:?}\nprimary: {}\nsecondary: {}",
            o.status,
            got.len(),
            data.len(),
            String::from_utf8_lossy(&o.stderr),
            log(&dir, "primary.log"),
            log(&dir, "secondary.log"),
        );
        std::fs::write(dir.path("bye"), b"bye\n").unwrap();
        finish(
            socat(&lan, &dir.path("bye"), &dir.path("bye.out")),
            30,
            "second socat",
        );
        // The thawed primary halted (status 3: it lost); the new primary ends with the guest.
        let st = pair.primary.wait().unwrap();
        assert_eq!(st.code(), Some(3), "{}", log(&dir, "primary.log"));
        let st = pair.secondary.wait().unwrap();
        assert_eq!(st.code(), Some(0), "{}", log(&dir, "secondary.log"));
        eprintln!("round {round}: frozen {frozen:?}: connected and echoed");
    }
}
