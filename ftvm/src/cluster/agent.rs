//! `ftvm host-agent`: one per host. Sends the coordinator a heartbeat with a report of its
//! processes every [`Config::interval`], starts the `ftvm primary | secondary | run` processes
//! the reply assigns to this host and kills those no longer assigned.
//!
//! The agent speaks to the coordinator's HTTPS API with its host certificate (mutual TLS,
//! trusting its cluster's CA only). On its first start it joins: it makes a key and a
//! signing request, sends them with a one-time join token, and keeps the certificate it gets
//! in its state directory (`ca.pem`, `host.key` (0600), `host.pem`); later starts use those.
//!
//! The agent makes itself a process-group leader, so its VMM processes share its group:
//! killing the group is what a dying host does to all of them.
use super::api::{HeartbeatBody, JoinRequest, Joined};
use super::client::{ApiError, Client, TlsRefused};
use super::ops::seg;
use super::pki;
use super::proto::{Assignment, ProcReport, Reply};
use crate::ctl;
use anyhow::{Context, Result};
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

struct Proc {
    child: Child,
    vm: String,
    datastore: String,
    exit: Option<Option<i32>>,
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
    // SAFETY: setpgid(0, 0) only changes this process's group.
    unsafe { libc::setpgid(0, 0) };
    let exe = std::env::current_exe().context("finding the ftvm binary")?;
    let api = identity(&cfg)?;
    let beat_path = format!("/api/v1/hosts/{}/heartbeat", seg(&cfg.name));
    let mut procs: HashMap<u64, Proc> = HashMap::new();
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
        for (id, p) in procs.iter_mut() {
            if p.exit.is_none() {
                if let Ok(Some(st)) = p.child.try_wait() {
                    p.exit = Some(st.code());
                    tracing::info!("process {id} (VM {}) ended: {st}", p.vm);
                }
            }
            report.push(ProcReport {
                id: *id,
                vm: p.vm.clone(),
                running: p.exit.is_none(),
                exit: p.exit.flatten(),
                status: p
                    .exit
                    .is_none()
                    .then(|| status_of(&p.datastore, p.child.id()))
                    .flatten(),
            });
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
                apply(&exe, &mut procs, &assigned)?;
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

fn apply(exe: &Path, procs: &mut HashMap<u64, Proc>, assigned: &[Assignment]) -> Result<()> {
    for a in assigned {
        if procs.contains_key(&a.id) || !a.start {
            continue;
        }
        std::fs::create_dir_all(&a.datastore)?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(Path::new(&a.datastore).join(format!("proc-{}.log", a.id)))?;
        let child = Command::new(exe)
            .args(&a.argv)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
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
                child,
                vm: a.vm.clone(),
                datastore: a.datastore.clone(),
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
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        false
    });
    Ok(())
}
