//! `ftvm coordinator`: holds the cluster state, places primaries and secondaries under the
//! limits, tells host agents what to run, notices failovers and dead secondaries and restores
//! protection (see the module docs of [`super`]).
use super::now_ms;
use super::pki::{self, Ca};
use super::proto::{Assignment, FtAction, ProcReport, Reply, Request};
use crate::ctl;
use anyhow::{bail, Context, Result};
use coordinator::auth::{AuthError, Role, Security, SECURITY_KEY};
use coordinator::events::{Event, EventLog, Severity};
use coordinator::model::{Cluster, Failover, FtState, Host, Placement, Vm};
use coordinator::placement::{self, Limits};
use coordinator::{FileStore, Leadership, Store};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Settings of `ftvm coordinator`.
pub struct Config {
    /// State (the store) and every VM's datastore (`DIR/vms/NAME`), shared with the hosts.
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub limits: Limits,
    /// A host whose agent has not sent a heartbeat for this long is down.
    pub host_timeout: Duration,
    /// Secondaries listen on ports from here up.
    pub ft_port_base: u16,
    pub store: StoreChoice,
    /// The cluster CA (`ftvm coordinator init`): `ca.pem`, `ca.key`.
    pub pki: PathBuf,
    /// Names (IP addresses or DNS names) clients reach this coordinator by, besides its
    /// listen address, 127.0.0.1 and localhost: its serving certificate is issued for them.
    pub tls_names: Vec<String>,
    /// How many events the cluster's history keeps.
    pub event_retain: usize,
}

/// Where the cluster state lives.
pub enum StoreChoice {
    /// The embedded file store in `DIR/store` (nothing to install).
    File,
    /// etcd at `endpoints`, keys under `prefix`; over TLS with (CA, client cert and key).
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
        tls: Option<(PathBuf, Option<(PathBuf, PathBuf)>)>,
    },
}

impl StoreChoice {
    fn open(&self, dir: &std::path::Path) -> Result<Box<dyn Store>> {
        Ok(match self {
            StoreChoice::File => Box::new(FileStore::open(&dir.join("store"))?),
            StoreChoice::Etcd {
                endpoints,
                prefix,
                tls,
            } => coordinator::open_etcd(endpoints, prefix, tls.clone())?,
        })
    }

    fn describe(&self, dir: &std::path::Path) -> String {
        match self {
            StoreChoice::File => format!("file store {}", dir.join("store").display()),
            StoreChoice::Etcd {
                endpoints,
                prefix,
                tls,
            } => format!(
                "etcd {} under {prefix}{}",
                endpoints.join(","),
                match tls {
                    Some((_, Some(_))) => " (TLS, client certificate)",
                    Some((_, None)) => " (TLS)",
                    None => "",
                }
            ),
        }
    }
}

pub(super) struct Coord {
    cfg: Config,
    /// API tokens, join tokens, host identities (its own store key) and the stored version.
    security: Mutex<(Security, u64)>,
    ca: Ca,
    store: Arc<dyn Store>,
    /// The cluster's history (in the store; the newest in memory).
    pub(super) events: EventLog,
    /// What the metrics count as events happen.
    counters: Mutex<super::metrics::Counters>,
    /// This coordinator's lease on the cluster; when lost, it stops at once.
    leader: Leadership,
    /// Version of the stored state this coordinator wrote last: every save is a test-and-set
    /// against it, so a coordinator that lost the cluster to another can never overwrite it.
    version: std::sync::atomic::AtomicU64,
    cluster: Mutex<Cluster>,
    /// Latest report of every process, by placement id: (host, report).
    reports: Mutex<HashMap<u64, (String, ProcReport)>>,
    /// When a test failover was asked for, by VM.
    failing: Mutex<HashMap<String, u64>>,
    /// Each host's last datastore heartbeat and when it changed (coordinator clock, ms).
    ds_beats: Mutex<HashMap<String, (String, u64)>>,
}

const STATE_KEY: &str = "cluster";

/// Settings of `ftvm coordinator init`.
pub struct InitConfig {
    pub dir: PathBuf,
    pub pki: PathBuf,
    pub store: StoreChoice,
    /// The address the admin's config file names.
    pub coordinator: String,
}

/// `ftvm coordinator init`: creates the cluster CA and the first admin token (stored hashed
/// in the store), and writes the admin's CLI config file (`PKI/admin.toml`, mode 0600).
pub fn init(cfg: InitConfig) -> Result<u8> {
    let store = cfg.store.open(&cfg.dir)?;
    if store.get(SECURITY_KEY)?.is_some() {
        bail!(
            "the cluster in {} is already initialized (it has API tokens); \
             an admin creates more with `ftvm token create`",
            cfg.store.describe(&cfg.dir)
        );
    }
    pki::init_ca(&cfg.pki)?;
    let mut sec = Security::default();
    let token = sec
        .create_token("admin", Role::Admin, "init", now_ms())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if store
        .cas(SECURITY_KEY, 0, &serde_json::to_vec(&sec)?)?
        .is_none()
    {
        bail!("another `ftvm coordinator init` initialized this cluster at the same time");
    }
    let ca_path = std::fs::canonicalize(pki::ca_pem_path(&cfg.pki))?;
    let file = super::client::ClientFile {
        coordinator: Some(cfg.coordinator.clone()),
        ca: Some(ca_path.clone()),
        token: Some(token),
    };
    let conf = cfg.pki.join("admin.toml");
    pki::write_file(&conf, toml::to_string(&file)?.as_bytes(), true)?;
    let ca = Ca::load(&cfg.pki)?;
    println!("cluster CA:        {}", ca_path.display());
    println!("CA fingerprint:    sha256 {}", pki::fingerprint(&ca.der));
    println!(
        "admin config:      {}  (holds the admin token; mode 0600)",
        std::fs::canonicalize(&conf)?.display()
    );
    println!(
        "use it with:       export FTVM_CONFIG={}",
        std::fs::canonicalize(&conf)?.display()
    );
    println!(
        "then start it:     ftvm coordinator --dir {}",
        cfg.dir.display()
    );
    Ok(0)
}

/// Runs the coordinator until killed.
pub fn run(cfg: Config) -> Result<u8> {
    let ca = Ca::load(&cfg.pki)?;
    let store = cfg.store.open(&cfg.dir)?;
    let where_ = cfg.store.describe(&cfg.dir);
    // One active coordinator per cluster: a second one waits here as a standby.
    let who = format!("{} pid {}", cfg.listen, std::process::id());
    let leader = store.lead(&who, &mut |holder| {
        tracing::info!("standby: the cluster in {where_} is led by {holder}; waiting for its lease")
    })?;
    let (cluster, version) = match store.get(STATE_KEY)? {
        Some((raw, v)) => (
            serde_json::from_slice(&raw).context("the stored cluster state")?,
            v,
        ),
        None => (Cluster::default(), 0),
    };
    let security = match store.get(SECURITY_KEY)? {
        Some((raw, v)) => (
            serde_json::from_slice::<Security>(&raw).context("the stored API tokens")?,
            v,
        ),
        None => bail!(
            "the cluster in {where_} has no API tokens: run `ftvm coordinator init` with the \
             same --dir (and --etcd) first"
        ),
    };
    // A coordinator that takes over (or restarts) gives every host a full timeout to report
    // before it calls any of them down.
    let mut cluster: Cluster = cluster;
    for h in cluster.hosts.values_mut() {
        h.last_seen_ms = now_ms();
    }
    let listener = std::net::TcpListener::bind(cfg.listen)
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    listener.set_nonblocking(true)?;
    let mut names = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    if !cfg.listen.ip().is_unspecified() {
        names.push(cfg.listen.ip().to_string());
    }
    names.extend(cfg.tls_names.iter().cloned());
    names.sort();
    names.dedup();
    let (chain, key) = ca.server_cert(&names)?;
    let tls = pki::server_tls(&ca.der, chain, key)?;
    tracing::info!(
        "listening on https://{}/api/v1 (certificate for {}), state in {where_}, datastores in {}",
        listener.local_addr()?,
        names.join(", "),
        cfg.dir.display()
    );
    let store: Arc<dyn Store> = Arc::from(store);
    let events =
        EventLog::open(store.clone(), cfg.event_retain).context("loading the cluster's events")?;
    let c = Arc::new(Coord {
        cfg,
        security: Mutex::new(security),
        ca,
        store,
        events,
        counters: Mutex::default(),
        leader,
        version: version.into(),
        cluster: Mutex::new(cluster),
        reports: Mutex::new(HashMap::new()),
        failing: Mutex::new(HashMap::new()),
        ds_beats: Mutex::new(HashMap::new()),
    });
    let c2 = c.clone();
    std::thread::Builder::new()
        .name("reconcile".into())
        .spawn(move || loop {
            if !c2.leader.held() {
                tracing::error!("lost the cluster lease; stopping so a standby can lead");
                std::process::exit(3);
            }
            if let Err(e) = c2.reconcile() {
                tracing::warn!("{e:#}");
            }
            std::thread::sleep(Duration::from_millis(100));
        })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        super::api::serve(listener, tls, super::api::router(c)).await
    })?;
    Ok(0)
}

fn valid_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 32
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        bail!("invalid name {name:?}: use 1-32 of a-z, 0-9 and -");
    }
    Ok(())
}

impl Coord {
    /// The Prometheus exposition of the cluster and its pairs.
    pub(super) fn metrics(&self) -> String {
        let c = self.cluster.lock().unwrap().clone();
        let reports = self.reports.lock().unwrap();
        super::metrics::render(&c, &reports, &self.counters.lock().unwrap())
    }

    /// Records `e` in the cluster's history and logs it (a store failure is logged: the
    /// event is not worth stopping the coordinator for).
    pub(super) fn event(&self, e: Event) {
        let subject = match (&e.vm, &e.host) {
            (Some(v), _) => format!("VM {v}: "),
            (None, Some(h)) => format!("host {h}: "),
            _ => String::new(),
        };
        let cause = e
            .cause
            .as_ref()
            .map_or(String::new(), |c| format!(" ({c})"));
        match e.severity {
            Severity::Info => {
                tracing::info!(kind = %e.kind, actor = %e.actor, "{subject}{}{cause}", e.message)
            }
            Severity::Warning => {
                tracing::warn!(kind = %e.kind, actor = %e.actor, "{subject}{}{cause}", e.message)
            }
            Severity::Error => {
                tracing::error!(kind = %e.kind, actor = %e.actor, "{subject}{}{cause}", e.message)
            }
        }
        self.counters.lock().unwrap().saw(&e);
        if let Err(err) = self.events.record(e) {
            tracing::warn!("recording an event failed: {err}");
        }
    }

    fn vm_dir(&self, vm: &str) -> PathBuf {
        self.cfg.dir.join("vms").join(vm)
    }

    /// Stores `cluster` (called with the cluster lock held, so saves are ordered).
    fn save(&self, cluster: &Cluster) -> Result<()> {
        use std::sync::atomic::Ordering;
        let v = self.version.load(Ordering::SeqCst);
        match self
            .store
            .cas(STATE_KEY, v, &serde_json::to_vec(cluster)?)?
        {
            Some(nv) => {
                self.version.store(nv, Ordering::SeqCst);
                Ok(())
            }
            None => {
                tracing::error!(
                    "the cluster state was changed by another coordinator; \
                     stopping"
                );
                std::process::exit(3);
            }
        }
    }

    pub(super) fn ca(&self) -> &Ca {
        &self.ca
    }

    /// A copy of the current tokens and host identities.
    pub(super) fn security(&self) -> Security {
        self.security.lock().unwrap().0.clone()
    }

    /// The (name, role) of the live API token `bearer`.
    pub(super) fn authenticate(&self, bearer: &str) -> Result<(String, Role), AuthError> {
        let g = self.security.lock().unwrap();
        g.0.authenticate(bearer).map(|t| (t.name.clone(), t.role))
    }

    /// Changes the tokens and host identities with `f` and stores them (test-and-set against
    /// the version this coordinator holds, as for the cluster state).
    pub(super) fn secure<T>(
        &self,
        f: impl FnOnce(&mut Security) -> Result<T, AuthError>,
    ) -> Result<T, AuthError> {
        let mut g = self.security.lock().unwrap();
        let mut next = g.0.clone();
        let out = f(&mut next)?;
        let raw = serde_json::to_vec(&next).expect("tokens serialize");
        // Called from the API's async handlers: the store may block (etcd runs its own
        // runtime), which an async worker must not do in place.
        let cas = || self.store.cas(SECURITY_KEY, g.1, &raw);
        let stored = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(cas)
            }
            _ => cas(),
        };
        match stored {
            Ok(Some(v)) => {
                *g = (next, v);
                Ok(out)
            }
            Ok(None) => {
                tracing::error!("the API tokens were changed by another coordinator; stopping");
                std::process::exit(3);
            }
            Err(e) => Err(AuthError::Conflict(format!(
                "storing the change failed: {e}"
            ))),
        }
    }

    fn ok(text: impl Into<String>) -> Result<Reply> {
        Ok(Reply::Ok { text: text.into() })
    }

    pub(super) fn handle(&self, req: Request) -> Result<Reply> {
        match req {
            Request::Heartbeat {
                version,
                host,
                ip,
                report,
            } => {
                if version != super::proto::REPORT_VERSION {
                    bail!(
                        "host {host} reports in version {version}; this coordinator reads version {}: run the same ftvm on every host",
                        super::proto::REPORT_VERSION
                    );
                }
                self.heartbeat(host, ip, report)
            }
            Request::VmCreate {
                name,
                guest,
                kernel,
                initrd,
                disk_mib,
                tap,
                mac,
                cmdline,
                vcpus,
                mem_mib,
                ft,
            } => {
                valid_name(&name)?;
                if let Some(t) = &tap {
                    if !vmm::devices::tap::valid_name(t) {
                        bail!("tap name {t:?}: 1 to 15 bytes, no NUL or '/'");
                    }
                }
                if mac.is_some() && tap.is_none() {
                    bail!("--mac needs --tap");
                }
                if guest.is_some() == kernel.is_some() {
                    bail!("give exactly one of --guest and --kernel");
                }
                if initrd.is_some() && kernel.is_none() {
                    bail!("--initrd needs --kernel");
                }
                if let Some(g) = &guest {
                    if guests::by_name(g).is_none() {
                        bail!("unknown guest {g:?} (see `ftvm guests`)");
                    }
                }
                if ft {
                    placement::check_ft_vcpus(vcpus, &self.cfg.limits)?;
                }
                vmm::check_vcpus(u32::from(vcpus))?;
                if mem_mib < 16 {
                    bail!("--mem-mib must be at least 16");
                }
                let mut c = self.cluster.lock().unwrap();
                if c.vms.contains_key(&name) {
                    bail!("a VM named {name} exists");
                }
                c.vms.insert(
                    name.clone(),
                    Vm {
                        name: name.clone(),
                        guest,
                        kernel,
                        initrd,
                        disk_mib,
                        disk_file: None,
                        tap,
                        mac,
                        cmdline,
                        vcpus,
                        mem_mib,
                        running: false,
                        ft: if ft { FtState::Starting } else { FtState::Off },
                        primary: None,
                        secondary: None,
                        last_failover: None,
                        ended: None,
                        failure: None,
                    },
                );
                self.save(&c)?;
                Self::ok(format!(
                    "created VM {name} ({vcpus} vCPUs, {mem_mib} MiB{})",
                    if ft { ", FT on" } else { "" }
                ))
            }
            Request::VmStart { name } => {
                self.update_vm(&name, |vm| {
                    if vm.running {
                        bail!("VM {name} is already running");
                    }
                    vm.running = true;
                    vm.ended = None;
                    vm.failure = None;
                    Ok(())
                })?;
                Self::ok(format!("starting VM {name}"))
            }
            Request::VmStop { name } => {
                self.update_vm(&name, |vm| {
                    vm.running = false;
                    vm.primary = None;
                    vm.secondary = None;
                    Ok(())
                })?;
                Self::ok(format!("stopped VM {name}"))
            }
            Request::VmList => {
                let c = self.cluster.lock().unwrap();
                let text = c
                    .vms
                    .values()
                    .map(|v| format!("{} {}", v.name, vm_state(v)))
                    .collect::<Vec<_>>()
                    .join("\n");
                Ok(Reply::Status {
                    json: serde_json::json!({ "vms": c.vms.values().collect::<Vec<_>>() }),
                    text,
                })
            }
            Request::Ft { name, action } => self.ft(&name, action),
            Request::Status { name } => self.status(name.as_deref()),
        }
    }

    fn heartbeat(&self, host: String, ip: String, report: Vec<ProcReport>) -> Result<Reply> {
        valid_name(&host)?;
        let mut reports = self.reports.lock().unwrap();
        // A process this host reported before and no longer does is gone (the agent was
        // restarted and lost it): never start it again, treat it as dead.
        let listed: Vec<u64> = report.iter().map(|r| r.id).collect();
        for (id, (h, r)) in reports.iter_mut() {
            if *h == host && !listed.contains(id) && r.running {
                r.running = false;
                r.exit = None;
                r.status = None;
            }
        }
        for r in report {
            reports.insert(r.id, (host.clone(), r));
        }
        let mut c = self.cluster.lock().unwrap();
        let known = c.hosts.contains_key(&host);
        c.hosts.insert(
            host.clone(),
            Host {
                name: host.clone(),
                ip,
                last_seen_ms: now_ms(),
                alive: true,
                ds_alive: true,
            },
        );
        if !known {
            self.event(
                Event::new(
                    Severity::Info,
                    "host.registered",
                    format!("registered at {}", c.hosts[&host].ip),
                )
                .host(&host)
                .actor(&format!("host:{host}")),
            );
            self.save(&c)?;
        }
        let procs = c
            .vms
            .values()
            .filter(|v| v.running)
            .flat_map(|v| [&v.primary, &v.secondary].map(|p| (v, p.clone())))
            .filter_map(|(v, p)| {
                let p = p?;
                (p.host == host).then(|| Assignment {
                    id: p.id,
                    vm: v.name.clone(),
                    argv: self.argv(&c, v, &p),
                    datastore: self.vm_dir(&v.name).display().to_string(),
                    start: !reports.contains_key(&p.id),
                })
            })
            .collect();
        Ok(Reply::Assignments {
            procs,
            heartbeat_file: Some(self.beat_file(&host).display().to_string()),
        })
    }

    /// The FT address a placed secondary listens on.
    fn secondary_addr(&self, c: &Cluster, s: &Option<Placement>) -> Option<String> {
        s.as_ref().map(|s| {
            let ip = c.hosts.get(&s.host).map_or("127.0.0.1", |h| h.ip.as_str());
            format!("{ip}:{}", s.port)
        })
    }

    /// Host `h`'s datastore heartbeat: a counter its agent rewrites every interval.
    fn beat_file(&self, h: &str) -> PathBuf {
        self.cfg.dir.join("hosts").join(format!("{h}.beat"))
    }

    /// The `ftvm` arguments of a placement: the secondary if it has a port, else the primary
    /// (with `--peer` when a secondary is placed).
    fn argv(&self, c: &Cluster, v: &Vm, p: &Placement) -> Vec<String> {
        let dir = self.vm_dir(&v.name);
        let ds = dir.display().to_string();
        let console = dir.join("console.txt").display().to_string();
        let ip = |h: &str| c.hosts.get(h).map_or("127.0.0.1".into(), |h| h.ip.clone());
        if p.port != 0 {
            let mut a: Vec<String> = vec![
                "secondary".into(),
                "--listen".into(),
                format!("{}:{}", ip(&p.host), p.port),
                "--datastore".into(),
                ds,
                "--serial-out".into(),
                console,
            ];
            if v.disk_mib.is_some() {
                let f = dir.join(disk_name(p.id));
                a.extend(["--disk".into(), f.display().to_string()]);
            }
            if let Some(t) = &v.tap {
                a.extend(["--tap".into(), t.clone()]);
            }
            return a;
        }
        let mut a: Vec<String> = Vec::new();
        let peer = v
            .secondary
            .as_ref()
            .map(|s| format!("{}:{}", ip(&s.host), s.port));
        // Every VM runs as an FT primary, protected or not: FT can then be turned on while it
        // runs (a primary without --peer runs untracked until a `peer` file names a secondary).
        a.push("primary".into());
        match (&v.guest, &v.kernel) {
            (Some(g), _) => a.extend(["--guest".into(), g.clone()]),
            (_, Some(k)) => a.extend(["--kernel".into(), k.clone()]),
            _ => {}
        }
        if let Some(i) = &v.initrd {
            a.extend(["--initrd".into(), i.clone()]);
        }
        if let Some(f) = &v.disk_file {
            a.extend(["--disk".into(), dir.join(f).display().to_string()]);
        }
        if let Some(t) = &v.tap {
            a.extend(["--tap".into(), t.clone()]);
            if let Some(m) = &v.mac {
                a.extend(["--mac".into(), m.clone()]);
            }
        }
        a.extend([
            "--cmdline".into(),
            v.cmdline.clone(),
            "--vcpus".into(),
            v.vcpus.to_string(),
            "--mem-mib".into(),
            v.mem_mib.to_string(),
            "--serial-out".into(),
            console,
        ]);
        if let Some(peer) = peer {
            a.extend(["--peer".into(), peer]);
        }
        a.extend(["--datastore".into(), ds]);
        a
    }

    /// A new process of `vm` on `host`. With a disk, the process's own disk copy is created
    /// in the VM's datastore directory (a first primary's becomes the VM's disk; a
    /// secondary's is filled by the sync).
    fn new_placement(
        &self,
        c: &mut Cluster,
        vm: &str,
        host: String,
        secondary: bool,
    ) -> Result<Placement> {
        let id = c.new_id();
        if let Some(mib) = c.vms.get(vm).and_then(|v| v.disk_mib) {
            let dir = self.vm_dir(vm);
            std::fs::create_dir_all(&dir)?;
            let v = c.vms.get_mut(vm).unwrap();
            if secondary || v.disk_file.is_none() {
                let f = std::fs::File::create(dir.join(disk_name(id)))?;
                f.set_len(mib << 20)?;
                if !secondary {
                    v.disk_file = Some(disk_name(id));
                }
            }
        }
        Ok(Placement {
            host,
            id,
            port: if secondary {
                port_for(self.cfg.ft_port_base, id)
            } else {
                0
            },
        })
    }

    /// Tells a primary reconnecting for a new secondary where it listens.
    fn publish_peer(&self, c: &Cluster, vm: &str, s: &Placement) -> Result<()> {
        let ip = c.hosts.get(&s.host).map_or("127.0.0.1", |h| h.ip.as_str());
        let dir = self.vm_dir(vm);
        std::fs::create_dir_all(&dir)?;
        coordinator::store::write_atomic(&dir.join("peer"), format!("{ip}:{}", s.port).as_bytes())?;
        Ok(())
    }

    /// One pass: host liveness, what the processes report, placement and respawn.
    fn reconcile(&self) -> Result<()> {
        let now = now_ms();
        let reports = self.reports.lock().unwrap().clone();
        let mut c = self.cluster.lock().unwrap();
        let before = c.clone();
        let timeout = self.cfg.host_timeout.as_millis() as u64;
        let mut beats = self.ds_beats.lock().unwrap();
        let mut changed = Vec::new();
        for h in c.hosts.values_mut() {
            let alive = now.saturating_sub(h.last_seen_ms) <= timeout;
            // The datastore heartbeat is fresh if its counter changed within the timeout, by
            // this coordinator's clock (host clocks need not agree).
            let beat = std::fs::read_to_string(self.beat_file(&h.name)).unwrap_or_default();
            let seen = beats.entry(h.name.clone()).or_insert((String::new(), now));
            if seen.0 != beat {
                *seen = (beat, now);
            }
            let ds_alive = now.saturating_sub(seen.1) <= timeout;
            let was = h.state();
            h.alive = alive;
            h.ds_alive = ds_alive;
            if h.state() != was {
                changed.push(
                    Event::new(
                        if h.state() == "up" {
                            Severity::Info
                        } else {
                            Severity::Warning
                        },
                        "host.state",
                        format!("{} (was {was})", h.state()),
                    )
                    .host(&h.name)
                    .cause(format!(
                        "network heartbeat {}, datastore heartbeat {}",
                        if alive { "fresh" } else { "missing" },
                        if ds_alive { "fresh" } else { "missing" },
                    ))
                    .details(serde_json::json!({
                        "state": h.state(), "was": was,
                        "network_heartbeat_age_ms": now.saturating_sub(h.last_seen_ms),
                        "datastore_heartbeat_age_ms": now.saturating_sub(seen.1),
                    })),
                );
            }
        }
        drop(beats);
        for e in changed {
            self.event(e);
        }
        let names: Vec<String> = c.vms.keys().cloned().collect();
        for name in names {
            self.reconcile_vm(&mut c, &name, &reports, now)?;
        }
        if *c != before {
            self.save(&c)?;
            self.collect_disk_copies(&c);
        }
        Ok(())
    }

    /// Deletes the disk copies no process of a VM uses any more (a replaced secondary's, the
    /// old primary's after a failover, the secondary's once the guest ended). The VM's disk —
    /// the copy its primary runs on, or ran on last — is always kept. Called with the cluster
    /// lock held, after the placements are recorded.
    fn collect_disk_copies(&self, c: &Cluster) {
        for (name, v) in &c.vms {
            if v.disk_mib.is_none() {
                continue;
            }
            let keep: Vec<String> = [&v.primary, &v.secondary]
                .into_iter()
                .flatten()
                .map(|p| disk_name(p.id))
                .chain(v.disk_file.clone())
                .collect();
            let Ok(dir) = std::fs::read_dir(self.vm_dir(name)) else {
                continue;
            };
            for e in dir.flatten() {
                let f = e.file_name().to_string_lossy().into_owned();
                if f.starts_with("disk-")
                    && f.ends_with(".img")
                    && !keep.contains(&f)
                    && std::fs::remove_file(e.path()).is_ok()
                {
                    tracing::info!(
                        "VM {name}: removed {f}, the disk copy of a process that is gone"
                    );
                }
            }
        }
    }

    fn reconcile_vm(
        &self,
        c: &mut Cluster,
        name: &str,
        reports: &HashMap<u64, (String, ProcReport)>,
        now: u64,
    ) -> Result<()> {
        let vm = c.vms[name].clone();
        if !vm.running {
            return Ok(());
        }
        let report =
            |p: &Option<Placement>| p.as_ref().and_then(|p| reports.get(&p.id)).map(|r| &r.1);
        // What the primary says of its pair with this secondary: Some(true) protected by it,
        // Some(false) it answers and is not, None it does not answer.
        let primary_says = report(&vm.primary)
            .and_then(|r| r.status.as_ref())
            .map(|st| {
                st.protected
                    && Some(st.peer.as_str()) == self.secondary_addr(c, &vm.secondary).as_deref()
            });
        let gone = |p: &Option<Placement>| {
            p.as_ref().is_some_and(|pl| {
                let h = c.hosts.get(&pl.host);
                secondary_gone(
                    h.is_none_or(|h| h.down()),
                    h.is_some_and(|h| !h.alive && h.ds_alive),
                    report(p).is_some_and(|r| !r.running),
                    primary_says,
                )
            })
        };
        let mut vm2 = vm.clone();
        // A secondary that took over reports itself as the primary.
        let took_over = report(&vm.secondary)
            .and_then(|r| r.status.as_ref())
            .is_some_and(|s| s.role == ctl::Role::Primary);
        if took_over {
            let s = vm.secondary.clone().unwrap();
            let status = report(&vm.secondary)
                .and_then(|r| r.status.clone())
                .unwrap_or_default();
            let asked = self.failing.lock().unwrap().remove(name);
            let at = asked
                .or_else(|| status.takeover.as_ref().map(|t| t.detected_us / 1000))
                .unwrap_or(now);
            let live = status.takeover.as_ref().map_or(now, |t| t.live_us / 1000);
            let from = vm.primary.as_ref().map_or("?".into(), |p| p.host.clone());
            let primary_host = c.hosts.get(&from).map(|h| h.state());
            let cause = match (asked, primary_host) {
                (Some(_), _) => "Test Failover".to_string(),
                (None, Some(st)) if st != "up" => format!("the primary's host {from} is {st}"),
                (None, _) => "the secondary lost its primary".to_string(),
            };
            self.event(
                Event::new(
                    Severity::Warning,
                    "vm.failover",
                    format!(
                        "failed over from {from} to {}: live after {} ms",
                        s.host,
                        live.saturating_sub(at)
                    ),
                )
                .vm(name)
                .host(&s.host)
                .cause(cause)
                .details(serde_json::json!({
                    "from": from,
                    "to": s.host,
                    "at_ms": at,
                    "live_after_ms": live.saturating_sub(at),
                    "takeover": status.takeover,
                })),
            );
            vm2.last_failover = Some(Failover {
                from,
                to: s.host.clone(),
                at_ms: at,
                live_after_ms: live.saturating_sub(at),
                protected_after_ms: None,
            });
            if vm2.disk_mib.is_some() {
                // The new primary runs on the secondary's disk copy.
                vm2.disk_file = Some(disk_name(s.id));
            }
            vm2.primary = Some(Placement { port: 0, ..s });
            vm2.secondary = None;
        } else if let Some(r) = report(&vm.primary).filter(|r| !r.running) {
            match r.exit {
                // ftvm failed (not the guest): the VM is over, and says why.
                // (A secondary that can take over does so: the failure was the primary's.)
                _ if r.failed.is_some() && (vm.secondary.is_none() || gone(&vm.secondary)) => {
                    let e = r.failed.clone().unwrap_or_default();
                    self.event(
                        Event::new(Severity::Error, "vm.failed", format!("ftvm failed: {e}"))
                            .vm(name)
                            .cause(e.clone()),
                    );
                    vm2.failure = Some(e);
                    vm2.ended = r.exit;
                    vm2.running = false;
                    vm2.primary = None;
                    vm2.secondary = None;
                }
                // The guest ended (or ftvm failed): the VM is over.
                Some(code) if code != i32::from(crate::ft::HALTED) => {
                    self.event(
                        Event::new(
                            if code == 0 {
                                Severity::Info
                            } else {
                                Severity::Warning
                            },
                            "vm.ended",
                            format!("ended (exit {code})"),
                        )
                        .vm(name)
                        .details(serde_json::json!({ "exit": code })),
                    );
                    vm2.ended = Some(code);
                    vm2.running = false;
                    vm2.primary = None;
                    vm2.secondary = None;
                }
                // Killed or halted: the secondary takes over by itself (it reports it).
                _ if vm.secondary.is_some() && !gone(&vm.secondary) => {}
                _ => {
                    self.event(
                        Event::new(
                            Severity::Error,
                            "vm.down",
                            "lost its primary with no secondary to take over; the VM is down",
                        )
                        .vm(name)
                        .cause(match r.exit {
                            Some(c) => format!("the primary halted (exit {c})"),
                            None => "the primary was killed or its host failed".into(),
                        }),
                    );
                    vm2.running = false;
                    vm2.primary = None;
                    vm2.secondary = None;
                    vm2.ft = FtState::NotProtected {
                        why: "the primary was lost with no synced secondary; the VM is down".into(),
                    };
                }
            }
        }
        // A primary on an unreachable host is left alone: the host may only be isolated or
        // cut off from the coordinator, with the VM still running there. Its secondary takes
        // over if the primary is really gone; the coordinator never starts another primary.
        if !took_over && gone(&vm2.secondary) {
            let why = vm2.secondary.as_ref().and_then(|p| {
                let h = c.hosts.get(&p.host)?;
                Some(if h.state() != "up" {
                    format!("its host {} is {}", p.host, h.state())
                } else {
                    format!("its process on {} ended", p.host)
                })
            });
            let mut e = Event::new(
                Severity::Warning,
                "vm.secondary-lost",
                "lost its secondary; placing a new one",
            )
            .vm(name);
            if let Some(why) = why {
                e = e.cause(why);
            }
            self.event(e);
            vm2.secondary = None;
        }
        c.vms.insert(name.to_string(), vm2.clone());
        if !vm2.running {
            return Ok(());
        }
        let wants_secondary = matches!(
            vm2.ft,
            FtState::Starting | FtState::Protected | FtState::NotProtected { .. }
        );
        if vm2.primary.is_none() {
            // First start: the primary's host, then (with FT) the secondary's, elsewhere.
            let host = match placement::place_primary(c, name) {
                Ok(h) => h,
                Err(e) => {
                    c.vms.get_mut(name).unwrap().ft = FtState::NotProtected { why: e.to_string() };
                    return Ok(());
                }
            };
            let p = self.new_placement(c, name, host, false)?;
            c.vms.get_mut(name).unwrap().primary = Some(p);
            if wants_secondary {
                match placement::place_secondary(c, name, &self.cfg.limits, &[]) {
                    Ok(h) => {
                        let s = self.new_placement(c, name, h, true)?;
                        let vm = c.vms.get_mut(name).unwrap();
                        vm.secondary = Some(s);
                        vm.ft = FtState::Starting;
                    }
                    Err(e) => {
                        // An FT VM does not start unprotected.
                        let vm = c.vms.get_mut(name).unwrap();
                        vm.primary = None;
                        vm.ft = FtState::NotProtected {
                            why: format!("{e}; the VM waits for a host"),
                        };
                    }
                }
            }
            return Ok(());
        }
        if wants_secondary && vm2.secondary.is_none() {
            match placement::place_secondary(c, name, &self.cfg.limits, &[]) {
                Ok(h) => {
                    let s = self.new_placement(c, name, h, true)?;
                    self.publish_peer(c, name, &s)?;
                    let vm = c.vms.get_mut(name).unwrap();
                    vm.secondary = Some(s);
                    vm.ft = FtState::Starting;
                }
                Err(e) => {
                    c.vms.get_mut(name).unwrap().ft = FtState::NotProtected { why: e.to_string() };
                }
            }
            return Ok(());
        }
        // Protected once the primary says so, with this secondary (after a partition the
        // primary may still be protected by an older one the coordinator had given up on).
        let primary_status = report(&vm2.primary)
            .and_then(|r| r.status.clone())
            .unwrap_or_default();
        let peer = self.secondary_addr(c, &vm2.secondary);
        let vm = c.vms.get_mut(name).unwrap();
        if vm.secondary.is_some() && matches!(vm.ft, FtState::Starting | FtState::Protected) {
            if primary_status.protected && Some(primary_status.peer.as_str()) == peer.as_deref() {
                let was = vm.ft.clone();
                vm.ft = FtState::Protected;
                let mut after_failover = None;
                if let Some(f) = vm
                    .last_failover
                    .as_mut()
                    .filter(|f| f.protected_after_ms.is_none())
                {
                    f.protected_after_ms = Some(now.saturating_sub(f.at_ms));
                    after_failover = Some(f.clone());
                }
                if was != FtState::Protected {
                    let secondary = vm.secondary.as_ref().map_or("?".into(), |p| p.host.clone());
                    let message = match &after_failover {
                        Some(f) => format!(
                            "protected again, secondary on {secondary}: {} ms after the failover",
                            f.protected_after_ms.unwrap_or(0)
                        ),
                        None => format!("protected, secondary on {secondary}"),
                    };
                    self.event(
                        Event::new(Severity::Info, "vm.protected", message)
                            .vm(name)
                            .host(&secondary)
                            .details(serde_json::json!({ "after_failover": after_failover })),
                    );
                }
            } else {
                vm.ft = FtState::Starting;
            }
        }
        Ok(())
    }

    /// The datastore of `vm` and its current placements (for FT operations).
    fn vm(&self, name: &str) -> Result<Vm> {
        self.cluster
            .lock()
            .unwrap()
            .vms
            .get(name)
            .cloned()
            .context(format!("no VM named {name}"))
    }

    /// Changes VM `name` with `f` and saves the cluster (nothing is saved if `f` refuses).
    fn update_vm(&self, name: &str, f: impl FnOnce(&mut Vm) -> Result<()>) -> Result<()> {
        let mut c = self.cluster.lock().unwrap();
        f(c.vms.get_mut(name).context(format!("no VM named {name}"))?)?;
        self.save(&c)
    }

    fn ft(&self, name: &str, action: FtAction) -> Result<Reply> {
        let vm = self.vm(name)?;
        let dir = self.vm_dir(name);
        if let (Some(code), false) = (vm.ended, action == FtAction::Off) {
            bail!(
                "VM {name} has ended (guest exit {code}): there is nothing to protect; \
                 `ftvm vm start {name}` runs it again"
            );
        }
        match action {
            FtAction::On => {
                placement::check_ft_vcpus(vm.vcpus, &self.cfg.limits)?;
                if vm.ft_on() && vm.ft != FtState::Suspended {
                    bail!("FT is already on for VM {name}");
                }
                // Refuse what cannot be placed now, naming the limit and the hosts.
                let mut trial = self.cluster.lock().unwrap().clone();
                if trial.vms[name].primary.is_none() {
                    let h = placement::place_primary(&trial, name)?;
                    let id = trial.new_id();
                    trial.vms.get_mut(name).unwrap().primary = Some(Placement {
                        host: h,
                        id,
                        port: 0,
                    });
                }
                placement::place_secondary(&trial, name, &self.cfg.limits, &[])?;
                self.update_vm(name, |v| {
                    v.ft = FtState::Starting;
                    Ok(())
                })?;
                Self::ok(format!("FT on for VM {name}: placing its secondary"))
            }
            FtAction::Off | FtAction::Suspend => {
                let off = action == FtAction::Off;
                if vm.secondary.is_some() {
                    let req = if off {
                        ctl::Request::FtOff
                    } else {
                        ctl::Request::Suspend
                    };
                    ctl::request(&dir, "primary", req)?;
                }
                self.update_vm(name, |v| {
                    v.ft = if off {
                        FtState::Off
                    } else {
                        FtState::Suspended
                    };
                    v.secondary = None;
                    Ok(())
                })?;
                Self::ok(format!(
                    "FT {} for VM {name}",
                    if off {
                        "off (secondary and its configuration removed)"
                    } else {
                        "suspended (the VM runs unprotected)"
                    }
                ))
            }
            FtAction::Resume => {
                if vm.ft != FtState::Suspended {
                    bail!("FT is not suspended for VM {name}");
                }
                self.update_vm(name, |v| {
                    v.ft = FtState::Starting;
                    Ok(())
                })?;
                Self::ok(format!("FT resumed for VM {name}: placing its secondary"))
            }
            FtAction::TestFailover => {
                if vm.ft != FtState::Protected {
                    bail!(
                        "VM {name} is not protected ({}); Test Failover needs a synced secondary",
                        vm_state(&vm)
                    );
                }
                self.failing.lock().unwrap().insert(name.into(), now_ms());
                ctl::request(&dir, "primary", ctl::Request::TestFailover)?;
                Self::ok(format!(
                    "failed the primary of VM {name} on {}",
                    vm.primary.as_ref().map_or("?", |p| p.host.as_str())
                ))
            }
            FtAction::TestRestartSecondary => {
                let s = vm
                    .secondary
                    .as_ref()
                    .context(format!("VM {name} has no secondary"))?;
                ctl::request(&dir, "secondary", ctl::Request::TestRestartSecondary)?;
                Self::ok(format!("failed the secondary of VM {name} on {}", s.host))
            }
            FtAction::MigrateSecondary { to } => {
                let s = vm
                    .secondary
                    .clone()
                    .context(format!("VM {name} has no secondary"))?;
                let mut c = self.cluster.lock().unwrap();
                let others: Vec<String> = c.hosts.keys().filter(|h| **h != to).cloned().collect();
                let avoid: Vec<&str> = others.iter().map(String::as_str).collect();
                if !c.hosts.contains_key(&to) {
                    bail!("no host named {to}");
                }
                let h = placement::place_secondary(&c, name, &self.cfg.limits, &avoid).map_err(
                    |e| anyhow::anyhow!("cannot move the secondary of VM {name} to {to}: {e}"),
                )?;
                let n = self.new_placement(&mut c, name, h, true)?;
                self.publish_peer(&c, name, &n)?;
                let v = c.vms.get_mut(name).unwrap();
                v.secondary = Some(n);
                v.ft = FtState::Starting;
                self.save(&c)?;
                Self::ok(format!(
                    "moving the secondary of VM {name} from {} to {to}",
                    s.host
                ))
            }
        }
    }

    fn status(&self, name: Option<&str>) -> Result<Reply> {
        let c = self.cluster.lock().unwrap().clone();
        let reports = self.reports.lock().unwrap().clone();
        if let Some(n) = name {
            if !c.vms.contains_key(n) {
                bail!("no VM named {n}");
            }
        }
        let mut text = String::new();
        let mut vms = Vec::new();
        for v in c.vms.values().filter(|v| name.is_none_or(|n| n == v.name)) {
            let st = |p: &Option<Placement>| {
                p.as_ref()
                    .and_then(|p| reports.get(&p.id))
                    .and_then(|r| r.1.status.clone())
            };
            let pst = st(&v.primary);
            let num =
                |f: fn(&ctl::Status) -> u64| pst.as_ref().map_or("-".into(), |s| f(s).to_string());
            text += &format!(
                "VM {}: {} | primary {} | secondary {} | epoch {} lag {} | FT link {}{}{}\n",
                v.name,
                vm_state(v),
                v.primary.as_ref().map_or("-", |p| p.host.as_str()),
                v.secondary.as_ref().map_or("-", |p| p.host.as_str()),
                num(|s| s.epoch),
                num(|s| s.lag_epochs),
                pst.as_ref().map_or("-".into(), |s| format!(
                    "{}/s",
                    bytesize::ByteSize(s.bytes_per_sec)
                )),
                v.disk_file
                    .as_ref()
                    .map_or(String::new(), |f| format!(" | disk {f}")),
                v.last_failover.as_ref().map_or(String::new(), |f| format!(
                    " | last failover {} -> {}: live after {} ms, protected after {}",
                    f.from,
                    f.to,
                    f.live_after_ms,
                    f.protected_after_ms
                        .map_or("-".into(), |ms| format!("{ms} ms"))
                )),
            );
            vms.push(serde_json::json!({
                "vm": v,
                "primary_status": st(&v.primary),
                "secondary_status": st(&v.secondary),
            }));
        }
        // One VM: its last failovers, from the history.
        if let Some(n) = name.filter(|n| c.vms.contains_key(*n)) {
            let failovers: Vec<Event> = self
                .events
                .query(&coordinator::events::Filter {
                    vm: Some(n.to_string()),
                    ..Default::default()
                })
                .into_iter()
                .filter(|e| e.kind == "vm.failover")
                .collect();
            for e in failovers.iter().rev().take(5) {
                text += &format!(
                    "  failover at {}: {}{}\n",
                    humantime::format_rfc3339_millis(
                        std::time::UNIX_EPOCH + Duration::from_millis(e.at_ms)
                    ),
                    e.message,
                    e.cause
                        .as_ref()
                        .map_or(String::new(), |c| format!(" (cause: {c})"))
                );
            }
            vms.iter_mut()
                .for_each(|v| v["failovers"] = serde_json::json!(failovers));
        }
        if name.is_none() {
            for h in c.hosts.values() {
                text += &format!(
                    "host {}: {} | {} secondaries (limit {}) | FT vCPUs {}\n",
                    h.name,
                    match h.state() {
                        "UNREACHABLE" =>
                            "UNREACHABLE (no network heartbeat, datastore heartbeat \
                                          fresh: isolated or partitioned)",
                        s => s,
                    },
                    c.secondaries_on(&h.name),
                    self.cfg.limits.max_secondaries_per_host,
                    c.ft_vcpus_on(&h.name)
                );
            }
        }
        Ok(Reply::Status {
            json: serde_json::json!({ "vms": vms, "hosts": c.hosts }),
            text: text.trim_end().to_string(),
        })
    }
}

/// Whether the coordinator gives up a VM's secondary (and places another): its host failed
/// (`down`: no network and no datastore heartbeat), its agent reports it `ended`, or its host
/// is only `unreachable` (isolated or partitioned, still running) and the primary, answering,
/// says the pair no longer protects the VM with it (`primary_says`: Some(true) protected by
/// this secondary). A secondary behind a partition that its primary still reaches is kept;
/// so is one whose primary does not answer (frozen, its own host unreachable, halting): that
/// secondary may be taking over, and giving it up would stop the VM's live primary.
fn secondary_gone(down: bool, unreachable: bool, ended: bool, primary_says: Option<bool>) -> bool {
    down || ended || (unreachable && primary_says == Some(false))
}

/// The disk copy of placement `id`, in its VM's datastore directory.
fn disk_name(id: u64) -> String {
    format!("disk-{id}.img")
}

/// The FT port of placement `id`: one of the (at most 20000) ports from `base` to 65535.
fn port_for(base: u16, id: u64) -> u16 {
    let span = (65_536 - u32::from(base)).min(20_000);
    base + (id % u64::from(span)) as u16
}

/// One word (and why) for a VM's state.
pub fn vm_state(v: &Vm) -> String {
    if let Some(e) = &v.failure {
        return format!("failed (ftvm: {e})");
    }
    if let Some(code) = v.ended {
        return format!("ended (exit {code})");
    }
    let run = if v.running { "running" } else { "stopped" };
    let ft = match &v.ft {
        FtState::Off => "FT off".to_string(),
        FtState::Starting => "FT on, starting (not protected yet)".to_string(),
        FtState::Protected => "protected".to_string(),
        FtState::NotProtected { why } => format!("not protected: {why}"),
        FtState::Suspended => "FT suspended (not protected)".to_string(),
    };
    format!("{run}, {ft}")
}

#[cfg(test)]
mod tests {
    use super::{port_for, secondary_gone};

    #[test]
    fn a_secondary_is_given_up_only_on_evidence() {
        // (down, unreachable, ended, primary_says) -> gone
        let cases = [
            ((true, false, false, None), true),        // its host failed
            ((false, false, true, Some(true)), true),  // its agent says it ended
            ((false, true, false, Some(false)), true), // cut off, and the primary moved on
            ((false, true, false, Some(true)), false), // cut off, the primary still reaches it
            // Cut off while the primary does not answer (frozen): it may be taking over.
            ((false, true, false, None), false),
            ((false, false, false, Some(false)), false), // reachable, starting
            ((false, false, false, None), false),
        ];
        for ((down, unreachable, ended, says), gone) in cases {
            assert_eq!(
                secondary_gone(down, unreachable, ended, says),
                gone,
                "down={down} unreachable={unreachable} ended={ended} primary_says={says:?}"
            );
        }
    }

    #[test]
    fn ports_stay_in_range_for_every_base() {
        for base in [1024u16, 47_000, 60_000, 65_535] {
            for id in (0..200_000u64).step_by(7) {
                assert!(port_for(base, id) >= base);
            }
        }
        assert_eq!(port_for(47_000, 1), 47_001);
        assert_eq!(port_for(65_535, 12_345), 65_535);
    }
}
