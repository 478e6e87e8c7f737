//! A protected pair on the real KVM: `ftvm secondary` + `ftvm primary` as real processes on
//! loopback, with a shared datastore directory.
use ftvm_tests::netns::{self, sh};
use ftvm_tests::{counter_output, free_udp_port, ftvm_bin, require_kvm, Rng, TempDir};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// FT tests run one at a time: two pairs sharing 2 cores could starve heartbeats.
static SERIAL: Mutex<()> = Mutex::new(());

/// Waits until the pair is protecting and releasing output (the console has a first line).
fn wait_protected(dir: &TempDir, pair: &mut Pair) {
    let t = Instant::now();
    while console(dir).is_empty() {
        if let Some(st) = pair.primary.try_wait().unwrap() {
            panic!(
                "primary exited early ({st}): {}",
                pair.primary.wait_with_output_ref()
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the pair never released output"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct Pair {
    secondary: Child,
    primary: Child,
    /// The secondary's FT link address.
    addr: String,
}

/// Spawns one side: `cmd` (ftvm, possibly wrapped) with `args`, the pair's datastore and the
/// shared console file.
fn spawn_side(mut cmd: Command, args: &[&str], dir: &TempDir) -> Child {
    let ds = dir.path("ds");
    cmd.args(args)
        .arg("--datastore")
        .arg(&ds)
        .arg("--serial-out")
        .arg(ds.join("console.txt"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn start_pair(dir: &TempDir, guest: &str, cmdline: &str) -> Pair {
    start_pair_with(dir, guest, cmdline, &[])
}

/// A pair whose primary gets `extra` arguments too.
fn start_pair_with(dir: &TempDir, guest: &str, cmdline: &str, extra: &[&str]) -> Pair {
    let addr = format!("127.0.0.1:{}", free_udp_port());
    let secondary = spawn_side(
        Command::new(ftvm_bin()),
        &["secondary", "--listen", &addr],
        dir,
    );
    let primary = spawn_side(
        Command::new(ftvm_bin()),
        &[
            "primary",
            "--guest",
            guest,
            "--cmdline",
            cmdline,
            "--peer",
            &addr,
        ]
        .iter()
        .chain(extra)
        .copied()
        .collect::<Vec<_>>(),
        dir,
    );
    Pair {
        secondary,
        primary,
        addr,
    }
}

fn wait(child: &mut Child, timeout: Duration, what: &str) -> ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if t.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output_ref();
            panic!("{what} did not finish within {timeout:?}: {out}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

trait StderrText {
    fn wait_with_output_ref(&mut self) -> String;
}

impl StderrText for Child {
    fn wait_with_output_ref(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(mut e) = self.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

fn console(dir: &TempDir) -> String {
    std::fs::read_to_string(dir.path("ds").join("console.txt")).unwrap_or_default()
}

/// Runs `ftvm ctl --datastore DIR/ds CMD`: exit code and stdout + stderr.
/// Polls `ftvm ctl status` until it contains `needle` (30 s at most).
fn wait_status(dir: &TempDir, needle: &str) -> String {
    let t = Instant::now();
    loop {
        let (_, st) = ctl(dir, "status");
        if st.contains(needle) {
            return st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "status never showed {needle:?}; last: {st}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ctl(dir: &TempDir, cmd: &str) -> (Option<i32>, String) {
    let o = Command::new(ftvm_bin())
        .args(["ctl", "--datastore"])
        .arg(dir.path("ds"))
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

/// Waits (up to 60 s) until the console holds `n` counter lines' worth of bytes — for runs
/// finished by a secondary this test did not start.
fn wait_console(dir: &TempDir, n: u64) {
    let t = Instant::now();
    while console(dir).len() < counter_output(n).len() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
}

/// Waits (60 s at most) until the console holds a complete line containing `needle`.
fn wait_console_text(dir: &TempDir, needle: &str) {
    let t = Instant::now();
    while !console(dir).lines().any(|l| l.contains(needle)) || !console(dir).ends_with('\n') {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "console never showed {needle:?}: {:?}",
            console(dir)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Both sides end with status 0 (the guest's), as when the guest ends on a healthy pair.
fn assert_both_exit_cleanly(pair: &mut Pair) {
    let p = wait(&mut pair.primary, Duration::from_secs(60), "primary");
    let s = wait(&mut pair.secondary, Duration::from_secs(30), "secondary");
    assert_eq!(
        p.code(),
        Some(0),
        "primary: {}",
        pair.primary.wait_with_output_ref()
    );
    assert_eq!(
        s.code(),
        Some(0),
        "secondary: {}",
        pair.secondary.wait_with_output_ref()
    );
}

#[test]
fn protected_counter_without_failure_prints_everything_once() {
    require_kvm!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("ft-clean");
    let mut pair = start_pair(&dir, "counter", "count=200 rate=0");
    assert_both_exit_cleanly(&mut pair);
    assert_eq!(console(&dir), counter_output(200));
}

/// The continuity scenario: the primary is SIGKILLed at a random moment; the secondary takes
/// over and the shared console file holds 1..N, each exactly once, in order.
#[test]
fn counter_survives_sigkill_of_the_primary_at_20_random_moments() {
    require_kvm!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = Rng::from_env("ft_continuity");
    const N: u64 = 300;
    // FTVM_FT_ROUNDS=200 turns this into the soak run.
    let rounds: u32 = std::env::var("FTVM_FT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let mut took_over = 0;
    for round in 0..rounds {
        let dir = TempDir::new("ft-kill");
        let mut pair = start_pair(&dir, "counter", &format!("count={N} rate=200"));
        wait_protected(&dir, &mut pair);
        let ms = rng.range(0, 1500);
        std::thread::sleep(Duration::from_millis(ms));
        let _ = pair.primary.kill(); // SIGKILL
        let _ = pair.primary.wait();
        let s = wait(&mut pair.secondary, Duration::from_secs(60), "secondary");
        let err = pair.secondary.wait_with_output_ref();
        assert_eq!(
            s.code(),
            Some(0),
            "round {round} (kill at {ms} ms): secondary: {err}"
        );
        assert_eq!(
            console(&dir),
            counter_output(N),
            "round {round}: killed at {ms} ms; secondary: {err}"
        );
        took_over += err.contains("taking over") as u32;
        eprintln!(
            "round {round}: killed {ms} ms into the run: {}",
            err.lines().last().unwrap_or("")
        );
    }
    assert!(
        took_over >= 15,
        "only {took_over} of 20 kills hit a running guest"
    );
}

/// The console of `guest` run without FT (`ftvm run`), which must exit 0.
fn uninterrupted(guest: &str, cmdline: &str) -> String {
    let plain = Command::new(ftvm_bin())
        .args(["run", "--guest", guest, "--cmdline", cmdline])
        .output()
        .unwrap();
    assert_eq!(plain.status.code(), Some(0));
    String::from_utf8_lossy(&plain.stdout).to_string()
}

#[test]
fn dirtier_checksum_after_failover_equals_uninterrupted_run() {
    require_kvm!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cmdline = "mib=16 pages_per_sec=4000 secs=2";
    let expected = uninterrupted("dirtier", cmdline);
    let mut rng = Rng::from_env("ft_dirtier");
    // Both ways of tracking writes (2 MiB chunks, the default, and KVM's dirty log), each
    // with the epoch's pages copied after the pause under write protection (the default)
    // and in the pause, and each with both page encodings (XOR+LZ4 deltas, the default,
    // which skip pages the shadow shows unchanged; raw pages, which with chunks skip pages
    // whose hash is unchanged).
    let modes = [
        ("chunks", "background", "xor-lz4"),
        ("dirty-log", "paused", "raw"),
        ("chunks", "paused", "raw"),
        ("dirty-log", "background", "xor-lz4"),
    ];
    // FTVM_FT_DIRTIER_ROUNDS=N kills N times in each mode (the soak of a memory-heavy guest).
    let repeat: usize = std::env::var("FTVM_FT_DIRTIER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let modes = modes.iter().cycle().take(modes.len() * repeat).copied();
    for (round, (tracking, copy, encoding)) in modes.enumerate() {
        let dir = TempDir::new("ft-dirtier");
        let mut pair = start_pair_with(
            &dir,
            "dirtier",
            cmdline,
            &[
                "--epoch-copy",
                copy,
                "--dirty-tracking",
                tracking,
                "--page-encoding",
                encoding,
            ],
        );
        // The dirtier prints only at the end: wait until the pair says it is protected (the
        // sync backs memory on both sides first), then kill at a random moment.
        wait_status(&dir, "role=primary protected=true");
        let ms = rng.range(0, 1200);
        std::thread::sleep(Duration::from_millis(ms));
        let _ = pair.primary.kill();
        let _ = pair.primary.wait();
        let s = wait(&mut pair.secondary, Duration::from_secs(60), "secondary");
        let err = pair.secondary.wait_with_output_ref();
        assert_eq!(s.code(), Some(0), "round {round}: {err}");
        assert!(
            err.contains("taking over"),
            "round {round}: killed at {ms} ms but no takeover: {err}"
        );
        assert_eq!(
            console(&dir),
            expected,
            "round {round} ({tracking}, {copy}, {encoding}): killed at {ms} ms"
        );
        let primary_err = pair.primary.wait_with_output_ref();
        assert!(
            !primary_err.contains("instead"),
            "round {round}: the copy or the tracking fell back: {primary_err}"
        );
        eprintln!(
            "round {round} ({tracking}, {copy}, {encoding}): killed {ms} ms in: {}",
            err.lines().last().unwrap_or("")
        );
    }
}

/// With the pages copied after the pause, guest writes to pages not copied yet must wait for
/// their copy: a heavy dirtier makes that happen (counted per epoch in `--epoch-stats`), and
/// the pair still ends with the uninterrupted run's checksum and the standby's epochs verified
/// (every epoch's page hash checks on the secondary, which exits 0).
#[test]
fn guest_writes_wait_for_the_background_copy_and_the_pair_stays_exact() {
    require_kvm!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cmdline = "mib=32 pages_per_sec=100000 secs=2";
    let expected = uninterrupted("dirtier", cmdline);
    let dir = TempDir::new("ft-wp");
    let stats = dir.path("epochs.csv");
    let stats_arg = stats.display().to_string();
    let mut pair = start_pair_with(
        &dir,
        "dirtier",
        cmdline,
        &["--epoch-ms", "50", "--epoch-stats", &stats_arg],
    );
    assert_both_exit_cleanly(&mut pair);
    assert_eq!(console(&dir), expected);
    let csv = std::fs::read_to_string(&stats).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (faults, bg) = (col("bg_faults"), col("bg_copy_us"));
    let (pause, throttle) = (col("pause_us"), col("throttle_us"));
    let (mut waited, mut copied_after) = (0u64, 0u64);
    for l in lines {
        let f: Vec<&str> = l.split(',').collect();
        waited += f[faults].parse::<u64>().unwrap();
        copied_after += u64::from(f[bg].parse::<u64>().unwrap() > 0);
        // Waiting for the secondary is part of the pause.
        assert!(
            f[throttle].parse::<u64>().unwrap() <= f[pause].parse::<u64>().unwrap(),
            "{l}"
        );
    }
    assert!(
        copied_after > 0,
        "no epoch was copied after its pause:\n{csv}"
    );
    assert!(waited > 0, "no guest write ever waited for a copy:\n{csv}");
}

/// Two network namespaces joined by a veth pair: the primary's host and the secondary's.
struct Hosts {
    a: String,
    b: String,
    link_a: String,
}

impl Hosts {
    fn new(tag: u32) -> Self {
        let (a, b) = (format!("ftvm-a{tag}"), format!("ftvm-b{tag}"));
        let (va, vb) = (format!("fva{tag}"), format!("fvb{tag}"));
        netns::add(&a);
        netns::add(&b);
        sh(&[
            "ip", "link", "add", &va, "type", "veth", "peer", "name", &vb,
        ]);
        sh(&["ip", "link", "set", &va, "netns", &a]);
        sh(&["ip", "link", "set", &vb, "netns", &b]);
        sh(&["ip", "-n", &a, "addr", "add", "10.231.0.1/24", "dev", &va]);
        sh(&["ip", "-n", &b, "addr", "add", "10.231.0.2/24", "dev", &vb]);
        for (ns, dev) in [(&a, &va), (&b, &vb)] {
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        Hosts { a, b, link_a: va }
    }
    fn cut(&self) {
        sh(&["ip", "-n", &self.a, "link", "set", &self.link_a, "down"]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        netns::remove(&[&self.a, &self.b], &[]);
    }
}

/// No split brain: the FT link is cut while both processes live; exactly one side stays live
/// (the primary, whose datastore heartbeat is fresh, wins the arbitration; the secondary halts),
/// and the console still holds 1..N exactly once. Run with paced output and with output flat
/// out (many short epochs in flight when the link goes, which once lost a line).
#[test]
fn link_cut_leaves_exactly_one_live_side() {
    require_kvm!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (n, rate, cut_after_ms) in [(400u64, 200u64, 300u64), (3000, 0, 150)] {
        link_cut(n, rate, cut_after_ms);
    }
}

fn link_cut(n: u64, rate: u64, cut_after_ms: u64) {
    let hosts = Hosts::new(std::process::id() % 10_000);
    let dir = TempDir::new("ft-cut");
    let in_ns = |ns: &str| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(ftvm_bin());
        c
    };
    let secondary = spawn_side(
        in_ns(&hosts.b),
        &["secondary", "--listen", "10.231.0.2:47100"],
        &dir,
    );
    let cmdline = format!("count={n} rate={rate}");
    let primary = spawn_side(
        in_ns(&hosts.a),
        &[
            "primary",
            "--guest",
            "counter",
            "--cmdline",
            &cmdline,
            "--peer",
            "10.231.0.2:47100",
        ],
        &dir,
    );
    let mut pair = Pair {
        secondary,
        primary,
        addr: "10.231.0.2:47100".into(),
    };
    wait_protected(&dir, &mut pair);
    std::thread::sleep(Duration::from_millis(cut_after_ms));
    hosts.cut();
    let p = wait(&mut pair.primary, Duration::from_secs(60), "primary");
    let s = wait(&mut pair.secondary, Duration::from_secs(60), "secondary");
    let (perr, serr) = (
        pair.primary.wait_with_output_ref(),
        pair.secondary.wait_with_output_ref(),
    );
    let live = [p.code() == Some(0), s.code() == Some(0)];
    assert_eq!(
        live.iter().filter(|l| **l).count(),
        1,
        "primary {p} ({perr}); secondary {s} ({serr})"
    );
    assert_eq!(p.code(), Some(0), "the primary should have won: {perr}");
    assert_eq!(
        s.code(),
        Some(3),
        "the secondary should have halted: {serr}"
    );
    let got = console(&dir);
    if got != counter_output(n) {
        let _ = std::fs::write(std::env::temp_dir().join("ftvm-link-cut-console.txt"), &got);
    }
    assert!(got == counter_output(n), "count={n} rate={rate}: console differs (saved to $TMPDIR/ftvm-link-cut-console.txt); primary: {perr}; secondary: {serr}");
}

/// `ftvm ctl status` and `ftvm ctl test-failover` on a running pair.
#[test]
fn ctl_status_and_test_failover_on_a_running_pair() {
    require_kvm!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("ft-ctl");
    let mut pair = start_pair(&dir, "counter", "count=800 rate=200");
    wait_protected(&dir, &mut pair);
    let (code, text) = ctl(&dir, "status");
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("primary: role=primary protected=true"),
        "{text}"
    );
    assert!(
        text.contains("secondary: role=secondary protected=true"),
        "{text}"
    );
    // The same, typed, for scripts: one JSON object with both sides.
    let o = Command::new(ftvm_bin())
        .args(["ctl", "--datastore"])
        .arg(dir.path("ds"))
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("ctl status --json");
    assert_eq!(j["primary"]["role"], "primary", "{j}");
    assert_eq!(j["primary"]["protected"], true, "{j}");
    assert_eq!(j["secondary"]["role"], "secondary", "{j}");
    assert_eq!(
        j["primary"]["pid"].as_u64(),
        Some(u64::from(pair.primary.id())),
        "{j}"
    );
    // The counter polls the UART's line status once per line: those reads are device inputs,
    // recorded by the primary and committed by the secondary with their epochs.
    let events = |side: &str, text: &str| -> u64 {
        let line = text.lines().find(|l| l.starts_with(side)).unwrap();
        let v = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("events="));
        v.and_then(|v| v.parse().ok()).unwrap_or(0)
    };
    // Committed with the next epoch the secondary acknowledges: ask until it shows.
    let t = Instant::now();
    let mut text = text;
    while events("secondary:", &text) == 0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
        text = ctl(&dir, "status").1;
    }
    assert!(
        events("secondary:", &text) > 0,
        "no events committed: {text}"
    );
    assert!(
        events("primary:", &text) >= events("secondary:", &text),
        "{text}"
    );
    let (code, text) = ctl(&dir, "test-failover");
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("secondary is live after"), "{text}");
    // As vSphere's Test Failover: a new secondary is started, syncs, protection returns.
    assert!(text.contains("protection restored after"), "{text}");
    let p = wait(&mut pair.primary, Duration::from_secs(10), "primary");
    assert_eq!(
        p.code(),
        None,
        "the primary must have died by SIGKILL, not exited: {p}"
    );
    let (_, st) = ctl(&dir, "status");
    assert!(st.contains("primary: role=primary protected=true"), "{st}");
    assert!(
        st.contains("secondary: role=secondary protected=true"),
        "{st}"
    );
    // The roles swapped: the old secondary is the primary now. Fail it too; the newest
    // secondary takes over and the console is still exact.
    let (code, text) = ctl(&dir, "test-failover");
    assert_eq!(code, Some(0), "second failover: {text}");
    let s = wait(&mut pair.secondary, Duration::from_secs(10), "secondary");
    assert_eq!(
        s.code(),
        None,
        "the old secondary (the primary after the first failover) died by SIGKILL: {s}"
    );
    wait_console(&dir, 800);
    assert_eq!(console(&dir), counter_output(800));
    let (code, _) = ctl(&dir, "status");
    assert_eq!(code, Some(1), "no side should answer once the VM has ended");
}

/// `ftvm ctl test-restart-secondary`: the secondary dies, a new one is started, syncs with the
/// running primary and protection returns; a failover onto the new secondary then keeps the
/// console exact.
#[test]
fn test_restart_secondary_restores_protection_for_a_later_failover() {
    require_kvm!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("ft-restart");
    const N: u64 = 1200;
    let mut pair = start_pair(&dir, "counter", &format!("count={N} rate=200"));
    wait_protected(&dir, &mut pair);
    let ds = dir.path("ds");
    let (code, text) = ctl(&dir, "test-restart-secondary");
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("protection restored after"), "{text}");
    let old = wait(
        &mut pair.secondary,
        Duration::from_secs(10),
        "old secondary",
    );
    assert_eq!(
        old.code(),
        None,
        "the old secondary must have died by SIGKILL: {old}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let (code, text) = ctl(&dir, "test-failover");
    assert_eq!(code, Some(0), "{text}");
    let p = wait(&mut pair.primary, Duration::from_secs(10), "primary");
    assert_eq!(p.code(), None, "the primary must have died by SIGKILL: {p}");
    // The new secondary (started by ctl, not by this test) runs the guest to its end.
    wait_console(&dir, N);
    let log = std::fs::read_to_string(ds.join("secondary.log")).unwrap_or_default();
    assert_eq!(console(&dir), counter_output(N), "new secondary log: {log}");
    assert!(
        log.contains("taking over"),
        "the new secondary did not take over: {log}"
    );
}

/// Suspend FT (the secondary exits without taking over, the VM runs on unprotected), Resume FT
/// (a secondary is started again, syncs, protection returns — a failover then keeps the
/// console exact), and Turn Off FT (the secondary's configuration is gone, so resume refuses).
#[test]
fn suspend_resume_and_ft_off_on_a_running_pair() {
    require_kvm!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("ft-suspend");
    const N: u64 = 1600;
    let mut pair = start_pair(&dir, "counter", &format!("count={N} rate=200"));
    wait_protected(&dir, &mut pair);
    let (code, text) = ctl(&dir, "suspend");
    assert_eq!(code, Some(0), "{text}");
    let s = wait(
        &mut pair.secondary,
        Duration::from_secs(10),
        "secondary after suspend",
    );
    assert_eq!(
        s.code(),
        Some(0),
        "the secondary exits cleanly on suspend: {}",
        pair.secondary.wait_with_output_ref()
    );
    let (_, st) = ctl(&dir, "status");
    assert!(st.contains("role=primary protected=false"), "{st}");
    let (code, text) = ctl(&dir, "suspend");
    assert_eq!(
        code,
        Some(1),
        "suspending an unprotected VM is an error: {text}"
    );
    // A secondary that cannot start (its address is taken): resume says so at once, with
    // the secondary's own error, instead of waiting a minute for protection.
    let squatter = std::net::UdpSocket::bind(&pair.addr).unwrap();
    let t = Instant::now();
    let (code, text) = ctl(&dir, "resume");
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("the new secondary exited") && text.contains("in use"),
        "{text}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    drop(squatter);
    std::thread::sleep(Duration::from_millis(300));
    let (code, text) = ctl(&dir, "resume");
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("protection restored after"), "{text}");
    std::thread::sleep(Duration::from_millis(300));
    let (code, text) = ctl(&dir, "test-failover");
    assert_eq!(code, Some(0), "{text}");
    let _ = pair.primary.wait();
    wait_console(&dir, N);
    assert_eq!(
        console(&dir),
        counter_output(N),
        "after suspend, resume and a failover"
    );

    // Turn Off FT on a fresh pair.
    let dir = TempDir::new("ft-off");
    let mut pair = start_pair(&dir, "counter", "count=600 rate=200");
    wait_protected(&dir, &mut pair);
    let ds = dir.path("ds");
    let (code, text) = ctl(&dir, "ft-off");
    assert_eq!(code, Some(0), "{text}");
    let s = wait(
        &mut pair.secondary,
        Duration::from_secs(10),
        "secondary after ft-off",
    );
    assert_eq!(s.code(), Some(0));
    assert!(
        !ds.join("secondary.cmd").exists(),
        "the secondary's configuration is deleted"
    );
    let (code, text) = ctl(&dir, "resume");
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("no secondary is configured"), "{text}");
    let p = wait(&mut pair.primary, Duration::from_secs(60), "primary");
    assert_eq!(p.code(), Some(0));
    assert_eq!(console(&dir), counter_output(600));
}

/// Re-protection syncs the new secondary while the guest runs (pre-copy): the guest is paused
/// only for the last, small round, far fewer pages than the full copy. The standby built that
/// way (with XOR+LZ4 deltas on the link afterwards) then takes over and the dirtier's checksum
/// equals an uninterrupted run's.
#[test]
fn resync_is_precopied_while_the_guest_runs_and_takes_over_exactly() {
    require_kvm!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cmdline = "mib=48 pages_per_sec=3000 secs=6";
    let plain = Command::new(ftvm_bin())
        .args(["run", "--guest", "dirtier", "--cmdline", cmdline])
        .output()
        .unwrap();
    assert_eq!(plain.status.code(), Some(0));
    let expected = String::from_utf8_lossy(&plain.stdout).to_string();
    let dir = TempDir::new("ft-precopy");
    let mut pair = start_pair_with(
        &dir,
        "dirtier",
        cmdline,
        &["--page-encoding", "xor-lz4", "--mem-mib", "128"],
    );
    wait_status(&dir, "protected=true");
    // Let the guest dirty a good part of its working set, then re-protect.
    std::thread::sleep(Duration::from_millis(2500));
    let (code, text) = ctl(&dir, "test-restart-secondary");
    assert_eq!(code, Some(0), "{text}");
    let _ = wait(
        &mut pair.secondary,
        Duration::from_secs(10),
        "old secondary",
    );
    std::thread::sleep(Duration::from_millis(700));
    let (code, text) = ctl(&dir, "test-failover");
    assert_eq!(code, Some(0), "{text}");
    let _ = wait(&mut pair.primary, Duration::from_secs(10), "primary");
    let err = pair.primary.wait_with_output_ref();
    wait_console_text(&dir, "checksum=");
    assert_eq!(console(&dir), expected, "primary: {err}");
    // The second sync line is the re-protection's.
    let sync = err
        .lines()
        .filter(|l| l.contains("secondary synced"))
        .nth(1)
        .unwrap_or_else(|| panic!("no re-sync reported: {err}"));
    let num = |after: &str, before: &str| -> u64 {
        let i = sync.find(after).unwrap() + after.len();
        let j = i + sync[i..].find(before).unwrap();
        sync[i..j].trim().parse().unwrap()
    };
    eprintln!("{sync}");
    let sent_running = num("rounds sent", "pages while");
    let sent_paused = num("then", "pages with");
    assert!(
        sent_running > 4000 && sent_paused * 4 < sent_running,
        "pre-copy should move most pages while the guest runs: {sync}"
    );
}

/// The UDP ports of `pid`'s sockets (from its fds and /proc/net/udp).
fn udp_ports_of(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().to_string();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/udp")).unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let port = u16::from_str_radix(f.get(1)?.split(':').nth(1)?, 16).ok()?;
            inodes.contains(&f.get(9)?.to_string()).then_some(port)
        })
        .collect()
}

/// Garbage datagrams at both ends of a running pair's FT link (the secondary's listening
/// port and the primary's own socket): neither side crashes or loses protection, and the
/// console is exact.
#[test]
fn garbage_on_the_ft_ports_of_a_running_pair_changes_nothing() {
    require_kvm!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("ft-garbage");
    const N: u64 = 400;
    let mut pair = start_pair(&dir, "counter", &format!("count={N} rate=200"));
    wait_protected(&dir, &mut pair);
    let primary_ports = udp_ports_of(pair.primary.id());
    assert!(
        !primary_ports.is_empty(),
        "cannot find the primary's FT socket"
    );
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut rng = Rng::from_env("ft_garbage");
    let mut targets: Vec<String> = primary_ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    targets.push(pair.addr.clone());
    for i in 0..3000u32 {
        let len = rng.range(1, 1400) as usize;
        let mut d: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        if i % 3 == 0 {
            d[0] |= 0xc0; // looks like a QUIC long header (an Initial or a handshake)
        }
        let _ = sock.send_to(&d, &targets[i as usize % targets.len()]);
        if i % 100 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let (_, st) = ctl(&dir, "status");
    assert!(st.contains("protected=true"), "{st}");
    assert_both_exit_cleanly(&mut pair);
    assert_eq!(console(&dir), counter_output(N));
}

/// The `journal` guest on a replicated disk (each side its own copy), the primary killed at
/// random moments: the new primary's disk holds every record exactly once with none torn,
/// every record the console acknowledged is on it, and the console acknowledges each record
/// once. The primary's disk starts with 30 records (copied to the secondary by the sync), and
/// the secondary's copy starts as a short file of junk (emptied, resized and filled).
#[test]
fn journal_on_a_replicated_disk_survives_random_primary_kills() {
    use ftvm_tests::journal::{acked, record, verify};
    require_kvm!();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = Rng::from_env("ft_journal");
    const PRE: u64 = 30;
    const N: u64 = 150;
    let mut took_over = 0;
    for round in 0..6 {
        let dir = TempDir::new("ft-journal");
        let (p_img, s_img) = (dir.path("p.img"), dir.path("s.img"));
        // 4 MiB: the sync skips the three all-zero 1 MiB chunks, which the secondary's copy
        // (junk to start with) must then hold as zeros.
        let mut disk = vec![0u8; 4 << 20];
        for i in 1..=PRE {
            disk[i as usize * 512..(i as usize + 1) * 512].copy_from_slice(&record(i));
        }
        std::fs::write(&p_img, &disk).unwrap();
        std::fs::write(&s_img, vec![0xa5u8; 4096]).unwrap();
        let addr = format!("127.0.0.1:{}", free_udp_port());
        let (p, s) = (p_img.to_str().unwrap(), s_img.to_str().unwrap());
        let secondary = spawn_side(
            Command::new(ftvm_bin()),
            &["secondary", "--listen", &addr, "--disk", s],
            &dir,
        );
        let cmdline = format!("count={N} rate=200");
        let primary = spawn_side(
            Command::new(ftvm_bin()),
            &[
                "primary",
                "--guest",
                "journal",
                "--cmdline",
                &cmdline,
                "--peer",
                &addr,
                "--disk",
                p,
            ],
            &dir,
        );
        let mut pair = Pair {
            secondary,
            primary,
            addr,
        };
        wait_protected(&dir, &mut pair);
        // Round 0 runs to the end unharmed: then both copies are identical.
        let ms = rng.range(0, 700);
        if round > 0 {
            std::thread::sleep(Duration::from_millis(ms));
            let _ = pair.primary.kill(); // SIGKILL
            let _ = pair.primary.wait();
        } else {
            let st = wait(&mut pair.primary, Duration::from_secs(60), "primary");
            assert_eq!(
                st.code(),
                Some(0),
                "{}",
                pair.primary.wait_with_output_ref()
            );
        }
        let st = wait(&mut pair.secondary, Duration::from_secs(60), "secondary");
        let err = pair.secondary.wait_with_output_ref();
        assert_eq!(st.code(), Some(0), "round {round} (kill at {ms} ms): {err}");
        took_over += usize::from(err.contains("taking over"));
        let text = console(&dir);
        assert_eq!(
            acked(&text),
            (PRE + 1..=PRE + N).collect::<Vec<_>>(),
            "round {round} (kill at {ms} ms): every record acknowledged once:\n{text}"
        );
        assert!(
            text.ends_with(&format!("journal: last={}\n", PRE + N)),
            "{text}"
        );
        assert_eq!(
            verify(&std::fs::read(&s_img).unwrap()),
            PRE + N,
            "round {round}: the surviving disk holds every record once"
        );
        assert_eq!(std::fs::metadata(&s_img).unwrap().len(), 4 << 20);
        if round == 0 {
            assert!(
                std::fs::read(&s_img).unwrap() == std::fs::read(&p_img).unwrap(),
                "without a failure the secondary's disk copy equals the primary's"
            );
        }
    }
    assert!(
        took_over >= 3,
        "only {took_over} of 5 kills landed before the guest ended"
    );
}
