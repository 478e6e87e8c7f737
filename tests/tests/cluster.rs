//! The failover coordinator end to end: a real `ftvm coordinator` and `ftvm host-agent`
//! processes (hosts on loopback sharing one datastore directory), real FT pairs under them.
use ftvm_tests::cluster::{free_loopback_addr, Backend, Cluster, NetHosts, NET};
use ftvm_tests::{ftvm_bin, require_kvm, TempDir};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The cluster tests each run several VMMs: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn create_ft_counter(c: &Cluster, vm: &str) {
    c.create_ft_counter(vm);
}

fn limits_are_enforced_with_messages_naming_them(b: Backend) {
    let c = Cluster::start(
        "cl-limits",
        &["h1"],
        &["--max-secondaries-per-host", "1"],
        b,
    );
    let err = c.refused(&[
        "vm", "create", "big", "--guest", "counter", "--vcpus", "9", "--ft",
    ]);
    assert!(err.contains("1 to 8 vCPUs"), "{err}");
    // One host: nowhere to put a secondary.
    c.ok(&["vm", "create", "a", "--guest", "counter", "--mem-mib", "32"]);
    let err = c.refused(&["ft", "on", "a"]);
    assert!(err.contains("h1 runs the primary"), "{err}");
    drop(c);
    // Two hosts, one secondary each at most: the third FT VM's secondary has no room.
    let mut c = Cluster::start(
        "cl-limits2",
        &["h1"],
        &["--max-secondaries-per-host", "1"],
        b,
    );
    c.add_host("h2");
    c.wait(10, "two hosts", |s| s.matches(": up").count() == 2);
    create_ft_counter(&c, "a");
    create_ft_counter(&c, "b");
    c.ok(&["vm", "create", "c", "--guest", "counter", "--mem-mib", "32"]);
    let err = c.refused(&["ft", "on", "c"]);
    assert!(err.contains("limit 1 per host"), "{err}");
    assert!(err.contains("h1") && err.contains("h2"), "{err}");
    let st = c.status();
    assert!(st.contains("host h1: up | 1 secondaries (limit 1)"), "{st}");
    assert!(st.contains("host h2: up | 1 secondaries (limit 1)"), "{st}");
}

/// A host failure takes the primary's host down (agent and VMMs killed at once): the
/// secondary takes over by itself, the coordinator places a new secondary on the remaining
/// host, protection returns, and the console stays exact. Then the secondary's host dies:
/// a new secondary is placed again once a host is back.
fn host_failures_fail_over_and_protection_is_restored(b: Backend) {
    let mut c = Cluster::start("cl-hostfail", &["h1", "h2", "h3"], &[], b);
    create_ft_counter(&c, "web");
    let p = c.host_of("web", "primary");
    let s = c.host_of("web", "secondary");
    std::thread::sleep(Duration::from_millis(500));
    c.kill_host(&p);
    let st = c.wait(30, "failover and re-protection", |st| {
        st.contains("VM web: running, protected") && st.contains(&format!("| primary {s} "))
    });
    assert!(st.contains(&format!("last failover {p} -> {s}")), "{st}");
    assert!(st.contains(&format!("host {p}: DOWN")), "{st}");
    let s2 = c.host_of("web", "secondary");
    assert!(s2 != p && s2 != s, "{st}");
    // Now the secondary's host dies; with no other host up, the VM runs unprotected ...
    c.kill_host(&s2);
    let st = c.wait(30, "not protected", |st| {
        st.contains("VM web: running, not protected")
    });
    assert!(
        st.contains("is down"),
        "the reason names the down hosts: {st}"
    );
    // ... until a host comes back.
    c.add_host("h4");
    c.wait(60, "protection on h4", |st| {
        st.contains("VM web: running, protected") && st.contains("| secondary h4 ")
    });
    c.assert_console_exact("web", 50);
}

/// The vSphere operations through the coordinator: Test Failover, Test Restart Secondary,
/// Migrate Secondary, Suspend/Resume and Turn Off FT, with the console exact throughout.
fn ft_operations_through_the_coordinator(b: Backend) {
    let c = Cluster::start("cl-ops", &["h1", "h2", "h3"], &[], b);
    create_ft_counter(&c, "db");
    let out = c.ok(&["ft", "test-failover", "db"]);
    for step in ["detected", "won the arbitration", "is live", "re-protected"] {
        assert!(out.contains(step), "{out}");
    }
    // The history says what happened, who asked, and why the secondary took over.
    let json = c.ok(&["events", "--vm", "db", "--json"]);
    let events: Vec<serde_json::Value> = json
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    let asked = events
        .iter()
        .find(|e| e["kind"] == "api.ft-test-failover")
        .unwrap_or_else(|| panic!("no audit event of the Test Failover: {kinds:?}"));
    assert_eq!(asked["actor"], "admin", "{asked}");
    let fo = events
        .iter()
        .find(|e| e["kind"] == "vm.failover")
        .unwrap_or_else(|| panic!("no failover event: {kinds:?}"));
    assert_eq!(fo["severity"], "warning", "{fo}");
    assert_eq!(fo["cause"], "Test Failover", "{fo}");
    assert_eq!(fo["actor"], "system", "{fo}");
    let evidence = fo["details"]["takeover"]["evidence"]
        .as_str()
        .unwrap_or_default();
    assert!(
        evidence.contains("primary lost") && evidence.contains("arbitration: won"),
        "the failover event carries the pair's evidence: {fo}"
    );
    assert!(fo["details"]["live_after_ms"].as_u64().is_some(), "{fo}");
    assert!(
        asked["seq"].as_u64() < fo["seq"].as_u64(),
        "in order: {kinds:?}"
    );
    assert!(
        events.iter().any(|e| e["kind"] == "vm.protected"
            && e["details"]["after_failover"]["protected_after_ms"]
                .as_u64()
                .is_some()),
        "protection restored, with the time it took: {kinds:?}"
    );
    let text = c.ok(&["events", "--vm", "db", "--since", "10m"]);
    assert!(
        text.lines()
            .any(|l| l.contains("vm.failover") && l.contains("vm db")),
        "{text}"
    );
    // Machine-readable state for scripts.
    let json = |args: &[&str]| -> serde_json::Value {
        let o = c.ftvm(args);
        assert!(o.status.success(), "{args:?}: {o:?}");
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {o:?}"))
    };
    let st = json(&["status", "--json"]);
    let vm = &st["vms"][0];
    assert_eq!(vm["vm"]["name"], "db", "{st}");
    assert_eq!(vm["primary_status"]["role"], "primary", "{st}");
    assert_eq!(vm["primary_status"]["protected"], true, "{st}");
    assert!(st["hosts"]["h1"]["name"] == "h1", "{st}");
    let list = json(&["vm", "list", "--json"]);
    assert_eq!(list["vms"][0]["name"], "db", "{list}");
    let tokens = json(&["token", "list", "--json"]);
    assert!(
        tokens
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["name"] == "admin")),
        "{tokens}"
    );
    let st = c.ok(&["status", "db"]);
    assert!(
        st.contains("failover at "),
        "ftvm status NAME shows the last failovers: {st}"
    );
    // A bad time is refused where it is given (usage error), before any call.
    let o = c.ftvm(&["events", "--since", "yesterday-ish"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("neither an age"), "{err}");
    let out = c.ok(&["ft", "test-restart-secondary", "db"]);
    assert!(out.contains("re-protected"), "{out}");
    let p = c.host_of("db", "primary");
    let s = c.host_of("db", "secondary");
    let to = ["h1", "h2", "h3"]
        .into_iter()
        .find(|h| *h != p && *h != s)
        .unwrap();
    let err = c.refused(&["ft", "migrate-secondary", "db", "--to", &p]);
    assert!(err.contains("runs the primary"), "{err}");
    c.ok(&["ft", "migrate-secondary", "db", "--to", to]);
    c.wait(30, "migrated", |st| {
        st.contains("VM db: running, protected") && st.contains(&format!("| secondary {to} "))
    });
    c.ok(&["ft", "suspend", "db"]);
    c.wait(10, "suspended", |st| {
        st.contains("VM db: running, FT suspended")
    });
    c.ok(&["ft", "resume", "db"]);
    c.wait(30, "resumed", |st| st.contains("VM db: running, protected"));
    c.ok(&["ft", "off", "db"]);
    c.wait(10, "off", |st| st.contains("VM db: running, FT off"));
    c.assert_console_exact("db", 100);
}

/// A restarted host agent (a crash of the agent alone, a systemd restart, an upgrade) leaves
/// its host's VMs running: its VMMs run in process groups of their own, and the new agent re-adopts
/// them from its process list. The VM stays protected by the same pair, with no failover, and
/// the adopted processes are still the agent's: a killed adopted primary fails over as usual.
fn an_agent_restart_keeps_its_vms_running(b: Backend) {
    let mut c = Cluster::start("cl-adopt", &["h1", "h2", "h3"], &[], b);
    create_ft_counter(&c, "db");
    let p = c.host_of("db", "primary");
    let (before_p, before_s) = c.sides("db");
    let (before_p, before_s) = (before_p.unwrap(), before_s.unwrap());
    c.kill_agent(&p);
    std::thread::sleep(Duration::from_millis(1500));
    let (mid_p, _) = c.sides("db");
    assert_eq!(
        mid_p.map(|s| s.pid),
        Some(before_p.pid),
        "the primary must run on without its agent"
    );
    c.add_host(&p);
    c.wait(30, "the host back", |st| {
        st.contains(&format!("host {p}: up"))
    });
    // A few reports from the new agent.
    std::thread::sleep(Duration::from_secs(2));
    let st = c.status();
    assert!(st.contains("VM db: running, protected"), "{st}");
    let (after_p, after_s) = c.sides("db");
    let (after_p, after_s) = (after_p.unwrap(), after_s.unwrap());
    assert_eq!(
        (after_p.pid, after_s.pid, after_p.sessions),
        (before_p.pid, before_s.pid, before_p.sessions),
        "the same pair, no new protection session"
    );
    assert!(after_p.epoch > before_p.epoch, "replication went on");
    let events = c.ok(&["events", "--vm", "db"]);
    assert!(!events.contains("vm.failover"), "no failover: {events}");
    let log = std::fs::read_to_string(c.dir.path(&format!("agent-{p}.log"))).unwrap();
    assert!(log.contains("re-adopted process"), "{log}");
    // Still the agent's: the primary killed, the secondary takes over, a new one is placed.
    // SAFETY: SIGKILL to the VM's primary.
    unsafe { libc::kill(before_p.pid as i32, libc::SIGKILL) };
    c.wait(60, "failed over and protected again", |st| {
        st.contains("VM db: running, protected") && !st.contains(&format!("| primary {p} "))
    });
    c.assert_console_exact("db", 50);
}

/// ftvm's own failure is reported as such, not as the guest's exit code: a VM whose kernel
/// was removed after it was defined fails to start, and its status and events say why.
#[test]
fn an_ftvm_failure_is_not_a_guest_exit_code() {
    require_kvm!();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start("cl-fail", &["h1"], &[], Backend::File);
    let kernel = c.dir.path("kernel.elf");
    let elf = ftvm_bin().parent().unwrap().join("guests/counter.elf");
    std::fs::copy(&elf, &kernel).unwrap_or_else(|e| panic!("{}: {e}", elf.display()));
    let k = kernel.display().to_string();
    c.ok(&[
        "vm",
        "create",
        "k",
        "--kernel",
        &k,
        "--cmdline",
        "count=5 rate=0",
        "--mem-mib",
        "32",
    ]);
    std::fs::remove_file(&kernel).unwrap();
    c.ok(&["vm", "start", "k"]);
    let st = c.wait(30, "the failure reported", |s| {
        s.contains("VM k: failed (ftvm: ")
    });
    assert!(st.contains("kernel"), "the failure names its cause: {st}");
    assert!(!st.contains("VM k: ended (exit"), "{st}");
    let events = c.ok(&["events", "--vm", "k"]);
    assert!(
        events
            .lines()
            .any(|l| l.contains("vm.failed") && l.contains("error")),
        "{events}"
    );
}

#[test]
fn demo_runs_and_checks_its_console() {
    require_kvm!();
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = TempDir::new("cl-demo");
    let t = Instant::now();
    let o = Command::new(ftvm_bin())
        .args(["demo", "--dir"])
        .arg(dir.path("demo"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for step in [
        "Test Failover",
        "is live",
        "re-protected",
        "every line exactly once",
    ] {
        assert!(out.contains(step), "{out}");
    }
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "the demo took {:?}",
        t.elapsed()
    );
}

/// vSphere HA's failure kinds with hosts as network namespaces: a host **isolated** (its link
/// down, still running), a host **partitioned** from the coordinator (it still reaches its
/// peers), a **frozen primary** while its secondary's host is partitioned, and a host
/// **failed** (everything on it killed). Each ends with exactly one live primary, the console
/// exact, and protection back.
fn isolation_and_partition_in_namespaces_never_make_two_primaries(b: Backend) {
    let net = NetHosts::create(3);
    let c = Cluster::start_in_namespaces("cl-netns", &net, b);
    create_ft_counter(&c, "app");
    // 1. The primary's host is isolated for 3 s.
    let p = c.host_of("app", "primary");
    net.isolate(&p, true);
    std::thread::sleep(Duration::from_secs(3));
    // Isolated, not failed: its agent still writes the datastore heartbeat.
    let st = c.status();
    assert!(st.contains(&format!("host {p}: UNREACHABLE")), "{st}");
    // The pair was cut: exactly one side lost the arbitration and halted.
    assert_eq!(
        c.proc_logs_with("app", "halting"),
        1,
        "exactly one side halts when the primary's host is isolated"
    );
    net.isolate(&p, false);
    c.wait(60, "protection after the isolation", |s| {
        s.contains("VM app: running, protected")
    });
    // 2. The secondary's host loses the coordinator (not its peers) for 3 s: partitioned, not
    // failed (its datastore heartbeat goes on), and its primary still reaches it, so the
    // coordinator keeps that secondary: no respawn, protected throughout.
    let s = c.host_of("app", "secondary");
    net.cut_from_coordinator(&s, true);
    c.wait(10, "the coordinator sees the host unreachable", |st| {
        st.contains(&format!("host {s}: UNREACHABLE"))
    });
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        let st = c.status();
        assert!(
            st.contains("VM app: running, protected") && st.contains(&format!("| secondary {s} ")),
            "a partitioned host's secondary that the primary still reaches is kept: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    net.cut_from_coordinator(&s, false);
    c.wait(60, "protection after the partition", |st| {
        st.contains("VM app: running, protected") && st.matches(": up").count() == 3
    });
    assert_eq!(
        c.proc_logs_with("app", "halting"),
        1,
        "no other side halted"
    );
    // 3. The secondary's host is cut from the coordinator, then its primary freezes (SIGSTOP,
    // 2 s): the secondary takes over where the coordinator cannot see it. The coordinator
    // cannot tell a frozen primary from a dead one, so it keeps that secondary (giving it up
    // stopped the VM's live primary once the partition healed: found by the chaos soak), and
    // records the failover once it hears from the host again.
    let (p, s) = (c.host_of("app", "primary"), c.host_of("app", "secondary"));
    net.cut_from_coordinator(&s, true);
    c.wait(10, "the coordinator sees the host unreachable", |st| {
        st.contains(&format!("host {s}: UNREACHABLE"))
    });
    let pid = c.pid_of("app", "primary").expect("the primary answers") as i32;
    // SAFETY: kill(2) on this test's own VMM.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    std::thread::sleep(Duration::from_secs(2));
    unsafe { libc::kill(pid, libc::SIGCONT) };
    std::thread::sleep(Duration::from_secs(1));
    net.cut_from_coordinator(&s, false);
    let st = c.wait(60, "the failover recorded and protection back", |st| {
        st.contains("VM app: running, protected")
            && st.contains(&format!("| primary {s} "))
            && st.matches(": up").count() == 3
    });
    assert!(st.contains(&format!("last failover {p} -> {s}")), "{st}");
    assert_eq!(
        c.proc_logs_with("app", "halting"),
        2,
        "the thawed primary halted, nothing else did"
    );
    // 4. The primary's host fails (agent and VMMs killed at once): takeover, re-protection on
    // the remaining host.
    let p = c.host_of("app", "primary");
    let s = c.host_of("app", "secondary");
    let mut c = c;
    c.kill_host(&p);
    c.wait(60, "failover and protection after the host failure", |st| {
        st.contains("VM app: running, protected") && st.contains(&format!("| primary {s} "))
    });
    c.assert_console_exact("app", 300);
}

/// A second coordinator on the same store waits as a standby (it does not even listen) and
/// takes over the cluster when the first dies: hosts, VMs and placements carry over, nothing
/// is restarted, and FT operations work through it.
fn a_standby_coordinator_takes_over_the_cluster(b: Backend) {
    let standby = free_loopback_addr();
    let mut c = Cluster::start_with("cl-standby", &["h1", "h2", "h3"], &[], b, &[&standby]);
    create_ft_counter(&c, "svc");
    let mut second =
        Cluster::coordinator_process(&c.dir, &c.state, &standby, &c.store_args, &[], "standby");
    let t = Instant::now();
    loop {
        let log = std::fs::read_to_string(c.dir.path("standby.log")).unwrap_or_default();
        if log.contains("standby:") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "standby log: {log}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        std::net::TcpStream::connect(&standby).is_err(),
        "a standby must not serve while another coordinator leads"
    );
    let (p, s) = (c.host_of("svc", "primary"), c.host_of("svc", "secondary"));
    c.coordinator.kill().unwrap();
    c.coordinator.wait().unwrap();
    std::mem::swap(&mut c.coordinator, &mut second);
    let _ = second.wait();
    // (etcd: up to the lease TTL before the standby leads.)
    let st = c.wait(30, "the standby leads with the cluster intact", |st| {
        st.contains("VM svc: running, protected") && st.matches(": up").count() == 3
    });
    assert!(
        st.contains(&format!("| primary {p} ")) && st.contains(&format!("| secondary {s} ")),
        "placements carried over unchanged: {st}"
    );
    let out = c.ok(&["ft", "test-failover", "svc"]);
    assert!(out.contains("re-protected"), "{out}");
    c.assert_console_exact("svc", 50);
}

/// FT turned on for a VM started without it (vSphere allows that): the VM runs as a primary
/// with no secondary and no write tracking; `ft on` places a secondary, which pre-copies the
/// running guest; then Test Failover. Also: a kernel-image VM gets its initrd, and paths
/// relative to the CLI's directory reach the hosts as absolute paths.
fn ft_on_for_a_running_vm_and_kernel_vms_with_initrd(b: Backend) {
    let c = Cluster::start("cl-fton", &["h1", "h2"], &[], b);
    c.ok(&[
        "vm",
        "create",
        "late",
        "--guest",
        "counter",
        "--cmdline",
        "count=1000000 rate=100",
        "--mem-mib",
        "32",
    ]);
    c.ok(&["vm", "start", "late"]);
    c.wait(10, "running without FT", |s| {
        s.contains("VM late: running, FT off")
    });
    std::thread::sleep(Duration::from_millis(500));
    c.ok(&["ft", "on", "late"]);
    c.wait(60, "protected", |s| {
        s.contains("VM late: running, protected")
    });
    let out = c.ok(&["ft", "test-failover", "late"]);
    assert!(out.contains("re-protected"), "{out}");
    c.assert_console_exact("late", 50);

    // A kernel image with an initrd, both given relative to the CLI's directory.
    let elf = ftvm_bin().parent().unwrap().join("guests/counter.elf");
    std::fs::copy(&elf, c.dir.path("k.elf")).unwrap();
    std::fs::write(c.dir.path("rd.img"), vec![0x5a; 100_000]).unwrap();
    c.ok(&[
        "vm",
        "create",
        "kern",
        "--kernel",
        "k.elf",
        "--initrd",
        "rd.img",
        "--cmdline",
        "count=20 rate=0",
        "--mem-mib",
        "32",
    ]);
    c.ok(&["vm", "start", "kern"]);
    c.wait(30, "the kernel VM ran to its end", |s| {
        s.contains("VM kern: ended (exit 0)")
    });
    assert_eq!(c.console("kern"), ftvm_tests::counter_output(20));
    // An ended VM has nothing to protect: FT operations on it are refused at once.
    for op in ["on", "test-failover"] {
        let err = c.refused(&["ft", op, "kern"]);
        assert!(err.contains("VM kern has ended (guest exit 0)"), "{err}");
    }
    // A missing initrd is refused where it is given, not found later in a process log.
    let missing = c.dir.path("missing.img").display().to_string();
    let err = c.refused(&[
        "vm",
        "create",
        "nord",
        "--kernel",
        "k.elf",
        "--initrd",
        "missing.img",
    ]);
    assert!(
        err.contains(&format!("cannot read initrd {missing}")),
        "{err}"
    );
    assert!(!c.ok(&["vm", "list"]).contains("nord"));
}

/// A cluster VM with a disk: the `journal` guest under FT, Test Failover mid-run. Each
/// process has its own disk copy in the VM's datastore; after the failover the VM runs on the
/// secondary's copy (status names it), which ends with every record, each acknowledged once.
fn journal_vm_with_a_disk_survives_test_failover(b: Backend) {
    use ftvm_tests::journal::{acked, verify};
    let c = Cluster::start("cl-disk", &["h1", "h2", "h3"], &[], b);
    c.ok(&[
        "vm",
        "create",
        "jr",
        "--guest",
        "journal",
        "--cmdline",
        "count=400 rate=200",
        "--mem-mib",
        "32",
        "--disk-mib",
        "1",
        "--ft",
    ]);
    c.ok(&["vm", "start", "jr"]);
    let disk_of = |st: &str| {
        st.lines()
            .find(|l| l.starts_with("VM jr:"))
            .and_then(|l| l.split("| disk ").nth(1))
            .and_then(|f| f.split(" |").next())
            .map(|f| f.trim().to_string())
            .unwrap_or_else(|| panic!("no disk in the status: {st}"))
    };
    let st = c.wait(60, "protection", |s| {
        s.contains("VM jr: running, protected")
    });
    let first = disk_of(&st);
    let out = c.ok(&["ft", "test-failover", "jr"]);
    assert!(out.contains("re-protected"), "{out}");
    let st = c.wait(60, "the guest's end", |s| {
        s.contains("VM jr: ended (exit 0)")
    });
    let last = disk_of(&st);
    assert_ne!(
        first, last,
        "after the failover the VM runs on the secondary's copy"
    );
    let text = c.console("jr");
    assert_eq!(acked(&text), (1..=400).collect::<Vec<_>>(), "{text}");
    let vm_dir = c.vm_dir("jr");
    let disk = std::fs::read(vm_dir.join(&last)).unwrap_or_else(|e| {
        let files: Vec<_> = std::fs::read_dir(&vm_dir)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        panic!(
            "{last}: {e}; {} holds {files:?}; status: {st}",
            vm_dir.display()
        )
    });
    assert_eq!(disk.len(), 1 << 20);
    assert_eq!(verify(&disk), 400);
    // The other copies (the first primary's, the new secondary's) were collected.
    let mut copies: Vec<String> = std::fs::read_dir(&vm_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with("disk-"))
        .collect();
    copies.sort();
    assert_eq!(copies, vec![last], "only the VM's disk is left");
}

/// A `netserve` VM with a network device (`vm create --tap`) on hosts that are network
/// namespaces with a VM network each: a TCP stream from this (the "client") namespace through
/// the guest's echo survives Test Failover byte for byte, and the guest answers a new
/// connection on its new host.
fn netserve_vm_keeps_a_tcp_stream_across_test_failover(b: Backend) {
    let net = NetHosts::create_with(3, true);
    let c = Cluster::start_in_namespaces("cl-net", &net, b);
    let cmdline = format!("ip={NET}.2/24 conns=2");
    c.ok(&[
        "vm",
        "create",
        "ns",
        "--guest",
        "netserve",
        "--cmdline",
        &cmdline,
        "--mem-mib",
        "32",
        "--tap",
        "fttap",
        "--ft",
    ]);
    c.ok(&["vm", "start", "ns"]);
    c.wait(60, "protection", |s| {
        s.contains("VM ns: running, protected")
    });
    let t = Instant::now();
    while !c.console("ns").contains("netserve: listening") {
        assert!(t.elapsed() < Duration::from_secs(30), "{}", c.console("ns"));
        std::thread::sleep(Duration::from_millis(20));
    }
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 + i / 4099) as u8).collect();
    let (input, output) = (c.dir.path("in"), c.dir.path("out"));
    std::fs::write(&input, &data).unwrap();
    let echo = |input: &std::path::Path, output: &std::path::Path| {
        Command::new("socat")
            .args(["-t", "60", "-T", "120", "-", &format!("TCP:{NET}.2:7")])
            .stdin(std::fs::File::open(input).unwrap())
            .stdout(std::fs::File::create(output).unwrap())
            .spawn()
            .expect("socat (Debian package socat)")
    };
    let mut client = echo(&input, &output);
    while std::fs::metadata(&output).map_or(0, |m| m.len()) < 1 << 20 {
        assert!(t.elapsed() < Duration::from_secs(90), "the echo stalled");
        std::thread::sleep(Duration::from_millis(2));
    }
    let out = c.ok(&["ft", "test-failover", "ns"]);
    assert!(out.contains("re-protected"), "{out}");
    assert!(client.wait().unwrap().success(), "socat failed");
    assert!(
        std::fs::read(&output).unwrap() == data,
        "the echo differs from what was sent"
    );
    std::fs::write(&input, b"bye\n").unwrap();
    assert!(echo(&input, &output).wait().unwrap().success());
    assert_eq!(std::fs::read(&output).unwrap(), b"bye\n");
    c.wait(60, "the guest's end", |s| {
        s.contains("VM ns: ended (exit 0)")
    });
}

/// Every scenario above, once on the embedded file store and once on etcd.
macro_rules! on_both_stores {
    ($($scenario:ident),* $(,)?) => {
        mod file_store {
            $(#[test]
            fn $scenario() {
                ftvm_tests::require_kvm!();
                let _s = super::SERIAL.lock().unwrap_or_else(|e| e.into_inner());
                super::$scenario(super::Backend::File);
            })*
        }
        mod etcd_store {
            $(#[test]
            fn $scenario() {
                ftvm_tests::require_kvm!();
                let _s = super::SERIAL.lock().unwrap_or_else(|e| e.into_inner());
                super::$scenario(super::Backend::Etcd);
            })*
        }
    };
}

on_both_stores!(
    limits_are_enforced_with_messages_naming_them,
    host_failures_fail_over_and_protection_is_restored,
    ft_operations_through_the_coordinator,
    isolation_and_partition_in_namespaces_never_make_two_primaries,
    a_standby_coordinator_takes_over_the_cluster,
    ft_on_for_a_running_vm_and_kernel_vms_with_initrd,
    journal_vm_with_a_disk_survives_test_failover,
    netserve_vm_keeps_a_tcp_stream_across_test_failover,
    an_agent_restart_keeps_its_vms_running,
);
