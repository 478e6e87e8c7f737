//! The FT link's driver: the QUIC connection ([`net`]), heartbeats both ways fed into the
//! core's failure detector ([`ft_core::detect`]), and the primary's acknowledgement reader.
use super::datastore::Datastore;
use super::Detect;
use crate::now_us;
use anyhow::{Context, Result};
use ft_core::detect::{Detector, Silence};
use ft_log::{Hello, Record, Role};
use net::link::Parts;
use net::LinkConfig;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// One attempt to reach a secondary (a handshake on a LAN takes milliseconds; nobody
/// listening would otherwise cost the whole QUIC idle timeout).
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The FT link's runtime: its threads run the QUIC connection and both heartbeat tasks, at
/// a raised priority (see [`raise_priority`]).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ft-net")
        .on_thread_start(raise_priority)
        .enable_all()
        .build()
        .context("starting the FT link runtime")
}

/// Raises the calling thread's scheduling priority (nice -10) where allowed (root, or
/// CAP_SYS_NICE): heartbeats must not queue behind the host's other work. Measured here
/// (`ftvm-bench detect`): with a workspace build and two spinners on 2 cores (load average
/// 7), heartbeats at normal priority arrived up to 80 ms apart and a healthy pair split.
/// Without the privilege the thread keeps its priority (said at debug level).
pub fn raise_priority() {
    // SAFETY: setpriority on this thread's own id changes only its scheduling.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, -10) };
    if r != 0 {
        tracing::debug!(
            "cannot raise the FT link thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// This side's link settings: its identity (created on first use) and the peer's certificate
/// (waited for, up to `wait`, until the peer has published it in the datastore).
pub fn link_config(ds: &Datastore, me: &str, peer: &str, wait: Duration) -> Result<LinkConfig> {
    Ok(LinkConfig {
        identity: net::Identity::load_or_create(&ds.keys(), me)?,
        peer_cert: ds.wait_for_cert(peer, wait)?,
        idle_timeout: Duration::from_secs(2),
        tuning: Default::default(),
    })
}

pub fn hello(role: Role, vcpus: u8, mem_mib: u64) -> Hello {
    Hello {
        min_version: ft_log::MIN_VERSION,
        max_version: ft_log::VERSION,
        role,
        vcpus,
        mem_mib,
        vm_id: [0; 16],
    }
}

/// Why the peer counts as lost.
#[derive(Debug, Clone)]
pub enum Lost {
    /// No heartbeat for longer than the detector's timeout.
    Silent(Silence),
    /// The link closed, failed, or carried something it must not.
    Closed(String),
}

impl Lost {
    pub fn silence(&self) -> Option<Silence> {
        match self {
            Lost::Silent(s) => Some(*s),
            Lost::Closed(_) => None,
        }
    }
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::Silent(s) => write!(
                f,
                "no heartbeat for {} ms (timeout {} ms, {} heartbeats before)",
                s.silent_for.as_millis(),
                s.timeout.as_millis(),
                s.beats
            ),
            Lost::Closed(why) => write!(f, "the FT link closed: {why}"),
        }
    }
}

/// Set once, by whichever task finds the peer lost first.
#[derive(Default)]
pub struct LostFlag(Mutex<Option<Lost>>);

impl LostFlag {
    pub fn set(&self, why: Lost) {
        let mut g = self.0.lock().unwrap();
        if g.is_none() {
            *g = Some(why);
        }
    }
    pub fn get(&self) -> Option<Lost> {
        self.0.lock().unwrap().clone()
    }
    pub fn is_set(&self) -> bool {
        self.0.lock().unwrap().is_some()
    }
}

/// Heartbeats both ways. The receiving task feeds the core's [`Detector`] (`synced`: epoch 0
/// is committed, detection at full speed) and sets `lost` with its evidence.
pub fn spawn_heartbeats(
    rt: &tokio::runtime::Runtime,
    mut tx: net::link::Sender,
    mut rx: net::link::Receiver,
    lost: Arc<LostFlag>,
    synced: Arc<AtomicBool>,
    detect: Detect,
    peer: &'static str,
) {
    rt.spawn(async move {
        let mut seq = 1;
        while tx.send_heartbeat(seq, now_us()).await.is_ok() {
            seq += 1;
            tokio::time::sleep(detect.interval()).await;
        }
    });
    rt.spawn(async move {
        let mut det = Detector::new(detect, Instant::now());
        let why = loop {
            if synced.load(Ordering::SeqCst) {
                det.set_synced();
            }
            let wait = det.deadline().saturating_duration_since(Instant::now());
            match rx.recv_heartbeat(wait.max(Duration::from_millis(1))).await {
                Ok(_) => det.heartbeat(Instant::now()),
                Err(net::Error::Timeout(_)) => {
                    if let Some(s) = det.check(Instant::now()) {
                        break Lost::Silent(s);
                    }
                }
                Err(e) => break Lost::Closed(e.to_string()),
            }
        };
        // Logged at warn by whoever acts on it (a normal end closes the link too).
        tracing::debug!("FT link: the {peer} is lost: {why}");
        lost.set(why);
    });
}

/// The primary's end of one protection session's link.
pub struct LinkSide {
    pub log_tx: net::link::Sender,
    pub acks: mpsc::Receiver<u64>,
    pub lost: Arc<LostFlag>,
    /// Set once the secondary has acknowledged epoch 0 (failure detection at full speed).
    pub synced: Arc<AtomicBool>,
    pub control: net::link::Control,
}

impl LinkSide {
    /// Starts heartbeats and the acknowledgement reader for an established link.
    pub fn attach(rt: &tokio::runtime::Runtime, link: net::Link, detect: Detect) -> Self {
        let Parts {
            log_tx,
            mut log_rx,
            hb_tx,
            hb_rx,
            control,
        } = link.into_parts();
        let lost = Arc::new(LostFlag::default());
        let synced = Arc::new(AtomicBool::new(false));
        spawn_heartbeats(
            rt,
            hb_tx,
            hb_rx,
            lost.clone(),
            synced.clone(),
            detect,
            "secondary",
        );
        let (ack_tx, acks) = mpsc::channel();
        let lost2 = lost.clone();
        rt.spawn(async move {
            let why = loop {
                match log_rx.recv_record().await {
                    Ok((epoch, Record::Ack)) => {
                        if ack_tx.send(epoch).is_err() {
                            return;
                        }
                    }
                    Ok((_, other)) => {
                        break format!("the secondary sent {:?}, not an Ack", other.kind())
                    }
                    Err(e) => break e.to_string(),
                }
            };
            lost2.set(Lost::Closed(why));
        });
        LinkSide {
            log_tx,
            acks,
            lost,
            synced,
            control,
        }
    }
}
