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
use ftvm_tests::{counter_output, free_udp_port, ftvm_bin, require_kvm, Rng, Side, TempDir};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One pair at a time: two pairs sharing 2 cores could starve heartbeats.
static SERIAL: Mutex<()> = Mutex::new(());

/// How long a cluster must hold protection before the nemesis counts it as protected: over
/// the detection timeout's adaptive maximum (8 × 60 ms) and a report's way to the
/// coordinator.
const STEADY: Duration = Duration::from_secs(1);

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
        Side::parse(&st, role).map(|s| (s.pid, s.protected))
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
        let mut answered = Instant::now();
        while t.elapsed() < Duration::from_secs(60) {
            if self.lines() >= n {
                return false;
            }
            match (self.side("primary"), self.side("secondary")) {
                (Some((_, true)), Some((_, true))) => return true,
                (None, None) => {
                    assert!(
                        answered.elapsed() < Duration::from_secs(5),
                        "neither side of the pair answers for 5 s (the VM is down) at line {}; logs:\n{}",
                        self.lines(),
                        self.logs()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                (Some((_, false)), None) => {
                    let (code, text) = self.ctl("resume");
                    if code != Some(0) && self.lines() < n {
                        // The guest may have ended meanwhile; otherwise say why.
                        eprintln!("ctl resume: {text}");
                    }
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
            answered = Instant::now();
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

/// The acceptance scenario of freezes: ≥ 50 random freezes (0.1–5 s) of the primary or the
/// secondary at random moments of a running counter, protection restored after each; the
/// console holds 1..N exactly once, every time.
#[test]
fn chaos_freezes_of_either_side_at_random_moments_keep_the_console_exact() {
    require_kvm!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = Rng::from_env("chaos_freezes");
    let wanted = ftvm_tests::env_count("FTVM_CHAOS_FREEZES", 50);
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

// ------------------------------------------------------------------------------------------
// The cluster nemesis: a seeded schedule of faults against a whole cluster.

use ftvm_tests::cluster::{Backend, Cluster, NetHosts, NET};
use ftvm_tests::netns::sh;

/// The cluster's datastore on a loop-mounted ext4 file system of its own, so that the
/// schedule can stall it (`fsfreeze`) as a hung NFS server or SAN path would: writes block
/// until it thaws.
struct StallableDatastore {
    mnt: std::path::PathBuf,
    img: std::path::PathBuf,
    _dir: TempDir,
}

impl StallableDatastore {
    fn create() -> Self {
        let dir = TempDir::new("chaos-ds");
        let (img, mnt) = (dir.path("ds.img"), dir.path("mnt"));
        std::fs::create_dir_all(&mnt).unwrap();
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(2 << 30).unwrap();
        let run = |args: &[&str]| {
            let o = Command::new(args[0]).args(&args[1..]).output();
            match o {
                Ok(o) if o.status.success() => {}
                Ok(o) => panic!(
                    "the chaos datastore needs a loop-mounted ext4 (root, /dev/loop-control): `{}` failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stderr)
                ),
                Err(e) => panic!("`{}`: {e} (util-linux, e2fsprogs)", args[0]),
            }
        };
        run(&["mkfs.ext4", "-q", "-F", img.to_str().unwrap()]);
        run(&[
            "mount",
            "-o",
            "loop",
            img.to_str().unwrap(),
            mnt.to_str().unwrap(),
        ]);
        StallableDatastore {
            mnt,
            img,
            _dir: dir,
        }
    }

    /// Blocks every write to the datastore for `d`.
    fn stall(&self, d: Duration) {
        sh(&["fsfreeze", "-f", self.mnt.to_str().unwrap()]);
        std::thread::sleep(d);
        sh(&["fsfreeze", "-u", self.mnt.to_str().unwrap()]);
    }
}

impl Drop for StallableDatastore {
    fn drop(&mut self) {
        let m = self.mnt.to_str().unwrap();
        let _ = Command::new("fsfreeze").args(["-u", m]).output();
        if std::thread::panicking() {
            // A failed run: keep the datastore's logs and state (with the test directory).
            ftvm_tests::copy_small_files(&self.mnt, &self._dir.path("datastore"));
        }
        let _ = Command::new("umount").args(["-l", m]).output();
        let _ = std::fs::remove_file(&self.img);
    }
}

/// One fault of the schedule.
#[derive(Debug, Clone, Copy)]
enum Fault {
    KillVmm,
    FreezeVmm,
    FreezeAgent,
    CrashHost,
    FreezeCoordinator,
    KillCoordinator,
    CutLink { one_way: bool },
    PartitionCoordinator,
    StallDatastore,
}

impl Fault {
    fn pick(rng: &mut Rng) -> Fault {
        match rng.range(0, 100) {
            0..=14 => Fault::KillVmm,
            15..=34 => Fault::FreezeVmm,
            35..=42 => Fault::FreezeAgent,
            43..=50 => Fault::CrashHost,
            51..=57 => Fault::FreezeCoordinator,
            58..=63 => Fault::KillCoordinator,
            64..=71 => Fault::CutLink { one_way: true },
            72..=79 => Fault::CutLink { one_way: false },
            80..=89 => Fault::PartitionCoordinator,
            _ => Fault::StallDatastore,
        }
    }
}

/// The VMs of the chaos cluster and their workloads.
const VMS: [&str; 3] = ["cnt", "jrn", "net"];

struct ChaosCluster {
    // Dropped in this order: processes, then namespaces, then the datastore's mount.
    c: Cluster,
    net: NetHosts,
    ds: StallableDatastore,
}

impl ChaosCluster {
    fn start() -> ChaosCluster {
        let ds = StallableDatastore::create();
        let net = NetHosts::create_with(3, true);
        let state = ds.mnt.join("cluster");
        let c = Cluster::start_in_namespaces_at(
            TempDir::new("chaos-cluster"),
            state,
            &net,
            Backend::File,
        );
        let create = |args: &[&str]| {
            c.ok(&[&["vm", "create"], args, &["--mem-mib", "32", "--ft"]].concat());
        };
        create(&[
            "cnt",
            "--guest",
            "counter",
            "--cmdline",
            "count=100000000 rate=40",
        ]);
        create(&[
            "jrn",
            "--guest",
            "journal",
            "--cmdline",
            "count=100000000 rate=10",
            "--disk-mib",
            "128",
        ]);
        let ip = format!("ip={NET}.2/24 conns=0");
        create(&[
            "net",
            "--guest",
            "netserve",
            "--cmdline",
            &ip,
            "--tap",
            "fttap",
        ]);
        for vm in VMS {
            c.ok(&["vm", "start", vm]);
        }
        let cc = ChaosCluster { c, net, ds };
        cc.wait_protected(120);
        let t = Instant::now();
        while !cc.c.console("net").contains("netserve: listening") {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "netserve never listened"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        cc
    }

    /// Every VM running and protected, every host up, within `secs` — and held so for
    /// [`STEADY`]. The coordinator's view lags a split by a report or two, and the pair
    /// itself needs up to its adaptive detection timeout to notice one, so a single look
    /// right after a fault can see a pair that is already splitting (the next fault then hits
    /// a VM that is not protected). Protected means: the coordinator says so before and after
    /// the window, and over the window each VM kept the same primary and secondary processes
    /// and session, both said protected, and the secondary committed new epochs.
    /// Returns how long until the steady window began, and how many windows failed first.
    fn wait_protected(&self, secs: u64) -> (Duration, u32) {
        let t = Instant::now();
        let mut failed = 0;
        loop {
            let left = Duration::from_secs(secs).saturating_sub(t.elapsed());
            self.c.wait(
                left.as_secs().max(1),
                "every VM protected and every host up",
                Self::all_protected,
            );
            let began = t.elapsed();
            let before: Vec<_> = VMS.iter().map(|vm| self.c.sides(vm)).collect();
            std::thread::sleep(STEADY);
            let after: Vec<_> = VMS.iter().map(|vm| self.c.sides(vm)).collect();
            let held = before.iter().zip(&after).all(|(b, a)| match (b, a) {
                ((Some(p0), Some(s0)), (Some(p1), Some(s1))) => {
                    [p0, s0, p1, s1].iter().all(|x| x.protected)
                        && (p0.pid, s0.pid, p0.sessions) == (p1.pid, s1.pid, p1.sessions)
                        && s1.epoch > s0.epoch
                }
                _ => false,
            });
            if held && Self::all_protected(&self.c.status()) {
                return (began, failed);
            }
            failed += 1;
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "no VM set stayed protected for {STEADY:?} within {secs} s; last window: {before:?} -> {after:?}"
            );
        }
    }

    fn all_protected(status: &str) -> bool {
        VMS.iter()
            .all(|vm| status.contains(&format!("VM {vm}: running, protected")))
            && status.matches(": up").count() == 3
    }

    /// Live ftvm processes of `vm` (their command line names its datastore).
    fn procs_of(&self, vm: &str) -> Vec<u32> {
        let dir = self.c.vm_dir(vm).display().to_string();
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| alive(pid))
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                    args.first().is_some_and(|a| a.ends_with(b"ftvm"))
                        && args
                            .windows(2)
                            .any(|w| w[0] == b"--datastore" && w[1] == dir.as_bytes())
                })
            })
            .collect()
    }

    /// Never two live primaries: with the VM protected, exactly two live processes hold it,
    /// and they are the primary and the secondary the control sockets name.
    fn check_one_primary(&self, vm: &str) {
        let t = Instant::now();
        loop {
            let procs = self.procs_of(vm);
            let (p, s) = (self.c.pid_of(vm, "primary"), self.c.pid_of(vm, "secondary"));
            let mut want: Vec<u32> = [p, s].into_iter().flatten().collect();
            let mut got = procs.clone();
            want.sort_unstable();
            got.sort_unstable();
            if got == want && want.len() == 2 {
                return;
            }
            // A halting loser may linger for a moment.
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "VM {vm}: live processes {procs:?}, but its primary is {p:?} and its secondary {s:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn agent_pid(&self, h: &str) -> u32 {
        self.c.agents.iter().find(|(n, _)| n == h).unwrap().1.id()
    }

    fn host_ip(h: &str) -> String {
        let i: u32 = h.trim_start_matches('h').parse().unwrap();
        format!("{NET}.{}", 10 + i)
    }

    /// Applies one fault (and undoes it: thaw, restart, heal); returns what it did.
    fn apply(&mut self, f: Fault, rng: &mut Rng) -> String {
        let d = Duration::from_millis(rng.range(100, 5000));
        let vm = VMS[rng.range(0, 3) as usize];
        let role = if rng.range(0, 2) == 0 {
            "primary"
        } else {
            "secondary"
        };
        let host = format!("h{}", rng.range(1, 4));
        match f {
            Fault::KillVmm | Fault::FreezeVmm => {
                let Some(pid) = self.c.pid_of(vm, role) else {
                    return format!("{f:?}: no {role} of {vm} answers");
                };
                if let Fault::KillVmm = f {
                    signal(pid, libc::SIGKILL);
                    return format!("killed the {role} of {vm} (pid {pid})");
                }
                signal(pid, libc::SIGSTOP);
                std::thread::sleep(d);
                signal(pid, libc::SIGCONT);
                format!("froze the {role} of {vm} (pid {pid}) for {d:?}")
            }
            Fault::FreezeAgent => {
                let pid = self.agent_pid(&host);
                signal(pid, libc::SIGSTOP);
                std::thread::sleep(d);
                signal(pid, libc::SIGCONT);
                format!("froze the agent of {host} for {d:?}")
            }
            Fault::CrashHost => {
                self.c.kill_host(&host);
                std::thread::sleep(d);
                self.c.start_agent_in(&self.net, &host);
                format!("crashed {host} (agent and its VMMs), back after {d:?}")
            }
            Fault::FreezeCoordinator => {
                let pid = self.c.coordinator.id();
                signal(pid, libc::SIGSTOP);
                std::thread::sleep(d);
                signal(pid, libc::SIGCONT);
                format!("froze the coordinator for {d:?}")
            }
            Fault::KillCoordinator => {
                let _ = self.c.coordinator.kill();
                let _ = self.c.coordinator.wait();
                std::thread::sleep(d);
                self.c.coordinator = Cluster::coordinator_process(
                    &self.c.dir,
                    &self.c.state,
                    &self.c.addr,
                    &self.c.store_args,
                    &[],
                    "coordinator",
                );
                format!("killed the coordinator, restarted after {d:?}")
            }
            Fault::CutLink { one_way } => {
                // Between a VM's primary and secondary hosts.
                let (Some(a), Some(b)) =
                    (self.host_of(vm, "primary"), self.host_of(vm, "secondary"))
                else {
                    return format!("{f:?}: {vm} has no pair");
                };
                let (from, to) = if rng.range(0, 2) == 0 { (a, b) } else { (b, a) };
                let mut cuts = vec![(from.clone(), to.clone())];
                if !one_way {
                    cuts.push((to.clone(), from.clone()));
                }
                for (x, y) in &cuts {
                    let dst = format!("{}/32", Self::host_ip(y));
                    sh(&[
                        "ip",
                        "-n",
                        self.net.ns(x),
                        "route",
                        "add",
                        "blackhole",
                        &dst,
                    ]);
                }
                std::thread::sleep(d);
                for (x, y) in &cuts {
                    let dst = format!("{}/32", Self::host_ip(y));
                    sh(&[
                        "ip",
                        "-n",
                        self.net.ns(x),
                        "route",
                        "del",
                        "blackhole",
                        &dst,
                    ]);
                }
                format!(
                    "cut {from} -> {to}{} (the pair of {vm}) for {d:?}",
                    if one_way { "" } else { " both ways" }
                )
            }
            Fault::PartitionCoordinator => {
                self.net.cut_from_coordinator(&host, true);
                std::thread::sleep(d);
                self.net.cut_from_coordinator(&host, false);
                format!("partitioned {host} from the coordinator for {d:?}")
            }
            Fault::StallDatastore => {
                self.ds.stall(d);
                format!("stalled the datastore for {d:?}")
            }
        }
    }

    fn host_of(&self, vm: &str, role: &str) -> Option<String> {
        let s = self.c.status();
        let line = s.lines().find(|l| l.starts_with(&format!("VM {vm}:")))?;
        let after = line.split(&format!("| {role} ")).nth(1)?;
        let h = after.split_whitespace().next()?;
        (h != "-").then(|| h.to_string())
    }
}

/// A TCP client streaming through the netserve VM's echo, one connection after another,
/// each checked byte for byte, until told to stop.
struct Streams {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The first failure, as soon as it happens (the thread then stops).
    failed: std::sync::Arc<Mutex<Option<String>>>,
    thread: Option<std::thread::JoinHandle<Result<u64, String>>>,
}

impl Streams {
    /// `bridge` and `hosts`: the LAN, for a diagnosis of a hanging stream.
    fn start(dir: std::path::PathBuf, seed: u64, bridge: String, hosts: Vec<String>) -> Streams {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let failed = std::sync::Arc::new(Mutex::new(None));
        let (stop2, failed2) = (stop.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            let mut rng = Rng::new(seed);
            let mut n = 0u64;
            let t0 = Instant::now();
            while !stop2.load(Ordering::SeqCst) {
                let len = rng.range(256 << 10, 2 << 20) as usize;
                let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
                let (input, output, err) = (dir.join("in"), dir.join("out"), dir.join("socat.err"));
                std::fs::write(&input, &data).unwrap();
                let began = t0.elapsed();
                let mut child = Command::new("socat")
                    .args(["-t", "60", "-T", "120", "-", &format!("TCP:{NET}.2:7")])
                    .stdin(std::fs::File::open(&input).unwrap())
                    .stdout(std::fs::File::create(&output).unwrap())
                    .stderr(std::fs::File::create(&err).unwrap())
                    .spawn()
                    .map_err(|e| format!("socat (Debian package socat): {e}"))?;
                // A stream takes well under a second: one still going after 20 s hangs, and
                // the network is looked at while it does (a later fault may mend it).
                let mut diagnosis = None;
                let st = loop {
                    if let Some(st) = child.try_wait().unwrap() {
                        break st;
                    }
                    if diagnosis.is_none() && t0.elapsed() - began > Duration::from_secs(20) {
                        diagnosis = Some(net_diagnosis(&bridge, &hosts));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                };
                let got = std::fs::read(&output).unwrap_or_default();
                if !st.success() || got != data {
                    let e = format!(
                        "TCP stream {n} (started {:.1} s into the streams, ended {:.1} s): socat {st}, {} of {} bytes echoed{}; socat said: {:?}{}",
                        began.as_secs_f64(),
                        t0.elapsed().as_secs_f64(),
                        got.len(),
                        data.len(),
                        if got.len() == data.len() {
                            ", different"
                        } else {
                            ""
                        },
                        std::fs::read_to_string(&err).unwrap_or_default().trim(),
                        diagnosis
                            .map(|d| format!("\nthe network 20 s into the stream:\n{d}"))
                            .unwrap_or_default()
                    );
                    *failed2.lock().unwrap() = Some(e.clone());
                    return Err(e);
                }
                n += 1;
            }
            Ok(n)
        });
        Streams {
            stop,
            failed,
            thread: Some(thread),
        }
    }

    /// The first failed stream, if one has failed yet.
    fn failure(&self) -> Option<String> {
        self.failed.lock().unwrap().clone()
    }

    fn finish(mut self) -> Result<u64, String> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// The nemesis against a whole cluster: three hosts as network namespaces, the datastore on
/// a file system of its own, and three FT VMs — `counter`, `journal` on a disk, and
/// `netserve` echoing a stream of TCP connections from a client namespace — under a seeded
/// schedule of faults: SIGKILL and 0.1–5 s freezes of any ftvm process (primary, secondary,
/// host agent, coordinator), host crashes, FT-link cuts one way and both ways, coordinator
/// partitions and datastore stalls. Before each fault every VM must be protected again with
/// exactly one live primary; at the end the console is exactly 1..N, the journal's disk an
/// intact prefix holding every acknowledged record, and every TCP stream equal.
///
/// `FTVM_CHAOS_FAULTS=N` (default 24, a few minutes; the README's long run used 1000),
/// `FTVM_TEST_SEED`, and `FTVM_CHAOS_ONLY=<fault>` to draw one kind of fault only.
#[test]
fn chaos_cluster_nemesis_keeps_every_workload_exact_and_protection_back() {
    use ftvm_tests::journal::{acked, verify};
    require_kvm!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = Rng::from_env("chaos_cluster");
    let wanted = ftvm_tests::env_count("FTVM_CHAOS_FAULTS", 24);
    // One kind of fault only (its name as printed in the summary, e.g. StallDatastore), for
    // a soak of one mechanism.
    let only = std::env::var("FTVM_CHAOS_ONLY").ok();
    let mut cc = ChaosCluster::start();
    let streams = Streams::start(
        cc.c.dir.0.clone(),
        rng.next_u64(),
        cc.net.bridge.clone(),
        cc.net.hosts.clone(),
    );
    let t_run = Instant::now();
    let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
    // Windows in which protection did not hold although no fault was being applied (a
    // pair split by itself, e.g. a false detection on a loaded host): reported, not hidden.
    let mut unprompted = 0;
    for i in 1..=wanted {
        // Each fault hits a protected cluster: checked again right before it, since a pair
        // may have split during the pause after the last check.
        // A lapse: the coordinator had to be waited for, or a steady window failed.
        let (began, failed) = cc.wait_protected(180);
        if failed > 0 || began > Duration::from_millis(500) {
            unprompted += 1;
            eprintln!("before fault {i}: protection lapsed without a fault (steady after {:.1} s, {failed} failed windows)", began.as_secs_f64());
        }
        let f = loop {
            let f = Fault::pick(&mut rng);
            if only
                .as_ref()
                .is_none_or(|o| format!("{f:?}").starts_with(o.as_str()))
            {
                break f;
            }
        };
        let at = t_run.elapsed();
        let what = cc.apply(f, &mut rng);
        *counts.entry(format!("{f:?}")).or_default() += 1;
        // Said before the wait: a failure below names the fault it followed.
        eprint!("fault {i}/{wanted} at {:.1} s: {what}; ", at.as_secs_f64());
        let (took, _) = cc.wait_protected(180);
        for vm in VMS {
            cc.check_one_primary(vm);
        }
        ftvm_tests::cluster::assert_counter_prefix(&cc.c.console("cnt"));
        let acks = acked(&cc.c.console("jrn"));
        assert!(
            acks.iter().enumerate().all(|(i, n)| *n == i as u64 + 1),
            "the journal's acknowledgements repeat or skip: {:?}",
            &acks[acks.len().saturating_sub(10)..]
        );
        eprintln!("protected again after {:.1} s", took.as_secs_f64());
        // A failed stream stops the run at once, naming the fault it came with.
        if let Some(e) = streams.failure() {
            panic!("by the end of fault {i} ({what}): {e}");
        }
        std::thread::sleep(Duration::from_millis(rng.range(200, 2000)));
    }
    let streams = streams.finish();
    // The end: stop the VMs (the journal's disk then holds still) and check every workload.
    let status = cc.c.status();
    let lines = ftvm_tests::cluster::assert_counter_prefix(&cc.c.console("cnt"));
    let disk_file = status
        .lines()
        .find(|l| l.starts_with("VM jrn:"))
        .and_then(|l| l.split("| disk ").nth(1))
        .and_then(|f| f.split(" |").next())
        .map(|f| f.trim().to_string())
        .unwrap_or_else(|| panic!("no disk in the status: {status}"));
    for vm in VMS {
        cc.c.ok(&["vm", "stop", vm]);
    }
    let t = Instant::now();
    while VMS.iter().any(|vm| !cc.procs_of(vm).is_empty()) {
        assert!(t.elapsed() < Duration::from_secs(30), "VMs did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    let acks = acked(&cc.c.console("jrn"));
    let disk = std::fs::read(cc.c.vm_dir("jrn").join(&disk_file)).unwrap();
    let on_disk = verify(&disk);
    assert!(
        acks.iter().enumerate().all(|(i, n)| *n == i as u64 + 1),
        "journal acknowledgements: {acks:?}"
    );
    assert!(
        on_disk >= acks.len() as u64,
        "the journal's disk holds records 1..{on_disk}, but {} were acknowledged",
        acks.len()
    );
    let streams = streams.unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "{wanted} faults {counts:?}: counter {lines} lines exact, journal {on_disk} records ({} acknowledged), {streams} TCP streams equal; protection lapsed without a fault before {unprompted} of them",
        acks.len()
    );
    assert!(
        lines > 50 && !acks.is_empty() && streams > 0,
        "the workloads made no progress"
    );
}

/// What the network looks like for the `net` VM: where the LAN bridge and each host's bridge
/// send its MAC, each host's tap (carrier, counters: frames the host sent it that nobody
/// read show as TX drops), the client's neighbour entry, and whether a new connection works
/// now (the taps again after it). Taken while a stream hangs, so the state is the broken one.
fn net_diagnosis(bridge: &str, hosts: &[String]) -> String {
    let mac = "02:46:54:56:4d:01";
    let run = |args: &[&str]| match Command::new(args[0]).args(&args[1..]).output() {
        Ok(o) => {
            String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr)
        }
        Err(e) => format!("{args:?}: {e}"),
    };
    let mut s = String::new();
    let with_mac = |text: String| {
        text.lines()
            .filter(|l| l.contains(mac))
            .collect::<Vec<_>>()
            .join("; ")
    };
    s += &format!(
        "LAN bridge {bridge}: {}\n",
        with_mac(run(&["bridge", "fdb", "show", "br", bridge]))
    );
    let taps = |s: &mut String| {
        for (i, ns) in hosts.iter().enumerate() {
            let tap = run(&["ip", "-n", ns, "-s", "link", "show", "fttap"]);
            *s += &format!(
                "h{}: {}\n",
                i + 1,
                tap.split_whitespace().collect::<Vec<_>>().join(" ")
            );
        }
    };
    for (i, ns) in hosts.iter().enumerate() {
        s += &format!(
            "h{} br0: {}\n",
            i + 1,
            with_mac(run(&["bridge", "-n", ns, "fdb", "show", "br", "br0"]))
        );
    }
    taps(&mut s);
    s += &format!(
        "neighbour: {}",
        run(&["ip", "neigh", "show", &format!("{NET}.2")])
    );
    let now = Command::new("timeout")
        .args(["10", "socat", "-T", "5", "-", &format!("TCP:{NET}.2:7")])
        .stdin(Stdio::null())
        .output();
    s += &format!("a new connection now: {:?}\n", now.map(|o| o.status));
    taps(&mut s);
    s
}

/// A TCP connection being opened through `netserve` as its primary freezes (SIGSTOP for
/// 0.2–2 s a few milliseconds after the client's SYN; the secondary takes over, the thawed
/// primary halts): the client's handshake completes with the new primary and the echo is
/// exact. `FTVM_CHAOS_CONNECTS=N` rounds (default 6).
#[test]
fn chaos_connect_across_a_frozen_primary() {
    require_kvm!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = Rng::from_env("chaos_connect");
    let rounds = ftvm_tests::env_count("FTVM_CHAOS_CONNECTS", 6);
    let cc = ChaosCluster::start();
    let dir = cc.c.dir.0.clone();
    for round in 0..rounds {
        cc.wait_protected(180);
        let len = rng.range(1 << 10, 64 << 10) as usize;
        let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        let (input, output) = (dir.join("connect-in"), dir.join("connect-out"));
        std::fs::write(&input, &data).unwrap();
        let pid = cc.c.pid_of("net", "primary").expect("net has a primary");
        let client = Command::new("socat")
            .args(["-t", "30", "-T", "60", "-", &format!("TCP:{NET}.2:7")])
            .stdin(std::fs::File::open(&input).unwrap())
            .stdout(std::fs::File::create(&output).unwrap())
            .stderr(Stdio::piped())
            .spawn()
            .expect("socat (Debian package socat)");
        let after = Duration::from_millis(rng.range(0, 150));
        std::thread::sleep(after);
        let d = Duration::from_millis(rng.range(200, 2000));
        signal(pid, libc::SIGSTOP);
        std::thread::sleep(d);
        signal(pid, libc::SIGCONT);
        let mut client = client;
        let t = Instant::now();
        while client.try_wait().unwrap().is_none() && t.elapsed() < Duration::from_secs(45) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let timed_out = client.try_wait().unwrap().is_none();
        let diagnosis = timed_out.then(|| {
            format!(
                "net's primary on {:?}, secondary on {:?}\n{}",
                cc.host_of("net", "primary"),
                cc.host_of("net", "secondary"),
                net_diagnosis(&cc.net.bridge, &cc.net.hosts)
            )
        });
        let _ = client.kill();
        let o = client.wait_with_output().unwrap();
        let got = std::fs::read(&output).unwrap_or_default();
        assert!(
            o.status.success() && got == data,
            "round {round}: socat connecting {after:?} before net's primary (pid {pid}) froze for {d:?}: {} ({} of {len} bytes echoed; {})\n{}",
            o.status,
            got.len(),
            String::from_utf8_lossy(&o.stderr).trim(),
            diagnosis.unwrap_or_default()
        );
        eprintln!(
            "round {round}: connected {after:?} before the primary froze for {d:?}: {len} bytes echoed after {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
}
