//! `ftvm host-agent`: one per host. Sends the coordinator a heartbeat with a report of its
//! processes every [`Config::interval`], starts the `ftvm primary | secondary | run` processes
//! the reply assigns to this host and kills those no longer assigned.
//!
//! The agent speaks to the coordinator's HTTPS API with its host certificate (mutual TLS,
//! trusting its cluster's CA only). On its first start it joins: it makes a key and a
//! signing request, sends them with a one-time join token, and keeps the certificate it gets
//! in its state directory (`ca.pem`, `host.key` (0600), `host.pem`); later starts use those.
//!
//! VMM processes run in process groups of their own, so stopping or restarting the agent (a
//! systemd restart, an upgrade) leaves the VMs running: the agent keeps its processes in
//! `procs.json` in its state directory and a restarted agent re-adopts the ones still alive
//! (same pid, same start time, an `ftvm` command line), reporting them as before. Each VMM
//! writes how it ended — the guest's exit code or ftvm's own failure — to an exit file the
//! agent names ([`EXIT_FILE_ENV`]), so an adopted process's end is known too, and ftvm's
//! failures are never reported as a guest's exit code.
use super::api::{HeartbeatBody, JoinRequest, Joined};
use super::client::{ApiError, Client, TlsRefused};
use super::ops::seg;
use super::pki;
use super::proto::{Assignment, ProcReport, Reply};
use crate::ctl;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Config {
    pub name: String,
    /// This host's address for FT links.
    pub ip: String,
    pub coordinator: String,
    pub interval: Duration,
    /// Where the host's certificate and key are kept.
    pub state_dir: PathBuf,
    /// A join token, for the first start.
    pub join: Option<String>,
    /// The cluster CA certificate, for the first start.
    pub ca: Option<PathBuf>,
}

/// The agent's API client: with the host certificate in the state directory, or after
/// joining with the join token (retried while no coordinator answers, for 30 s).
fn identity(cfg: &Config) -> Result<Client> {
    let d = &cfg.state_dir;
    let (ca_f, key_f, cert_f) = (d.join("ca.pem"), d.join("host.key"), d.join("host.pem"));
    if !cert_f.exists() {
        let join = cfg.join.as_deref().with_context(|| {
            format!(
                "host {} has not joined the cluster (no certificate in {}): give --join TOKEN \
                 (from `ftvm host join-token` on an admin's machine) and --ca CA.pem",
                cfg.name,
                d.display()
            )
        })?;
        let ca = cfg
            .ca
            .as_ref()
            .context("joining needs the cluster CA certificate: --ca CA.pem")?;
        let ca_pem = std::fs::read_to_string(ca)
            .with_context(|| format!("reading the cluster CA certificate {}", ca.display()))?;
        let (key, csr) = pki::host_request(&cfg.name)?;
        let c = Client::new(&cfg.coordinator, &ca_pem, Some(join.to_string()), None)?;
        let path = format!("/api/v1/hosts/{}/join", seg(&cfg.name));
        let body = JoinRequest { csr_pem: csr };
        let t = std::time::Instant::now();
        let joined: Joined = loop {
            match c.call("POST", &path, Some(&body)) {
                Ok(j) => break j,
                Err(e) if e.is::<ApiError>() || e.is::<TlsRefused>() => {
                    return Err(e.context(format!("joining the cluster as host {}", cfg.name)))
                }
                Err(e) if t.elapsed() > Duration::from_secs(30) => {
                    return Err(e.context(format!("joining the cluster as host {}", cfg.name)))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)
                .with_context(|| format!("creating {}", d.display()))?;
        }
        pki::write_file(&ca_f, joined.ca_pem.as_bytes(), false)?;
        pki::write_file(&key_f, key.as_bytes(), true)?;
        pki::write_file(&cert_f, joined.cert_pem.as_bytes(), false)?;
        tracing::info!(
            "joined the cluster as host {}; certificate in {}",
            cfg.name,
            cert_f.display()
        );
    }
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let (ca_pem, key, cert) = (read(&ca_f)?, read(&key_f)?, read(&cert_f)?);
    Client::new(
        &cfg.coordinator,
        &ca_pem,
        None,
        Some((pki::certs_from_pem(&cert)?, pki::key_from_pem(&key)?)),
    )
}

/// The environment variable naming the file a VMM writes its [`Outcome`] to.
pub const EXIT_FILE_ENV: &str = "FTVM_EXIT_FILE";

/// How a VMM process ended, as it writes it to its exit file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// The process's exit code (the guest's, or ftvm's status codes such as halted).
    Exit(u8),
    /// ftvm itself failed: its error.
    Failed(String),
}

/// A process this agent runs: its own child, or one a previous agent started.
enum Handle {
    Child(Child),
    Adopted { pid: u32, started: u64 },
}

struct Proc {
    handle: Handle,
    vm: String,
    datastore: String,
    /// Its exit file.
    exit_file: PathBuf,
    /// Once ended: its exit code (None: a signal, or unknown) and ftvm's failure if any.
    exit: Option<(Option<i32>, Option<String>)>,
}

impl Proc {
    fn pid(&self) -> u32 {
        match &self.handle {
            Handle::Child(c) => c.id(),
            Handle::Adopted { pid, .. } => *pid,
        }
    }

    /// Whether it ended (reaping it if it is ours); records how.
    fn poll(&mut self) -> bool {
        if self.exit.is_some() {
            return true;
        }
        let code = match &mut self.handle {
            Handle::Child(c) => match c.try_wait() {
                Ok(Some(st)) => Some(st.code()),
                _ => None,
            },
            Handle::Adopted { pid, started } => (!alive_as(*pid, *started)).then_some(None),
        };
        let Some(code) = code else { return false };
        // The exit file knows better: the code of an adopted process, and ftvm's failure.
        let outcome = std::fs::read(&self.exit_file)
            .ok()
            .and_then(|b| serde_json::from_slice::<Outcome>(&b).ok());
        let _ = std::fs::remove_file(&self.exit_file);
        self.exit = Some(match outcome {
            Some(Outcome::Exit(c)) => (Some(i32::from(c)), None),
            Some(Outcome::Failed(e)) => (code, Some(e)),
            None => (code, None),
        });
        true
    }

    fn kill(&mut self) {
        match &mut self.handle {
            Handle::Child(c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Handle::Adopted { pid, started } => {
                if alive_as(*pid, *started) {
                    // SAFETY: a signal to a process we checked is the one we started.
                    unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
                }
            }
        }
    }
}

/// A process's start time (clock ticks since boot, /proc/PID/stat field 22): with the pid,
/// it names one process for good (a pid is reused, the pair is not).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields count from after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); zombies have ended.
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Whether `pid` is still the process that started at `started`.
fn alive_as(pid: u32, started: u64) -> bool {
    start_time(pid) == Some(started)
}

/// What `procs.json` keeps of each process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Kept {
    id: u64,
    vm: String,
    datastore: String,
    pid: u32,
    started: u64,
    exit_file: PathBuf,
}

fn save_procs(state_dir: &Path, procs: &HashMap<u64, Proc>) {
    let kept: Vec<Kept> = procs
        .iter()
        .filter(|(_, p)| p.exit.is_none())
        .filter_map(|(id, p)| {
            Some(Kept {
                id: *id,
                vm: p.vm.clone(),
                datastore: p.datastore.clone(),
                pid: p.pid(),
                started: start_time(p.pid())?,
                exit_file: p.exit_file.clone(),
            })
        })
        .collect();
    let path = state_dir.join("procs.json");
    if let Err(e) = coordinator::store::write_atomic(
        &path,
        &serde_json::to_vec_pretty(&kept).expect("serializes"),
    ) {
        tracing::warn!("cannot keep the process list in {}: {e}", path.display());
    }
}

/// The processes a previous agent on this host started that still run (checked by pid,
/// start time and command line: `ftvm` with the process's datastore).
fn adopt(state_dir: &Path) -> HashMap<u64, Proc> {
    let path = state_dir.join("procs.json");
    let Ok(bytes) = std::fs::read(&path) else {
        return HashMap::new();
    };
    let kept: Vec<Kept> = match serde_json::from_slice(&bytes) {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!("ignoring {}: {e}", path.display());
            return HashMap::new();
        }
    };
    let mut procs = HashMap::new();
    for k in kept {
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", k.pid)).unwrap_or_default();
        let ours = cmdline
            .split(|b| *b == 0)
            .collect::<Vec<_>>()
            .windows(2)
            .any(|w| w[0] == b"--datastore" && w[1] == k.datastore.as_bytes());
        let alive = alive_as(k.pid, k.started);
        if alive && !ours {
            // (Not possible for the same pid and start time; refused all the same.)
            continue;
        }
        let id = k.id;
        let mut p = Proc {
            handle: Handle::Adopted {
                pid: k.pid,
                started: k.started,
            },
            vm: k.vm,
            datastore: k.datastore,
            exit_file: k.exit_file,
            exit: None,
        };
        if alive {
            tracing::info!("re-adopted process {id} (VM {}, pid {})", p.vm, k.pid);
        } else {
            // Ended while no agent ran: reported once more, with how it ended if it said so
            // (a guest that finished is not a process that was killed).
            tracing::info!("process {id} (VM {}) ended while no agent ran", p.vm);
            p.poll();
        }
        procs.insert(id, p);
    }
    procs
}

/// How long the agent waits for a process's status: a frozen VMM (its own, or the VM's other
/// side, whose socket is in the same datastore) must not delay the host's report past the
/// coordinator's host timeout, which would make this host look unreachable.
const STATUS_WAIT: Duration = Duration::from_millis(300);

/// The status of the side that `pid` serves in `datastore`, if it answers.
fn status_of(datastore: &str, pid: u32) -> Option<ctl::Status> {
    ["primary", "secondary"].iter().find_map(|role| {
        let st = ctl::status(Path::new(datastore), role, STATUS_WAIT).ok()?;
        (st.pid == pid).then_some(st)
    })
}

pub fn run(cfg: Config) -> Result<u8> {
    // Its own process group (its VMMs are not in it: they have groups of their own).
    // SAFETY: setpgid(0, 0) only changes this process's group.
    unsafe { libc::setpgid(0, 0) };
    let exe = std::env::current_exe().context("finding the ftvm binary")?;
    let api = identity(&cfg)?;
    let beat_path = format!("/api/v1/hosts/{}/heartbeat", seg(&cfg.name));
    let mut procs: HashMap<u64, Proc> = adopt(&cfg.state_dir);
    let mut told = false;
    // The datastore heartbeat runs on its own thread, so a coordinator call stuck in a
    // network timeout never delays it: it is how the coordinator tells an isolated host
    // (alive) from a failed one.
    let beat_file: Arc<Mutex<Option<PathBuf>>> = Arc::default();
    let (bf, interval) = (beat_file.clone(), cfg.interval);
    std::thread::Builder::new()
        .name("ds-heartbeat".into())
        .spawn(move || {
            let mut beats = 0u64;
            loop {
                let f = bf.lock().unwrap().clone();
                if let Some(f) = f {
                    beats += 1;
                    if let Some(d) = f.parent() {
                        let _ = std::fs::create_dir_all(d);
                    }
                    let r = coordinator::store::write_heartbeat(&f, beats.to_string().as_bytes());
                    if let Err(e) = r {
                        if beats % 50 == 1 {
                            tracing::warn!("datastore heartbeat {}: {e}", f.display());
                        }
                    }
                }
                std::thread::sleep(interval);
            }
        })?;
    tracing::info!("host {}: reporting to {}", cfg.name, cfg.coordinator);
    loop {
        let mut report = Vec::new();
        let mut ended = false;
        for (id, p) in procs.iter_mut() {
            if p.exit.is_none() && p.poll() {
                ended = true;
                match &p.exit {
                    Some((_, Some(e))) => {
                        tracing::warn!("process {id} (VM {}) failed: {e}", p.vm)
                    }
                    Some((Some(c), None)) => {
                        tracing::info!("process {id} (VM {}) ended: exit {c}", p.vm)
                    }
                    _ => tracing::info!("process {id} (VM {}) ended by a signal", p.vm),
                }
            }
            let pid = p.pid();
            report.push(ProcReport {
                id: *id,
                vm: p.vm.clone(),
                running: p.exit.is_none(),
                exit: p.exit.as_ref().and_then(|e| e.0),
                failed: p.exit.as_ref().and_then(|e| e.1.clone()),
                status: p
                    .exit
                    .is_none()
                    .then(|| status_of(&p.datastore, pid))
                    .flatten(),
            });
        }
        if ended {
            save_procs(&cfg.state_dir, &procs);
        }
        let req = HeartbeatBody {
            version: super::proto::REPORT_VERSION,
            ip: cfg.ip.clone(),
            report,
        };
        match api.call::<Reply>("POST", &beat_path, Some(&req)) {
            Ok(Reply::Assignments {
                procs: assigned,
                heartbeat_file,
            }) => {
                told = false;
                if let Some(f) = heartbeat_file {
                    *beat_file.lock().unwrap() = Some(PathBuf::from(f));
                }
                if apply(&exe, &mut procs, &assigned)? {
                    save_procs(&cfg.state_dir, &procs);
                }
            }
            Ok(other) => tracing::warn!("unexpected reply {other:?}"),
            Err(e) => {
                // Keep everything running: the pairs fail over without the coordinator.
                if !told {
                    tracing::warn!("{e:#}; retrying");
                    told = true;
                }
            }
        }
        std::thread::sleep(cfg.interval);
    }
}

/// Starts and stops processes as assigned; whether anything changed.
fn apply(exe: &Path, procs: &mut HashMap<u64, Proc>, assigned: &[Assignment]) -> Result<bool> {
    let mut changed = false;
    for a in assigned {
        if procs.contains_key(&a.id) || !a.start {
            continue;
        }
        changed = true;
        std::fs::create_dir_all(&a.datastore)?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(Path::new(&a.datastore).join(format!("proc-{}.log", a.id)))?;
        let exit_file = Path::new(&a.datastore).join(format!("exit-{}.json", a.id));
        let _ = std::fs::remove_file(&exit_file);
        let mut cmd = Command::new(exe);
        cmd.args(&a.argv)
            .env(EXIT_FILE_ENV, &exit_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // A process group of its own (not a session: the kernel's autogroup scheduler gives
        // each session an equal share of the CPU, which starved the pairs' heartbeats when
        // every VMM had one; measured in the chaos cluster).
        // SAFETY: setpgid(0, 0) in the child before exec: async-signal-safe, nothing else.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::setpgid(0, 0);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {:?}", a.argv))?;
        tracing::info!(
            "started process {} (VM {}): ftvm {}",
            a.id,
            a.vm,
            a.argv.join(" ")
        );
        procs.insert(
            a.id,
            Proc {
                handle: Handle::Child(child),
                vm: a.vm.clone(),
                datastore: a.datastore.clone(),
                exit_file,
                exit: None,
            },
        );
    }
    let keep: Vec<u64> = assigned.iter().map(|a| a.id).collect();
    procs.retain(|id, p| {
        if keep.contains(id) {
            return true;
        }
        if p.exit.is_none() {
            tracing::info!("stopping process {id} (VM {})", p.vm);
            p.kill();
        }
        let _ = std::fs::remove_file(&p.exit_file);
        changed = true;
        false
    });
    Ok(changed)
}
