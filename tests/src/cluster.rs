//! Clusters for end-to-end tests: a real `ftvm coordinator` and `ftvm host-agent` processes,
//! with hosts on loopback sharing one datastore directory, or hosts as network namespaces on
//! a bridge ([`NetHosts`]).
use crate::netns::{self, sh};
use crate::{ftvm_bin, Etcd, Side, TempDir};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where the coordinator keeps the cluster state: every scenario runs on both.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    /// The embedded file store (the default).
    File,
    /// A real etcd (Debian's etcd-server), under a key prefix of the test's own.
    Etcd,
}

pub struct Cluster {
    pub dir: TempDir,
    /// Where the CLI and the agents look for the coordinator (comma-separated when there is
    /// a standby).
    pub addr: String,
    pub coordinator: Child,
    pub agents: Vec<(String, Child)>,
    /// `--etcd …` arguments of every coordinator of this cluster (empty: file store).
    pub store_args: Vec<String>,
    pub _etcd: Option<Etcd>,
    /// The coordinator's `--dir`: cluster state and every VM's datastore.
    pub state: PathBuf,
}

pub fn free_loopback_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

impl Cluster {
    pub fn start(tag: &str, hosts: &[&str], extra: &[&str], b: Backend) -> Cluster {
        Self::start_with(tag, hosts, extra, b, &[])
    }

    /// A cluster whose agents also know the coordinator addresses `standbys` (see
    /// [`Cluster::spawn_coordinator`]).
    pub fn start_with(
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
        let state = dir.path("cluster");
        Self::init(&state, &store_args);
        let coordinator =
            Self::coordinator_process(&dir, &state, &listen, &store_args, extra, "coordinator");
        let mut c = Cluster {
            dir,
            addr,
            coordinator,
            agents: vec![],
            store_args,
            _etcd: etcd,
            state,
        };
        for h in hosts {
            c.add_host(h);
        }
        c.wait(10, "all hosts up", |s| {
            s.matches(": up").count() == hosts.len()
        });
        c
    }

    pub fn store(b: Backend, tag: &str) -> (Option<Etcd>, Vec<String>) {
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

    /// `ftvm coordinator init`: the cluster's CA and admin token (in `state/pki`).
    pub fn init(state: &Path, store_args: &[String]) {
        let o = Command::new(ftvm_bin())
            .args(["coordinator", "init", "--dir"])
            .arg(state)
            .args(store_args)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "ftvm coordinator init: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// The admin's CLI config file that `ftvm coordinator init` wrote.
    pub fn admin_config(&self) -> PathBuf {
        self.state.join("pki/admin.toml")
    }

    /// The arguments that let host `h`'s agent in: its state directory in the test's
    /// directory and, on its first start, a fresh join token and the CA.
    pub fn agent_identity(&self, h: &str) -> Vec<String> {
        let state = self.dir.path(&format!("agent-state-{h}"));
        let mut args = vec!["--state-dir".to_string(), state.display().to_string()];
        if !state.join("host.pem").exists() {
            // The coordinator may still be starting: retried while it does not answer.
            let t = Instant::now();
            let o = loop {
                let o = self.ftvm(&["host", "join-token"]);
                if o.status.success() || t.elapsed() > Duration::from_secs(20) {
                    break o;
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            assert_eq!(
                o.status.code(),
                Some(0),
                "ftvm host join-token: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            args.extend([
                "--join".to_string(),
                String::from_utf8_lossy(&o.stdout).trim().to_string(),
                "--ca".to_string(),
                self.state.join("pki/ca.pem").display().to_string(),
            ]);
        }
        args
    }

    /// `ftvm coordinator` on `listen` with the cluster directory `state` and store, logging
    /// to `LOG.log` in the test directory `dir`.
    pub fn coordinator_process(
        dir: &TempDir,
        state: &Path,
        listen: &str,
        store_args: &[String],
        extra: &[&str],
        log: &str,
    ) -> Child {
        Command::new(ftvm_bin())
            .args(["coordinator", "--listen", listen, "--dir"])
            .arg(state)
            .args(store_args)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Self::append_log(dir, log))
            .spawn()
            .unwrap()
    }

    /// `<log>.log` in the test's directory, appended to: a restarted coordinator continues
    /// its predecessor's log after a line saying so, so a failure shows both.
    fn append_log(dir: &TempDir, log: &str) -> std::fs::File {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.path(&format!("{log}.log")))
            .unwrap();
        if f.metadata().is_ok_and(|m| m.len() > 0) {
            let _ = writeln!(f, "--- (the test restarted this process) ---");
        }
        f
    }

    /// Creates and starts FT VM `vm` running the counter guest, and waits until it is
    /// protected.
    pub fn create_ft_counter(&self, vm: &str) {
        self.ok(&[
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
        self.ok(&["vm", "start", vm]);
        self.wait(60, "protection", |s| {
            s.contains(&format!("VM {vm}: running, protected"))
        });
    }

    pub fn add_host(&mut self, h: &str) {
        let id = self.agent_identity(h);
        let agent = Command::new(ftvm_bin())
            .args(["host-agent", "--name", h, "--coordinator", &self.addr])
            .args(&id)
            .stdout(Stdio::null())
            .stderr(Self::append_log(&self.dir, &format!("agent-{h}")))
            .spawn()
            .unwrap();
        self.agents.push((h.to_string(), agent));
    }

    pub fn ftvm(&self, args: &[&str]) -> Output {
        Command::new(ftvm_bin())
            .args(args)
            .env("FTVM_COORDINATOR", &self.addr)
            .env("FTVM_CONFIG", self.admin_config())
            .env_remove("FTVM_TOKEN")
            .env_remove("FTVM_CA")
            .current_dir(&self.dir.0)
            .output()
            .unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.ftvm(args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert_eq!(o.status.code(), Some(0), "ftvm {args:?}: {text}");
        text
    }

    pub fn refused(&self, args: &[&str]) -> String {
        let o = self.ftvm(args);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(1), "ftvm {args:?} must fail: {err}");
        assert!(err.starts_with("ftvm: error: "), "{err}");
        err
    }

    pub fn status(&self) -> String {
        String::from_utf8_lossy(&self.ftvm(&["status"]).stdout).to_string()
    }

    pub fn wait(&self, secs: u64, what: &str, done: impl Fn(&str) -> bool) -> String {
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
    pub fn host_of(&self, vm: &str, role: &str) -> String {
        let s = self.status();
        let line = s
            .lines()
            .find(|l| l.starts_with(&format!("VM {vm}:")))
            .unwrap_or_else(|| panic!("no VM {vm}: {s}"));
        let after = &line[line.find(&format!("| {role} ")).unwrap() + role.len() + 3..];
        after.split_whitespace().next().unwrap().to_string()
    }

    /// What a dying host does: its agent and every VMM it started die at once.
    pub fn kill_host(&mut self, h: &str) {
        let i = self.agents.iter().position(|(n, _)| n == h).unwrap();
        let (_, mut agent) = self.agents.remove(i);
        let vmms = self.host_vmms(h, agent.id());
        // SAFETY: SIGKILL to the agent's process group (agents make themselves its leader)
        // and to each of its VMMs (in process groups of their own).
        unsafe { libc::kill(-(agent.id() as i32), libc::SIGKILL) };
        for p in vmms {
            // SAFETY: as above.
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
        }
        let _ = agent.wait();
    }

    /// Kills host `h`'s agent only (as a crash or a restart of the agent would): its VMMs
    /// run on. [`Cluster::start_agent`] / [`Cluster::start_agent_in`] start it again.
    pub fn kill_agent(&mut self, h: &str) {
        let i = self.agents.iter().position(|(n, _)| n == h).unwrap();
        let (_, mut agent) = self.agents.remove(i);
        // SAFETY: SIGKILL to the agent's own process group.
        unsafe { libc::kill(-(agent.id() as i32), libc::SIGKILL) };
        let _ = agent.wait();
    }

    /// The VMM processes host `h`'s agent runs: those its process list names, and its
    /// children (a process started since the list was written).
    pub fn host_vmms(&self, h: &str, agent_pid: u32) -> Vec<u32> {
        let list = self
            .dir
            .path(&format!("agent-state-{h}"))
            .join("procs.json");
        let mut pids: Vec<u32> = std::fs::read(list)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| {
                v.as_array().map(|a| {
                    a.iter()
                        .filter_map(|p| p["pid"].as_u64().map(|p| p as u32))
                        .collect()
                })
            })
            .unwrap_or_default();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let ppid = stat
                .rfind(')')
                .and_then(|i| stat[i + 2..].split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(agent_pid) {
                pids.push(pid);
            }
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// After a moment for the last output to land: `vm`'s console is `1`..`n` once each, in
    /// order, and the guest kept printing (more than `min` lines).
    pub fn assert_console_exact(&self, vm: &str, min: u64) {
        std::thread::sleep(Duration::from_millis(300));
        let n = assert_counter_prefix(&self.console(vm));
        assert!(
            n > min,
            "VM {vm} printed only {n} lines, expected more than {min}"
        );
    }

    pub fn console(&self, vm: &str) -> String {
        std::fs::read_to_string(self.vm_dir(vm).join("console.txt")).unwrap_or_default()
    }

    /// `vm`'s datastore directory.
    pub fn vm_dir(&self, vm: &str) -> PathBuf {
        self.state.join("vms").join(vm)
    }

    /// The sides of `vm`'s pair answering on its control sockets (`ftvm ctl status`), as
    /// (primary, secondary).
    pub fn sides(&self, vm: &str) -> (Option<Side>, Option<Side>) {
        let Ok(o) = Command::new(ftvm_bin())
            .args(["ctl", "--datastore"])
            .arg(self.vm_dir(vm))
            .arg("status")
            .output()
        else {
            return (None, None);
        };
        let text = String::from_utf8_lossy(&o.stdout);
        (
            Side::parse(&text, "primary"),
            Side::parse(&text, "secondary"),
        )
    }

    /// The pid answering as `role` on `vm`'s control socket.
    pub fn pid_of(&self, vm: &str, role: &str) -> Option<u32> {
        let (p, s) = self.sides(vm);
        if role == "primary" { p } else { s }.map(|s| s.pid)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let hosts: Vec<String> = self.agents.iter().map(|(h, _)| h.clone()).collect();
        for h in hosts {
            self.kill_host(&h);
        }
        // VMMs of agents killed earlier (restarted agents re-adopt theirs; these did not).
        if let Ok(it) = std::fs::read_dir(self.state.join("vms")) {
            let dirs: Vec<String> = it
                .flatten()
                .map(|e| e.path().display().to_string())
                .collect();
            for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
                let ours = args
                    .windows(2)
                    .any(|w| w[0] == b"--datastore" && dirs.iter().any(|d| d.as_bytes() == w[1]));
                if let (true, Some(pid)) = (
                    ours,
                    e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()),
                ) {
                    // SAFETY: SIGKILL to a VMM of this cluster.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = self.coordinator.kill();
        let _ = self.coordinator.wait();
    }
}

/// `1`..`n` once each, in order (a prefix of the counter's output). The guest is still
/// printing, and an epoch's output may end inside a line: an unterminated last line must be
/// the start of the next number.
pub fn assert_counter_prefix(text: &str) -> u64 {
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

/// Hosts as network namespaces on a bridge, the coordinator on the bridge's address in the
/// root namespace; removed on drop.
pub struct NetHosts {
    pub tag: String,
    pub bridge: String,
    pub hosts: Vec<String>,
}

pub const NET: &str = "10.233.0";

impl NetHosts {
    pub fn create(n: usize) -> NetHosts {
        Self::create_with(n, false)
    }

    /// `taps`: each host also gets a VM network, as a hypervisor host has: a bridge `br0`
    /// holding its uplink (and its address) and a tap `fttap` for a VM.
    pub fn create_with(n: usize, taps: bool) -> NetHosts {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let k = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("{}{k}", std::process::id() % 10_000);
        let bridge = format!("ftbr{tag}");
        let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        // Only one set of hosts can hold the subnet: a bridge left by a killed test run
        // would take the coordinator's address.
        if let Ok(o) = Command::new("ip").args(["-br", "addr"]).output() {
            for l in String::from_utf8_lossy(&o.stdout).lines() {
                if l.contains(&format!(" {NET}.1/24")) {
                    let dev = l.split_whitespace().next().unwrap_or_default();
                    let _ = Command::new("ip").args(["link", "del", dev]).output();
                }
            }
        }
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

    pub fn ns(&self, h: &str) -> &str {
        let i: usize = h.trim_start_matches('h').parse().unwrap();
        &self.hosts[i - 1]
    }

    pub fn dev(&self, h: &str) -> String {
        format!("fth{}-{}", h.trim_start_matches('h'), self.tag)
    }

    /// Host isolation: the host's only link goes down (it keeps running).
    pub fn isolate(&self, h: &str, on: bool) {
        let state = if on { "down" } else { "up" };
        sh(&["ip", "-n", self.ns(h), "link", "set", &self.dev(h), state]);
    }

    /// A partition between the host and the coordinator only (it still reaches its peers).
    pub fn cut_from_coordinator(&self, h: &str, on: bool) {
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
    pub fn start_in_namespaces(tag: &str, net: &NetHosts, b: Backend) -> Cluster {
        let dir = TempDir::new(tag);
        let state = dir.path("cluster");
        Self::start_in_namespaces_at(dir, state, net, b)
    }

    /// As [`Cluster::start_in_namespaces`], with the cluster directory at `state`.
    pub fn start_in_namespaces_at(
        dir: TempDir,
        state: PathBuf,
        net: &NetHosts,
        b: Backend,
    ) -> Cluster {
        let tag = dir.0.file_name().unwrap().to_string_lossy().to_string();
        let port = 47_600 + (std::process::id() % 200) as u16;
        let addr = format!("{NET}.1:{port}");
        let (etcd, store_args) = Self::store(b, &tag);
        Self::init(&state, &store_args);
        let coordinator =
            Self::coordinator_process(&dir, &state, &addr, &store_args, &[], "coordinator");
        let mut c = Cluster {
            dir,
            addr: addr.clone(),
            coordinator,
            agents: vec![],
            store_args,
            _etcd: etcd,
            state,
        };
        for i in 1..=net.hosts.len() {
            c.start_agent_in(net, &format!("h{i}"));
        }
        c.wait(15, "all hosts up", |s| {
            s.matches(": up").count() == net.hosts.len()
        });
        c
    }

    /// Starts host `h`'s agent in its namespace (its log appended to `agent-H.log`).
    pub fn start_agent_in(&mut self, net: &NetHosts, h: &str) {
        let i: usize = h.trim_start_matches('h').parse().unwrap();
        let log = Self::append_log(&self.dir, &format!("agent-{h}"));
        let id = self.agent_identity(h);
        let agent = Command::new("ip")
            .args(["netns", "exec", net.ns(h)])
            .arg(ftvm_bin())
            .args([
                "host-agent",
                "--name",
                h,
                "--coordinator",
                &self.addr,
                "--ip",
            ])
            .arg(format!("{NET}.{}", 10 + i))
            .args(&id)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agents.push((h.to_string(), agent));
    }

    /// Lines of every VMM process log of `vm` containing `needle`.
    pub fn proc_logs_with(&self, vm: &str, needle: &str) -> usize {
        let d = self.vm_dir(vm);
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
