//! The failover coordinator end to end: a real `ftvm coordinator` and `ftvm host-agent`
//! processes (hosts on loopback sharing one datastore directory), real FT pairs under them.
use ftvm_tests::netns::{self, sh};
use ftvm_tests::{ftvm_bin, require_kvm, Etcd, TempDir};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The cluster tests each run several VMMs: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Where the coordinator keeps the cluster state: every scenario runs on both.
#[derive(Clone, Copy, Debug)]
enum Backend {
    /// The embedded file store (the default).
    File,
    /// A real etcd (Debian's etcd-server), under a key prefix of the test's own.
    Etcd,
}

struct Cluster {
    dir: TempDir,
    /// Where the CLI and the agents look for the coordinator (comma-separated when there is
    /// a standby).
    addr: String,
    coordinator: Child,
    agents: Vec<(String, Child)>,
    /// `--etcd …` arguments of every coordinator of this cluster (empty: file store).
    store_args: Vec<String>,
    _etcd: Option<Etcd>,
}

fn free_loopback_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

impl Cluster {
    fn start(tag: &str, hosts: &[&str], extra: &[&str], b: Backend) -> Cluster {
        Self::start_with(tag, hosts, extra, b, &[])
    }

    /// A cluster whose agents also know the coordinator addresses `standbys` (see
    /// [`Cluster::spawn_coordinator`]).
    fn start_with(
        tag: &str,
        hosts: &[&str],
        extra: &[&str],
        b: Backend,
        standbys: &[&str],
    ) -> Cluster {
        let dir = TempDir::new(tag);
        let listen = free_loopback_addr();
        let addr = std::iter::once(listen.as_str())
            .chain(standbys.iter().copied())
            .collect::<Vec<_>>()
            .join(",");
        let (etcd, store_args) = Self::store(b, tag);
        let coordinator =
            Self::coordinator_process(&dir, &listen, &store_args, extra, "coordinator");
        let mut c = Cluster {
            dir,
            addr,
            coordinator,
            agents: vec![],
            store_args,
            _etcd: etcd,
        };
        for h in hosts {
            c.add_host(h);
        }
        c.wait(10, "all hosts up", |s| {
            s.matches(": up").count() == hosts.len()
        });
        c
    }

    fn store(b: Backend, tag: &str) -> (Option<Etcd>, Vec<String>) {
        match b {
            Backend::File => (None, vec![]),
            Backend::Etcd => {
                let e = Etcd::start();
                let args = vec![
                    "--etcd".into(),
                    e.arg(),
                    "--etcd-prefix".into(),
                    e.prefix(tag),
                ];
                (Some(e), args)
            }
        }
    }

    /// `ftvm coordinator` on `listen` with this cluster's directory and store, logging to
    /// `LOG.log` in the test directory.
    fn coordinator_process(
        dir: &TempDir,
        listen: &str,
        store_args: &[String],
        extra: &[&str],
        log: &str,
    ) -> Child {
        Command::new(ftvm_bin())
            .args(["coordinator", "--listen", listen, "--dir"])
            .arg(dir.path("cluster"))
            .args(store_args)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path(&format!("{log}.log"))).unwrap())
            .spawn()
            .unwrap()
    }

    fn add_host(&mut self, h: &str) {
        let agent = Command::new(ftvm_bin())
            .args(["host-agent", "--name", h, "--coordinator", &self.addr])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path(&format!("agent-{h}.log"))).unwrap())
            .spawn()
            .unwrap();
        self.agents.push((h.to_string(), agent));
    }

    fn ftvm(&self, args: &[&str]) -> Output {
        Command::new(ftvm_bin())
            .args(args)
            .env("FTVM_COORDINATOR", &self.addr)
            .current_dir(&self.dir.0)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.ftvm(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(o.status.code(), Some(0), "ftvm {args:?}: {text}");
        text
    }

    fn refused(&self, args: &[&str]) -> String {
        let o = self.ftvm(args);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(1), "ftvm {args:?} must fail: {err}");
        assert!(err.starts_with("ftvm: error: "), "{err}");
        err
    }

    fn status(&self) -> String {
        String::from_utf8_lossy(&self.ftvm(&["status"]).stdout).to_string()
    }

    fn wait(&self, secs: u64, what: &str, done: impl Fn(&str) -> bool) -> String {
        let t = Instant::now();
        loop {
            let s = self.status();
            if done(&s) {
                return s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "{what} within {secs} s; status:\n{s}\ncoordinator log:\n{}",
                std::fs::read_to_string(self.dir.path("coordinator.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The host running `role` ("primary" or "secondary") of `vm`.
    fn host_of(&self, vm: &str, role: &str) -> String {
        let s = self.status();
        let line = s
            .lines()
            .find(|l| l.starts_with(&format!("VM {vm}:")))
            .unwrap_or_else(|| panic!("no VM {vm}: {s}"));
        let after = &line[line.find(&format!("| {role} ")).unwrap() + role.len() + 3..];
        after.split_whitespace().next().unwrap().to_string()
    }

    /// What a dying host does: its agent and every VMM it started die at once.
    fn kill_host(&mut self, h: &str) {
        let i = self.agents.iter().position(|(n, _)| n == h).unwrap();
        let (_, mut agent) = self.agents.remove(i);
        // SAFETY: SIGKILL to the agent's process group (agents make themselves its leader).
        unsafe { libc::kill(-(agent.id() as i32), libc::SIGKILL) };
        let _ = agent.wait();
    }

    /// After a moment for the last output to land: `vm`'s console is `1`..`n` once each, in
    /// order, and the guest kept printing (more than `min` lines).
    fn assert_console_exact(&self, vm: &str, min: u64) {
        std::thread::sleep(Duration::from_millis(300));
        let n = assert_counter_prefix(&self.console(vm));
        assert!(
            n > min,
            "VM {vm} printed only {n} lines, expected more than {min}"
        );
    }

    fn console(&self, vm: &str) -> String {
        std::fs::read_to_string(
            self.dir
                .path("cluster")
                .join("vms")
                .join(vm)
                .join("console.txt"),
        )
        .unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, a) in &mut self.agents {
            // SAFETY: as in `kill_host`.
            unsafe { libc::kill(-(a.id() as i32), libc::SIGKILL) };
            let _ = a.wait();
        }
        let _ = self.coordinator.kill();
        let _ = self.coordinator.wait();
    }
}

/// `1`..`n` once each, in order (a prefix of the counter's output). The guest is still
/// printing, and an epoch's output may end inside a line: an unterminated last line must be
/// the start of the next number.
fn assert_counter_prefix(text: &str) -> u64 {
    let (whole, partial) = match text.rfind('\n') {
        Some(i) => (&text[..=i], &text[i + 1..]),
        None => ("", text),
    };
    let mut n = 0;
    for l in whole.lines() {
        n += 1;
        assert_eq!(
            l,
            n.to_string(),
            "line {n}: output lost or repeated:\n{text}"
        );
    }
    assert!(
        (n + 1).to_string().starts_with(partial),
        "unterminated last line {partial:?} after line {n}"
    );
    n
}

fn create_ft_counter(c: &Cluster, vm: &str) {
    c.ok(&[
        "vm",
        "create",
        vm,
        "--guest",
        "counter",
        "--cmdline",
        "count=1000000 rate=100",
        "--mem-mib",
        "32",
        "--ft",
    ]);
    c.ok(&["vm", "start", vm]);
    c.wait(60, "protection", |s| {
        s.contains(&format!("VM {vm}: running, protected"))
    });
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
    assert!(err.contains("limit of 8"), "{err}");
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

/// Hosts as network namespaces on a bridge, the coordinator on the bridge's address in the
/// root namespace; removed on drop.
struct NetHosts {
    tag: String,
    bridge: String,
    hosts: Vec<String>,
}

const NET: &str = "10.233.0";

impl NetHosts {
    fn create(n: usize) -> NetHosts {
        Self::create_with(n, false)
    }

    /// `taps`: each host also gets a VM network, as a hypervisor host has: a bridge `br0`
    /// holding its uplink (and its address) and a tap `fttap` for a VM.
    fn create_with(n: usize, taps: bool) -> NetHosts {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("{}{k}", std::process::id() % 10_000);
        let bridge = format!("ftbr{tag}");
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        sh(&["ip", "link", "add", &bridge, "type", "bridge"]);
        sh(&["ip", "addr", "add", &format!("{NET}.1/24"), "dev", &bridge]);
        sh(&["ip", "link", "set", &bridge, "up"]);
        let mut hosts = Vec::new();
        for i in 1..=n {
            let ns = format!("ftvm-cl{tag}-h{i}");
            let (v, vb) = (format!("fth{i}-{tag}"), format!("ftb{i}-{tag}"));
            netns::add(&ns);
            sh(&["ip", "link", "add", &v, "type", "veth", "peer", "name", &vb]);
            sh(&["ip", "link", "set", &v, "netns", &ns]);
            sh(&["ip", "link", "set", &vb, "master", &bridge]);
            sh(&["ip", "link", "set", &vb, "up"]);
            let addr_dev = if taps {
                sh(&["ip", "-n", &ns, "link", "add", "br0", "type", "bridge"]);
                sh(&["ip", "-n", &ns, "link", "set", &v, "master", "br0"]);
                sh(&["ip", "-n", &ns, "tuntap", "add", "fttap", "mode", "tap"]);
                sh(&["ip", "-n", &ns, "link", "set", "fttap", "master", "br0"]);
                sh(&["ip", "-n", &ns, "link", "set", "fttap", "up"]);
                sh(&["ip", "-n", &ns, "link", "set", "br0", "up"]);
                "br0"
            } else {
                &v
            };
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{NET}.{}/24", 10 + i),
                "dev",
                addr_dev,
            ]);
            sh(&["ip", "-n", &ns, "link", "set", &v, "up"]);
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
            hosts.push(ns);
        }
        NetHosts { tag, bridge, hosts }
    }

    fn ns(&self, h: &str) -> &str {
        let i: usize = h.trim_start_matches('h').parse().unwrap();
        &self.hosts[i - 1]
    }

    fn dev(&self, h: &str) -> String {
        format!("fth{}-{}", h.trim_start_matches('h'), self.tag)
    }

    /// Host isolation: the host's only link goes down (it keeps running).
    fn isolate(&self, h: &str, on: bool) {
        let state = if on { "down" } else { "up" };
        sh(&["ip", "-n", self.ns(h), "link", "set", &self.dev(h), state]);
    }

    /// A partition between the host and the coordinator only (it still reaches its peers).
    fn cut_from_coordinator(&self, h: &str, on: bool) {
        let op = if on { "add" } else { "del" };
        sh(&[
            "ip",
            "-n",
            self.ns(h),
            "route",
            op,
            "blackhole",
            &format!("{NET}.1/32"),
        ]);
    }
}

impl Drop for NetHosts {
    fn drop(&mut self) {
        netns::remove(&self.hosts, &[&self.bridge]);
    }
}

impl Cluster {
    /// A cluster whose hosts h1..hn are network namespaces.
    fn start_in_namespaces(tag: &str, net: &NetHosts, b: Backend) -> Cluster {
        let dir = TempDir::new(tag);
        let port = 47_600 + (std::process::id() % 200) as u16;
        let addr = format!("{NET}.1:{port}");
        let (etcd, store_args) = Self::store(b, tag);
        let coordinator = Self::coordinator_process(&dir, &addr, &store_args, &[], "coordinator");
        let mut c = Cluster {
            dir,
            addr: addr.clone(),
            coordinator,
            agents: vec![],
            store_args,
            _etcd: etcd,
        };
        for i in 1..=net.hosts.len() {
            let h = format!("h{i}");
            let agent = Command::new("ip")
                .args(["netns", "exec", net.ns(&h)])
                .arg(ftvm_bin())
                .args(["host-agent", "--name", &h, "--coordinator", &addr, "--ip"])
                .arg(format!("{NET}.{}", 10 + i))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(c.dir.path(&format!("agent-{h}.log"))).unwrap())
                .spawn()
                .unwrap();
            c.agents.push((h, agent));
        }
        c.wait(15, "all hosts up", |s| {
            s.matches(": up").count() == net.hosts.len()
        });
        c
    }

    /// Lines of every VMM process log of `vm` containing `needle`.
    fn proc_logs_with(&self, vm: &str, needle: &str) -> usize {
        let d = self.dir.path("cluster").join("vms").join(vm);
        std::fs::read_dir(d)
            .map(|it| {
                it.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("proc-"))
                    .map(|e| {
                        std::fs::read_to_string(e.path())
                            .unwrap_or_default()
                            .matches(needle)
                            .count()
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// vSphere HA's failure kinds with hosts as network namespaces: a host **isolated** (its link
/// down, still running), a host **partitioned** from the coordinator (it still reaches its
/// peers), and a host **failed** (everything on it killed). Each ends with exactly one live
/// primary, the console exact, and protection back.
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
    // 3. The primary's host fails (agent and VMMs killed at once): takeover, re-protection on
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
    let mut second = Cluster::coordinator_process(&c.dir, &standby, &c.store_args, &[], "standby");
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
    for (vm, rd) in [("kern", "rd.img"), ("nord", "missing.img")] {
        c.ok(&[
            "vm",
            "create",
            vm,
            "--kernel",
            "k.elf",
            "--initrd",
            rd,
            "--cmdline",
            "count=20 rate=0",
            "--mem-mib",
            "32",
        ]);
        c.ok(&["vm", "start", vm]);
    }
    c.wait(30, "the kernel VM ran to its end", |s| {
        s.contains("VM kern: ended (exit 0)")
    });
    assert_eq!(c.console("kern"), ftvm_tests::counter_output(20));
    let st = c.wait(30, "the VM with a missing initrd failed", |s| {
        s.contains("VM nord: ended")
    });
    assert!(!st.contains("VM nord: ended (exit 0)"), "{st}");
    let missing = c.dir.path("missing.img").display().to_string();
    let t = Instant::now();
    while c.proc_logs_with("nord", &format!("cannot read initrd {missing}")) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no 'cannot read initrd {missing}' in the VM's log"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
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
    let vm_dir = c.dir.path("cluster").join("vms/jr");
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
);
