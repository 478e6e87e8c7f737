//! Faults as they happen, on real processes: a protected pair (`ftvm secondary` + `ftvm
//! primary`, both appending to one console file in the datastore) whose processes are frozen
//! with SIGSTOP and thawed with SIGCONT — the primary or the secondary, at random moments,
//! for 0.1–5 s, and the primary in the middle of a pre-copy sync. A pause finds what a kill
//! cannot: a process resuming after someone else took over. After every freeze the pair is
//! brought back to protection (`ftvm ctl resume` when a side was lost) and frozen again; at
//! the end the console must hold 1..N, each exactly once, in order.
//!
//! `FTVM_CHAOS_FREEZES=N` sets how many freezes (default 50; the soak in the README used
//! 500), `FTVM_TEST_SEED` replays a schedule.
use ftvm_tests::{counter_output, ftvm_bin, require_kvm, Rng, TempDir};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One pair at a time: two pairs sharing 2 cores could starve heartbeats.
static SERIAL: Mutex<()> = Mutex::new(());

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A pair's datastore and the processes this test started.
struct Pair {
    dir: TempDir,
    children: Vec<Child>,
}

impl Pair {
    fn ds(&self) -> std::path::PathBuf {
        self.dir.path("ds")
    }

    fn spawn(&mut self, args: &[&str]) -> u32 {
        let ds = self.ds();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path("test-started.log"))
            .unwrap();
        let child = Command::new(ftvm_bin())
            .args(args)
            .arg("--datastore")
            .arg(&ds)
            .arg("--serial-out")
            .arg(ds.join("console.txt"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// A pair running the counter guest (`extra`: more primary arguments).
    fn start(tag: &str, cmdline: &str, extra: &[&str]) -> Pair {
        let mut p = Pair {
            dir: TempDir::new(tag),
            children: Vec::new(),
        };
        std::fs::create_dir_all(p.ds()).unwrap();
        let addr = format!("127.0.0.1:{}", free_udp_port());
        p.spawn(&["secondary", "--listen", &addr]);
        let mut args = vec![
            "primary",
            "--guest",
            "counter",
            "--cmdline",
            cmdline,
            "--peer",
            &addr,
        ];
        args.extend_from_slice(extra);
        p.spawn(&args);
        p
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.ds().join("console.txt")).unwrap_or_default()
    }

    fn lines(&self) -> u64 {
        self.console().lines().count() as u64
    }

    /// `ftvm ctl --datastore DS CMD`: exit code and stdout + stderr.
    fn ctl(&self, cmd: &str) -> (Option<i32>, String) {
        let o = Command::new(ftvm_bin())
            .args(["ctl", "--datastore"])
            .arg(self.ds())
            .arg(cmd)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.code(), text)
    }

    /// The pid of the side answering as `role` (`primary:` / `secondary:` lines of `ctl
    /// status`), and whether it is protected.
    fn side(&self, role: &str) -> Option<(u32, bool)> {
        let (_, st) = self.ctl("status");
        let line = st.lines().find(|l| l.starts_with(&format!("{role}:")))?;
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
        };
        Some((field("pid")?.parse().ok()?, field("protected")? == "true"))
    }

    /// Everything the processes of this pair logged (for failure messages and checks).
    fn logs(&self) -> String {
        let mut s = String::new();
        for f in ["test-started.log", "ds/secondary.log"] {
            s += &std::fs::read_to_string(self.dir.path(f)).unwrap_or_default();
        }
        s
    }

    /// Waits (up to 60 s) until the pair is protected: a primary and a secondary both say
    /// so; a lone primary gets a new secondary (`ftvm ctl resume`) once the old secondary is
    /// gone.
    fn protect(&self, n: u64) -> bool {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            if self.lines() >= n {
                return false;
            }
            match (self.side("primary"), self.side("secondary")) {
                (Some((_, true)), Some((_, true))) => return true,
                (Some((_, false)), None) => {
                    let (code, text) = self.ctl("resume");
                    if code != Some(0) && self.lines() < n {
                        // The guest may have ended meanwhile; otherwise say why.
                        eprintln!("ctl resume: {text}");
                    }
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        panic!(
            "the pair did not become protected within 60 s; logs:\n{}",
            self.logs()
        );
    }

    /// Waits until the guest has printed all `n` lines and no process of the pair is alive
    /// (90 s at most); returns the console.
    fn finish(&mut self, n: u64) -> String {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(90) {
            let done = self.lines() >= n && self.console().ends_with('\n');
            let alive = self.side("primary").is_some() || self.side("secondary").is_some();
            if done && !alive {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for c in &mut self.children {
            let _ = c.try_wait();
        }
        self.console()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // Whatever is still running (a failed test): the processes this test started, and
        // those `ftvm ctl` started.
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for role in ["primary", "secondary"] {
            if let Some((pid, _)) = self.side(role) {
                signal(pid, libc::SIGKILL);
            }
        }
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid of this test's own pair has no memory-safety implications.
    unsafe { libc::kill(pid as i32, sig) };
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(str::to_string))
        })
        .is_some_and(|state| state != "Z" && state != "X")
}

fn freezes_wanted() -> u64 {
    std::env::var("FTVM_CHAOS_FREEZES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

/// The acceptance scenario of freezes: ≥ 50 random freezes (0.1–5 s) of the primary or the
/// secondary at random moments of a running counter, protection restored after each; the
/// console holds 1..N exactly once, every time.
#[test]
fn chaos_freezes_of_either_side_at_random_moments_keep_the_console_exact() {
    require_kvm!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = Rng::from_env("chaos_freezes");
    let wanted = freezes_wanted();
    let (mut done, mut takeovers, mut runs) = (0u64, 0u64, 0u64);
    // Each run is a counter long enough for about ten freezes; runs follow each other until
    // enough freezes were done.
    const N: u64 = 9000;
    const RATE: u64 = 200;
    while done < wanted {
        runs += 1;
        let mut pair = Pair::start("chaos-freeze", &format!("count={N} rate={RATE}"), &[]);
        // Stop freezing ~8 s before the guest ends, so every freeze lands on a running guest
        // and protection can come back.
        while done < wanted && pair.protect(N - 8 * RATE) {
            let primary_side = rng.range(0, 3) < 2;
            let role = if primary_side { "primary" } else { "secondary" };
            let Some((pid, _)) = pair.side(role) else {
                continue;
            };
            let other = pair.side(if primary_side { "secondary" } else { "primary" });
            std::thread::sleep(Duration::from_millis(rng.range(0, 1000)));
            let d = rng.range(100, 5000);
            signal(pid, libc::SIGSTOP);
            std::thread::sleep(Duration::from_millis(d));
            signal(pid, libc::SIGCONT);
            done += 1;
            // Settle: one side may lose (it halts), or the pair may carry on.
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                let lost = !alive(pid) || other.is_some_and(|(o, _)| !alive(o));
                let pair_ok = matches!(
                    (pair.side("primary"), pair.side("secondary")),
                    (Some((_, true)), Some((_, true)))
                );
                if lost || (pair_ok && t.elapsed() > Duration::from_millis(500)) {
                    takeovers += u64::from(!alive(pid) && primary_side);
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!(
                "run {runs} freeze {done}: {role} (pid {pid}) for {d} ms at line {}: {}",
                pair.lines(),
                if !alive(pid) {
                    "it halted"
                } else if other.is_some_and(|(o, _)| !alive(o)) {
                    "the other side halted"
                } else {
                    "the pair carried on"
                }
            );
        }
        let console = pair.finish(N);
        let logs = pair.logs();
        assert!(!logs.contains("panicked"), "a process panicked:\n{logs}");
        assert!(
            console == counter_output(N),
            "run {runs}: console differs after {done} freezes ({} lines); logs:\n{logs}",
            console.lines().count()
        );
    }
    eprintln!("{done} freezes in {runs} runs, {takeovers} takeovers after a frozen primary");
    assert!(
        takeovers * 4 >= done,
        "too few freezes led to a takeover ({takeovers} of {done}): the schedule tests little"
    );
}

/// The primary frozen during the initial sync (a VM protected from boot with 1 GiB of
/// memory, whose secondary takes seconds to back its standby) and again during the pre-copy
/// sync of a re-protection: each time the secondary has nothing committed and gives up, the
/// primary resumes, wins the arbitration and runs on; protection then returns, and the
/// console is exact.
#[test]
fn chaos_freeze_of_the_primary_during_the_pre_copy_sync_keeps_the_console_exact() {
    require_kvm!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    const N: u64 = 3000;
    let mut pair = Pair::start(
        "chaos-sync",
        &format!("count={N} rate=200"),
        &["--mem-mib", "1024"],
    );
    let syncing = |pair: &Pair| -> u32 {
        let t = Instant::now();
        loop {
            let (_, st) = pair.ctl("status");
            if let Some(line) = st
                .lines()
                .find(|l| l.starts_with("primary:") && l.contains("syncing"))
            {
                let pid = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("pid="))
                    .unwrap();
                return pid.parse().unwrap();
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "never saw the primary syncing: {st}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    for (i, what) in ["initial sync", "re-protection's pre-copy sync"]
        .iter()
        .enumerate()
    {
        if i == 1 {
            // A re-protection: `ctl resume` starts a new secondary, which pre-copies the
            // running guest.
            let ds = pair.ds();
            std::thread::spawn(move || {
                let _ = Command::new(ftvm_bin())
                    .args(["ctl", "--datastore"])
                    .arg(ds)
                    .arg("resume")
                    .output();
            });
        }
        let pid = syncing(&pair);
        let before = pair.lines();
        signal(pid, libc::SIGSTOP);
        std::thread::sleep(Duration::from_millis(2500));
        signal(pid, libc::SIGCONT);
        // The secondary gives up; the primary runs on, unprotected.
        let t = Instant::now();
        loop {
            if let (Some((p, false)), None) = (pair.side("primary"), pair.side("secondary")) {
                assert_eq!(p, pid, "the frozen primary must stay the primary");
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "after a freeze in the {what}, the primary did not run on unprotected; logs:\n{}",
                pair.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let t = Instant::now();
        while pair.lines() <= before + 20 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the guest does not run on"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let logs = pair.logs();
        assert!(
            logs.contains("nothing to take over"),
            "the {what}'s secondary should have given up: {logs}"
        );
    }
    // Protection comes back, and the guest ends with an exact console.
    assert!(pair.protect(N), "the pair never became protected again");
    let console = pair.finish(N);
    assert!(
        console == counter_output(N),
        "console differs ({} lines); logs:\n{}",
        console.lines().count(),
        pair.logs()
    );
}
