//! `ftvm primary`: the driver of the primary's side. It owns the VM, the link, the datastore
//! and the sinks; [`ft_core::primary::Primary`] decides (when an epoch closes, what is
//! held and released, when to throttle, when the sync is done, what a lost secondary or a
//! stop request means). Every output write passes the fence ([`super::sinks`]).
mod epochs;
mod sync;

use super::capture::{self, Capture};
use super::datastore::Datastore;
use super::link::{self, LinkSide, Lost, CONNECT_TIMEOUT};
use super::sinks::{Console, HeldOutput, Sinks};
use super::stats::Stats;
use super::{attach_disk, attach_net, instance, open_tap, FtConfig, PrimaryConfig, HALTED};
use crate::ctl::{self, Status};
use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use ft_core::datastore::{Name, Role as DsRole, Verdict};
use ft_core::encoder::PageEncoder;
use ft_core::primary::{Phase, Why};
use ft_log::Role;
use net::link::connect;
use net::LinkConfig;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::devices::events::EventLog;
use vmm::{DirtyTracking, VmConfig, Vmm};

/// How an unprotected phase ended.
enum Unprotected {
    Exited(u8),
    /// A secondary connected (at this address).
    NewSecondary(Box<(SocketAddr, net::Link)>),
    /// A write was fenced off: someone else owns the VM.
    Halted,
}

/// Runs a protected VM as the primary. Returns the guest's exit code.
pub fn primary(cfg: PrimaryConfig) -> Result<u8> {
    let ds = Arc::new(Datastore::open(&cfg.ft.datastore, true)?);
    let rt = link::runtime()?;
    let held = HeldOutput::default();
    let vm_cfg = VmConfig {
        dirty: DirtyTracking::Bitmap,
        ..cfg.vm
    };
    let mut vm =
        Vmm::boot(&vm_cfg, &cfg.boot, Box::new(held.clone())).context("cannot create the VM")?;
    // (Its writes are kept for the secondary once a sync starts: see `disk_copy_source`.)
    attach_disk(
        &mut vm,
        cfg.disk.as_deref(),
        "the guest has a disk: give --disk FILE",
    )?;
    if let Some(n) = &cfg.net {
        attach_net(&mut vm, Some(open_tap(&n.tap)?), n.mac, "")?;
    }
    let hello = link::hello(Role::Primary, vm_cfg.vcpus, vm_cfg.mem_mib);
    // This process starts a new protection session and owns it: any older process of this
    // datastore owns nothing from here on.
    let session = ds.new_session(instance())?;
    let mut cap = Capture::new(cfg.ft.epoch_copy, cfg.ft.tracking);
    // With a secondary named: its link (and tracking from boot); without one the guest runs
    // unprotected, owning the session, until a `peer` file names a secondary.
    let (link_cfg, link, status) = match cfg.ft.peer {
        None => {
            // The secondary's identity is made now (both sides share the datastore's keys),
            // so the link can be set up before any secondary has run.
            net::identity::Identity::load_or_create(&ds.keys(), "secondary")?;
            let link_cfg = link::link_config(&ds, "primary", "secondary", Duration::ZERO)?;
            let note = "FT off: running unprotected until a secondary is placed";
            (
                link_cfg,
                None,
                Status::unprotected_primary(note, String::new()),
            )
        }
        Some(peer) => {
            // Before connecting: backing guest memory takes longer than the link's failure
            // detection.
            if cfg.ft.tracking == super::Tracking::Chunks {
                if let Some((wp, pages)) = capture::track_from_boot(&vm)? {
                    cap.set_tracked_from_boot(wp, pages);
                }
            }
            let link_cfg = link::link_config(&ds, "primary", "secondary", Duration::from_secs(60))?;
            let link = connect_secondary(&rt, peer, &link_cfg, &hello)?;
            let status = Status::unprotected_primary("syncing the secondary", peer.to_string());
            (link_cfg, Some(link), status)
        }
    };
    let mut p = Primary::new(Start {
        cfg: cfg.ft,
        rt,
        ds,
        vm,
        held,
        status,
        link_cfg,
        hello,
        session,
        offsets: (0, 0),
    })?;
    p.cap = cap;
    match link {
        Some(link) => {
            p.start_session(session, link)?;
            p.run(true)
        }
        None => p.run(false),
    }
}

/// Connects to the secondary at `peer`, retrying for up to 30 s (it may still be starting).
fn connect_secondary(
    rt: &tokio::runtime::Runtime,
    peer: SocketAddr,
    link_cfg: &LinkConfig,
    hello: &ft_log::Hello,
) -> Result<net::Link> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = rt.block_on(async {
            tokio::time::timeout(CONNECT_TIMEOUT, connect(peer, link_cfg, hello))
                .await
                .unwrap_or_else(|_| Err(net::Error::NoConnection))
        });
        match attempt {
            Ok((link, _, _)) => return Ok(link),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("secondary not reachable yet: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e).context(format!("cannot reach the secondary at {peer}")),
        }
    }
}

/// What a primary driver starts from.
pub(super) struct Start {
    pub cfg: FtConfig,
    pub rt: tokio::runtime::Runtime,
    pub ds: Arc<Datastore>,
    /// The VM, its console going to `held`.
    pub vm: Vmm,
    pub held: HeldOutput,
    pub status: Status,
    pub link_cfg: LinkConfig,
    pub hello: ft_log::Hello,
    /// The protection session this process owns (it started it, or won it).
    pub session: u64,
    /// Where the console and network streams continue (0 unless after a takeover).
    pub offsets: (u64, u64),
}

pub(super) struct Primary {
    core: ft_core::primary::Primary,
    rt: tokio::runtime::Runtime,
    vm: Vmm,
    held: HeldOutput,
    /// The guest's device inputs, recorded for the log.
    events: Arc<EventLog>,
    pub(super) sinks: Sinks,
    /// The current secondary's link (none while running unprotected).
    link: Option<LinkSide>,
    link_cfg: LinkConfig,
    hello: ft_log::Hello,
    cfg: FtConfig,
    ds: Arc<Datastore>,
    me: &'static Name,
    /// `ftvm ctl suspend | ft-off`, forwarded by the control thread.
    requests: mpsc::Receiver<(ctl::Request, mpsc::Sender<ctl::Outcome>)>,
    /// The datastore heartbeat beats while set.
    beating: Arc<AtomicBool>,
    /// The reply to a stop request being carried out.
    stop_reply: Option<mpsc::Sender<ctl::Outcome>>,
    status: Arc<Mutex<Status>>,
    rate_mark: (Instant, u64),
    cap: Capture,
    stats: Stats,
    /// The encoded-frames buffer, reused (fresh memory page-faults, measured the largest
    /// single CPU cost of replication here).
    frames: BytesMut,
    started: Instant,
}

impl Primary {
    /// The primary role's machinery around a VM (see [`Start`]): control socket, datastore
    /// heartbeat, sinks, and the core owning the protection session with no secondary yet.
    pub(super) fn new(start: Start) -> Result<Self> {
        let Start {
            cfg,
            rt,
            ds,
            vm,
            held,
            status,
            link_cfg,
            hello,
            session,
            offsets,
        } = start;
        let status = Arc::new(Mutex::new(status));
        let (forward, requests) = mpsc::channel();
        ctl::serve(
            ctl::socket_path(ds.path(), "primary"),
            status.clone(),
            Some(ctl::Request::TestFailover),
            Some(forward),
        )?;
        let ds2 = ds.clone();
        let interval = cfg.detect.interval();
        let beating = Arc::new(AtomicBool::new(true));
        let beat = beating.clone();
        std::thread::Builder::new()
            .name("ds-heartbeat".into())
            .spawn(move || {
                link::raise_priority();
                let mut seq = 0;
                // Until this primary halts: a halted process is no evidence of a live one.
                while beat.load(Ordering::SeqCst) {
                    seq += 1;
                    if let Err(e) = ds2.touch_heartbeat(DsRole::Primary, seq) {
                        tracing::warn!("{e:#}");
                    }
                    std::thread::sleep(interval);
                }
            })?;
        let console = Console::open(cfg.serial_out.as_deref())?;
        let tap = vm.with_net(|n| n.tap());
        // Frames always wait in the device and leave through the fence, protected or not.
        vm.with_net(|n| n.hold_tx(true));
        let events = vm.events();
        events.set_recording(true);
        let core = ft_core::primary::Primary::new(
            cfg.core(),
            PageEncoder::new(cfg.page_encoding, page_hash_seed()),
            session,
            offsets.0,
            offsets.1,
        );
        Ok(Primary {
            core,
            rt,
            vm,
            held,
            events,
            sinks: Sinks { console, tap },
            link: None,
            link_cfg,
            hello,
            ds,
            me: instance(),
            requests,
            beating,
            stop_reply: None,
            status,
            rate_mark: (Instant::now(), 0),
            cap: Capture::new(cfg.epoch_copy, cfg.tracking),
            stats: Stats::default(),
            frames: BytesMut::new(),
            started: Instant::now(),
            cfg,
        })
    }

    fn link(&mut self) -> &mut LinkSide {
        self.link.as_mut().expect("a protection session has a link")
    }

    fn bytes_sent(&self) -> u64 {
        self.link
            .as_ref()
            .map_or(0, |l| l.control.stats().bytes_sent)
    }

    /// A protection session `session` (just started in the datastore by this process) with
    /// the secondary at the other end of `link`.
    fn start_session(&mut self, session: u64, link: net::Link) -> Result<()> {
        // Heartbeats first: starting the core's session backs the shadow of guest memory
        // (deltas), which takes longer than the secondary's detection allows.
        self.link = Some(LinkSide::attach(&self.rt, link, self.cfg.detect));
        self.core
            .start_session(session, vmm::memory::end(self.vm.memory()))?;
        Ok(())
    }

    /// Writes every output the core lets leave, through the fence. A refused write halts
    /// the core (the caller sees [`Phase::Halted`]).
    fn release(&mut self) -> Result<()> {
        while let Some(h) = self.core.poll_release() {
            if !self
                .sinks
                .write(&self.ds, self.core.session(), self.me, &h)?
            {
                eprintln!(
                    "ftvm primary: another process owns the VM now (this process's protection session {} is over or lost): fenced off; halting",
                    self.core.session()
                );
                self.core.handle_fenced();
                return Ok(());
            }
            if let (Some(e), Some(t)) = (h.epoch, h.since) {
                self.stats.holds.push((e, t.elapsed()));
            }
        }
        Ok(())
    }

    /// Takes the guest's console output and transmitted frames into the core.
    fn take_output(&mut self) -> ft_core::primary::Captured {
        let (output, since) = self.held.take_timed();
        let frames = self
            .vm
            .with_net(|n| Arc::new(n.take_tx()))
            .unwrap_or_default();
        self.core.hold(Bytes::from(output), frames, since)
    }

    /// The guest ended while unprotected: says so (every exit of a VMM is logged).
    fn guest_exited(&self, code: u8) -> u8 {
        eprintln!("ftvm primary: the guest exited with code {code}");
        code
    }

    /// Stops the VM after this process was fenced off or lost the arbitration.
    fn halt(&mut self) -> Result<u8> {
        self.beating.store(false, Ordering::SeqCst);
        if let Some(reply) = self.stop_reply.take() {
            let _ = reply.send(ctl::Outcome::Error(
                "the secondary went live meanwhile; this primary halts".into(),
            ));
        }
        self.vm.stop();
        Ok(HALTED)
    }

    /// The primary's life: protection sessions, and unprotected stretches between them.
    /// `protected`: a session with a secondary starts now (else the guest first runs
    /// unprotected, as after a takeover, until a secondary connects).
    pub(super) fn run(&mut self, protected: bool) -> Result<u8> {
        if !protected {
            match self.unprotected()? {
                Unprotected::Exited(code) => return Ok(self.guest_exited(code)),
                Unprotected::Halted => return self.halt(),
                Unprotected::NewSecondary(link) => self.reprotect(link.0, link.1)?,
            }
        }
        loop {
            self.protect()?;
            let (why, ended) = match self.core.phase() {
                Phase::Ended(code) => {
                    self.vm.stop();
                    self.print_summary();
                    return Ok(code);
                }
                Phase::Halted => return self.halt(),
                Phase::Arbitrating { why, ended } => (why, ended),
                p => bail!("internal: a protection session ended in phase {p:?}"),
            };
            // What the link saw, for the log (read before the link is closed).
            let evidence = self.link.as_ref().and_then(|l| l.lost.get());
            if let Why::SecondaryLost(_) = why {
                if let Some(l) = self.link.take() {
                    l.control.close("secondary lost");
                }
            }
            let _ = self.vm.pause();
            // Running unprotected requires winning the arbitration, whatever the reason: a
            // secondary that thinks the primary died (or missed a Stop) must lose it and halt.
            // (After a Stop the link stays open: closing it could discard the Stop in flight;
            // the secondary closes it when it leaves.)
            let verdict = self.ds.arbitrate(self.core.session(), self.me)?;
            self.log_arbitration(why, evidence, verdict);
            self.core.handle_arbitration(verdict);
            if verdict != Verdict::Won {
                eprintln!("ftvm primary: lost the secondary and the arbitration: the secondary is live; halting");
                return self.halt();
            }
            // Nobody else can show a different future now: release everything held.
            self.release()?;
            if self.core.phase() == Phase::Halted {
                return self.halt();
            }
            let note = match why {
                Why::SecondaryLost(_) => "secondary lost".to_string(),
                Why::Stop { off } => {
                    if off {
                        self.ds.forget_secondary()?;
                        "FT turned off on request".to_string()
                    } else {
                        "FT suspended on request".to_string()
                    }
                }
            };
            eprintln!("ftvm primary: {note}; running unprotected");
            {
                let mut st = self.status.lock().unwrap();
                st.protected = false;
                st.note = format!("{note}; running unprotected");
            }
            if let Some(reply) = self.stop_reply.take() {
                let _ = reply.send(ctl::Outcome::Done(format!(
                    "{note}; the VM runs unprotected"
                )));
            }
            if let Some(code) = ended {
                self.vm.stop();
                return Ok(self.guest_exited(code));
            }
            match self.unprotected()? {
                Unprotected::Exited(code) => return Ok(self.guest_exited(code)),
                Unprotected::Halted => return self.halt(),
                Unprotected::NewSecondary(link) => self.reprotect(link.0, link.1)?,
            }
        }
    }

    /// The evidence and outcome of an arbitration, at warn level when the secondary was lost.
    fn log_arbitration(&self, why: Why, lost: Option<Lost>, verdict: Verdict) {
        let evidence = match why {
            Why::Stop { off } => {
                tracing::info!(
                    session = self.core.session(),
                    ?verdict,
                    "arbitration after {}",
                    if off { "ft-off" } else { "suspend" }
                );
                return;
            }
            Why::SecondaryLost(_) => {
                lost.map_or_else(|| "the link failed".to_string(), |l| l.to_string())
            }
        };
        tracing::warn!(
            session = self.core.session(),
            ?verdict,
            "secondary lost ({evidence}); arbitration: {}",
            match verdict {
                Verdict::Won => "won, running on unprotected",
                Verdict::Lost => "lost to the secondary",
                Verdict::Superseded => "the session is over",
            }
        );
    }

    /// A new secondary connected: start a new protection session with it.
    fn reprotect(&mut self, peer: SocketAddr, link: net::Link) -> Result<()> {
        eprintln!("ftvm primary: a new secondary connected; re-protecting");
        let session = self.ds.new_session(self.me)?;
        self.start_session(session, link)?;
        let mut st = self.status.lock().unwrap();
        st.sessions += 1;
        st.peer = peer.to_string();
        st.note = "syncing the secondary".into();
        Ok(())
    }

    /// Runs the guest unprotected (output released at once, through the fence) while
    /// connecting to a new secondary in the background; returns when the guest ends, a
    /// secondary is back (with the guest paused), or a write is fenced off.
    fn unprotected(&mut self) -> Result<Unprotected> {
        let (tx, rx) = mpsc::channel();
        let (cfg, hello) = (self.link_cfg.clone(), self.hello.clone());
        let (default_peer, ds) = (self.cfg.peer, self.ds.clone());
        self.rt.spawn(async move {
            loop {
                // Whoever places secondaries may have named a new one's address.
                if let Some(peer) = ds.peer().or(default_peer) {
                    if let Ok(Ok((link, _, _))) =
                        tokio::time::timeout(CONNECT_TIMEOUT, connect(peer, &cfg, &hello)).await
                    {
                        let _ = tx.send(Box::new((peer, link)));
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        // Nothing to replicate: the guest runs without write tracking until the next sync,
        // and its disk writes are not kept.
        self.vm.set_dirty_logging(false)?;
        self.cap.stop();
        self.vm.with_disk(|d| d.keep_writes(false));
        self.vm.resume()?;
        loop {
            let ev = self.vm.wait_event(Some(Duration::from_micros(500)));
            self.take_output();
            self.release()?;
            if self.core.phase() == Phase::Halted {
                return Ok(Unprotected::Halted);
            }
            if let Some(ev) = ev {
                let code = self.vm.finish(ev)?;
                self.take_output();
                self.release()?;
                if self.core.phase() == Phase::Halted {
                    return Ok(Unprotected::Halted);
                }
                return Ok(Unprotected::Exited(code));
            }
            if let Ok(link) = rx.try_recv() {
                self.vm.pause()?;
                self.take_output();
                self.release()?;
                if self.core.phase() == Phase::Halted {
                    return Ok(Unprotected::Halted);
                }
                return Ok(Unprotected::NewSecondary(link));
            }
            if let Ok((req, reply)) = self.requests.try_recv() {
                let _ = reply.send(ctl::Outcome::Error(format!(
                    "{} needs FT on; the VM runs unprotected",
                    req.word()
                )));
            }
        }
    }

    fn print_summary(&self) {
        if let Some(path) = &self.cfg.epoch_stats {
            if let Err(e) = self.stats.write_csv(path) {
                eprintln!("ftvm primary: cannot write {}: {e}", path.display());
            }
        }
        eprintln!(
            "{}",
            self.stats.summary(
                self.started.elapsed().as_secs_f64(),
                self.bytes_sent(),
                self.core.pages_encoded()
            )
        );
    }

    fn update_status(&mut self, epoch: u64, pause: Duration) {
        let sent = self.bytes_sent();
        let (t, b) = self.rate_mark;
        let held = self.core.held_bytes();
        let mut st = self.status.lock().unwrap();
        st.epoch = epoch;
        st.lag_epochs = self.core.in_flight() as u64;
        st.bytes_sent = sent;
        st.last_pause_us = pause.as_micros() as u64;
        st.observe_pause(pause.as_micros() as u64);
        st.held_bytes = held;
        if t.elapsed() >= Duration::from_secs(1) {
            // A new link counts from 0 again: a rate across the change is not one.
            st.bytes_per_sec = (sent.saturating_sub(b) as f64 / t.elapsed().as_secs_f64()) as u64;
            self.rate_mark = (Instant::now(), sent);
        }
    }
}

/// A per-process random key for the page hashes (a guest cannot aim a collision at it).
fn page_hash_seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(crate::now_us())
}

impl Primary {
    /// After a takeover: sends the last committed epochs' frames again (`resend`, in stream
    /// form; the first output, through the fence), then runs the guest on unprotected.
    pub(super) fn run_after_takeover(&mut self, resend: &[u8]) -> Result<u8> {
        let (frames, _) = ft_log::frames::decode(resend);
        let held = ft_core::primary::Held {
            epoch: None,
            output: Bytes::new(),
            frames: Arc::new(frames.iter().map(|f| f.to_vec()).collect()),
            since: None,
        };
        if !self
            .sinks
            .write(&self.ds, self.core.session(), self.me, &held)?
        {
            self.core.handle_fenced();
            return self.halt();
        }
        if !held.frames.is_empty() {
            eprintln!(
                "ftvm secondary: sent the last committed epochs' {} frames again",
                held.frames.len()
            );
        }
        self.run(false)
    }
}
