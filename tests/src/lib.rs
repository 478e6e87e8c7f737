//! Helpers for ftvm's end-to-end tests.
//!
//! The tests drive the real `ftvm` binary (built by `cargo build --release`, which the README's
//! test command runs first) and the real `/dev/kvm`. A test that needs KVM and cannot open it
//! **fails** with a message saying so; set `FTVM_SKIP_KVM_TESTS=1` to skip those tests
//! explicitly instead (CI never sets it).
pub mod cluster;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// True if the KVM tests should run; panics with a clear message when KVM is unusable and the
/// opt-out variable is not set.
pub fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            if std::env::var_os("FTVM_SKIP_KVM_TESTS").is_some_and(|v| v == "1") {
                eprintln!("skipping: /dev/kvm unusable ({e}) and FTVM_SKIP_KVM_TESTS=1");
                false
            } else {
                panic!(
                    "this test needs /dev/kvm, which cannot be opened: {e}. Run on a host with KVM \
                     (as a user allowed to use it), or set FTVM_SKIP_KVM_TESTS=1 to skip KVM tests."
                );
            }
        }
    }
}

/// Skips the calling test (returns) when KVM tests are explicitly opted out.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::kvm_available() {
            return;
        }
    };
}

/// The `ftvm` binary next to this test executable (`target/<profile>/ftvm`), or `$FTVM_BIN`.
pub fn ftvm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FTVM_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = dir.join("ftvm");
    assert!(
        bin.exists(),
        "ftvm binary not found at {}: build it first (`cargo build --release`; the README test command does)",
        bin.display()
    );
    bin
}

/// Runs `ftvm` with `args`, returning its output.
pub fn ftvm(args: &[&str]) -> Output {
    Command::new(ftvm_bin())
        .args(args)
        .output()
        .expect("spawn ftvm")
}

/// One side of an FT pair as its control socket describes it (a `primary:` or `secondary:`
/// line of `ftvm ctl status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Side {
    pub pid: u32,
    pub protected: bool,
    /// The primary's last closed epoch; the secondary's last committed one.
    pub epoch: u64,
    /// Protection sessions this process has had (a re-protection starts a new one).
    pub sessions: u64,
}

impl Side {
    /// The side answering as `role` in the output of `ftvm ctl status`.
    pub fn parse(ctl_status: &str, role: &str) -> Option<Side> {
        let line = ctl_status
            .lines()
            .find_map(|l| l.strip_prefix(role)?.strip_prefix(':'))?;
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
        };
        Some(Side {
            pid: field("pid")?.parse().ok()?,
            protected: field("protected")? == "true",
            epoch: field("epoch")?.parse().ok()?,
            sessions: field("sessions")?.parse().ok()?,
        })
    }
}

/// A UDP port on loopback that was free a moment ago (for an FT link's listener).
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A count from the environment variable `name` (a soak's size), else `default`.
pub fn env_count(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A fresh scratch directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "ftvm-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    /// Removes the directory, unless a test is failing: then its logs and datastores stay
    /// for inspection.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed: kept {} for inspection", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies the files under `from` smaller than 64 MiB (logs, consoles, state; not disk
/// images) to `to`, keeping the tree: what a failed test leaves for inspection from a
/// file system it is about to unmount.
pub fn copy_small_files(from: &Path, to: &Path) {
    let Ok(entries) = std::fs::read_dir(from) else {
        return;
    };
    for e in entries.flatten() {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        match e.metadata() {
            Ok(m) if m.is_dir() => copy_small_files(&src, &dst),
            Ok(m) if m.is_file() && m.len() < 64 << 20 => {
                let _ = std::fs::create_dir_all(to);
                let _ = std::fs::copy(&src, &dst);
            }
            _ => {}
        }
    }
}

/// `1\n2\n…N\n`.
pub fn counter_output(n: u64) -> String {
    (1..=n).map(|i| format!("{i}\n")).collect()
}

/// A small deterministic PRNG (splitmix64) for random test moments; the seed is printed so a
/// failure can be replayed with `FTVM_TEST_SEED`.
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (for a schedule of its own inside a test).
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn from_env(test: &str) -> Self {
        let seed = std::env::var("FTVM_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{test}: FTVM_TEST_SEED={seed}");
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }
}

/// Asserts that `out` failed with one clear `ftvm: error:` line containing `needle`, no panic.
pub fn assert_clear_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "ftvm panicked: {stderr}");
    assert!(stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
    let code = out.status.code().expect("exited, not killed by a signal");
    assert!(code == 1 || code == 2, "exit code {code}; stderr: {stderr}");
}

/// An etcd server for a test: the one named by `FTVM_ETCD_ENDPOINTS` (scripts/test.sh starts
/// one), else a private real `etcd` (Debian's etcd-server) on free loopback ports, stopped on
/// drop. Each user takes its own key prefix ([`Etcd::prefix`]), so tests never share state.
pub struct Etcd {
    pub endpoints: Vec<String>,
    child: Option<std::process::Child>,
    dir: Option<TempDir>,
}

impl Etcd {
    pub fn start() -> Etcd {
        if let Ok(e) = std::env::var("FTVM_ETCD_ENDPOINTS") {
            return Etcd {
                endpoints: e.split(',').map(str::to_string).collect(),
                child: None,
                dir: None,
            };
        }
        let dir = TempDir::new("etcd");
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (client, peer) = (
            format!("http://127.0.0.1:{}", free()),
            format!("http://127.0.0.1:{}", free()),
        );
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(dir.path("data"))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path("etcd.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run `etcd` ({e}): install Debian's etcd-server (scripts/test.sh \
                     does) or point FTVM_ETCD_ENDPOINTS at a running etcd"
                )
            });
        let e = Etcd {
            endpoints: vec![client.clone()],
            child: Some(child),
            dir: Some(dir),
        };
        // Ready when it answers on its client port.
        let addr = client.trim_start_matches("http://").to_string();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "etcd did not start listening on {addr}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        e
    }

    /// A key prefix no other test uses (`/ftvm-test/TAG-PID-N/`).
    pub fn prefix(&self, tag: &str) -> String {
        static N: AtomicU64 = AtomicU64::new(0);
        format!(
            "/ftvm-test/{tag}-{}-{}/",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// The endpoints as `ftvm coordinator --etcd` takes them.
    pub fn arg(&self) -> String {
        self.endpoints.join(",")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.dir.take();
    }
}

/// The `journal` guest's records on a disk image (see `guests/bare/src/bin/journal.rs`):
/// sector N holds record N = magic `FTVMJRNL` | N | 480 payload bytes from N | FNV-1a-64.
pub mod journal {
    const SECTOR: usize = 512;

    fn fnv1a(b: &[u8]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for x in b {
            h ^= u64::from(*x);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        h
    }

    /// Record `seq` exactly as the guest writes it.
    pub fn record(seq: u64) -> [u8; SECTOR] {
        let mut out = [0u8; SECTOR];
        out[..8].copy_from_slice(b"FTVMJRNL");
        out[8..16].copy_from_slice(&seq.to_le_bytes());
        let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        for b in out[16..496].iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let h = fnv1a(&out[..504]);
        out[504..].copy_from_slice(&h.to_le_bytes());
        out
    }

    /// Checks `disk` holds records 1..=N exactly (each byte-identical to what the guest
    /// writes) followed only by sectors that are not records; returns N. Panics naming the
    /// first torn, duplicated or misplaced record.
    pub fn verify(disk: &[u8]) -> u64 {
        let mut n = 0u64;
        for (i, s) in disk.chunks(SECTOR).enumerate().skip(1) {
            let is_record = s.starts_with(b"FTVMJRNL");
            if n == i as u64 - 1 && is_record && s == record(i as u64) {
                n = i as u64;
            } else {
                assert!(
                    !is_record,
                    "sector {i}: a record after the log ended at {n}, or a torn/wrong one"
                );
            }
        }
        n
    }

    /// The records the console acknowledged, in order (`journal: record N committed`).
    pub fn acked(console: &str) -> Vec<u64> {
        console
            .lines()
            .filter_map(|l| l.strip_prefix("journal: record "))
            .filter_map(|l| l.strip_suffix(" committed"))
            .filter_map(|n| n.parse().ok())
            .collect()
    }
}

/// Plumbing for the tests whose hosts are network namespaces (they run as root).
pub mod netns {
    use std::process::Command;

    /// Runs a command (`args[0]` with the rest as arguments); panics with its stderr if it
    /// fails.
    pub fn sh(args: &[&str]) {
        let o = Command::new(args[0])
            .args(&args[1..])
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
        assert!(
            o.status.success(),
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// Creates namespace `ns`, removing a leftover of that name first.
    pub fn add(ns: &str) {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
        sh(&["ip", "netns", "add", ns]);
    }

    /// Removes namespaces, then links of the root namespace, ignoring any already gone (for
    /// `Drop`).
    pub fn remove<S: AsRef<str>>(namespaces: &[S], links: &[&str]) {
        for ns in namespaces {
            let _ = Command::new("ip")
                .args(["netns", "del", ns.as_ref()])
                .output();
        }
        for l in links {
            let _ = Command::new("ip").args(["link", "del", l]).output();
        }
    }
}
