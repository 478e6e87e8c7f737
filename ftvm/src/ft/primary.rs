//! `ftvm primary`: the driver of the primary's side. It owns the VM, the link, the datastore
//! and the sinks; [`ft_core::primary::Primary`] decides (when an epoch closes, what is
//! held and released, when to throttle, when the sync is done, what a lost secondary or a
//! stop request means). Every output write passes the fence ([`super::sinks`]).
use super::capture::{self, Capture};
use super::datastore::Datastore;
use super::link::{self, LinkSide, Lost, CONNECT_TIMEOUT};
use super::sinks::{Console, HeldOutput, Sinks};
use super::stats::{EpochStat, Stats};
use super::{attach_disk, attach_net, instance, open_tap, FtConfig, PrimaryConfig, HALTED};
use crate::ctl::{self, Status};
use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use ft_core::assemble::EpochParts;
use ft_core::datastore::{Name, Role as DsRole, Verdict};
use ft_core::encoder::PageEncoder;
use ft_core::primary::{Frames, Phase, Why};
use ft_log::Role;
use net::link::connect;
use net::LinkConfig;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::devices::events::EventLog;
use vmm::persist::{encode_part, VmState};
use vmm::{DirtyTracking, VmConfig, VmEvent, Vmm};

/// Pages read and sent at a time while the guest runs (pre-copy).
const PRECOPY_BATCH: usize = 1024;
/// Chunk of the full disk copy during a sync.
const DISK_CHUNK: usize = 1 << 20;

/// How an unprotected phase ended.
enum Unprotected {
    Exited(u8),
    /// A secondary connected (at this address).
    NewSecondary(Box<(SocketAddr, net::Link)>),
    /// A write was fenced off: someone else owns the VM.
    Halted,
}

/// One epoch as captured while the guest was paused.
struct Snapshot {
    epoch: u64,
    state: VmState,
    pages: Vec<u64>,
    data: capture::PageCopy,
    output: Bytes,
    /// Console-stream offset of `output`'s first byte.
    offset: u64,
    exit: Option<u8>,
    events: Vec<vmm::devices::events::DeviceEvent>,
    disk: Vec<vmm::devices::virtio_blk::DiskWrite>,
    /// The frames the guest transmitted in the epoch (None: the VM has no network device).
    net: Option<Frames>,
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
    let Some(peer) = cfg.ft.peer else {
        // No secondary yet: run unprotected, owning the session, until a `peer` file names
        // a secondary. The secondary's identity is made now (both sides share the
        // datastore's keys), so the link can be set up before any secondary has run.
        net::identity::Identity::load_or_create(&ds.keys(), "secondary")?;
        let link_cfg = link::link_config(&ds, "primary", "secondary", Duration::ZERO)?;
        let status = Status {
            role: "primary",
            protected: false,
            note: "FT off: running unprotected until a secondary is placed".into(),
            ..Default::default()
        };
        let mut p = Primary::new(cfg.ft, rt, ds, vm, held, status, link_cfg, hello, session)?;
        return p.run(false);
    };
    let mut cap = Capture::new(cfg.ft.epoch_copy, cfg.ft.tracking);
    // Before connecting: backing guest memory takes longer than the link's failure detection.
    if cfg.ft.tracking == super::Tracking::Chunks {
        if let Some((wp, pages)) = capture::track_from_boot(&vm)? {
            cap.set_tracked_from_boot(wp, pages);
        }
    }
    let link_cfg = link::link_config(&ds, "primary", "secondary", Duration::from_secs(60))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let link = loop {
        let attempt = rt.block_on(async {
            tokio::time::timeout(CONNECT_TIMEOUT, connect(peer, &link_cfg, &hello))
                .await
                .unwrap_or_else(|_| Err(net::Error::NoConnection))
        });
        match attempt {
            Ok((link, _, _)) => break link,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("secondary not reachable yet: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e).context(format!("cannot reach the secondary at {peer}")),
        }
    };
    let status = Status {
        role: "primary",
        protected: false,
        peer: peer.to_string(),
        note: "syncing the secondary".into(),
        ..Default::default()
    };
    let mut p = Primary::new(cfg.ft, rt, ds, vm, held, status, link_cfg, hello, session)?;
    p.cap = cap;
    p.start_session(session, link)?;
    p.run(true)
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
    requests: mpsc::Receiver<(ctl::Request, mpsc::Sender<String>)>,
    /// The reply to a stop request being carried out.
    stop_reply: Option<mpsc::Sender<String>>,
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
    /// The primary role's machinery around a VM whose console goes to `held`: control socket,
    /// datastore heartbeat, sinks, and the core owning protection session `session` with no
    /// secondary yet.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        cfg: FtConfig,
        rt: tokio::runtime::Runtime,
        ds: Arc<Datastore>,
        vm: Vmm,
        held: HeldOutput,
        status: Status,
        link_cfg: LinkConfig,
        hello: ft_log::Hello,
        session: u64,
    ) -> Result<Self> {
        Self::continuing(
            cfg,
            rt,
            ds,
            vm,
            held,
            status,
            link_cfg,
            hello,
            session,
            (0, 0),
        )
    }

    /// As [`Primary::new`], with the console and network streams continuing at `offsets`
    /// (after a takeover).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn continuing(
        cfg: FtConfig,
        rt: tokio::runtime::Runtime,
        ds: Arc<Datastore>,
        vm: Vmm,
        held: HeldOutput,
        status: Status,
        link_cfg: LinkConfig,
        hello: ft_log::Hello,
        session: u64,
        offsets: (u64, u64),
    ) -> Result<Self> {
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
        std::thread::Builder::new()
            .name("ds-heartbeat".into())
            .spawn(move || {
                for seq in 1.. {
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

    /// Stops the VM after this process was fenced off or lost the arbitration.
    fn halt(&mut self) -> Result<u8> {
        if let Some(reply) = self.stop_reply.take() {
            let _ =
                reply.send("error: the secondary went live meanwhile; this primary halts".into());
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
                Unprotected::Exited(code) => return Ok(code),
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
            self.log_arbitration(why, verdict);
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
                let _ = reply.send(format!("ok: {note}; the VM runs unprotected"));
            }
            if let Some(code) = ended {
                self.vm.stop();
                return Ok(code);
            }
            match self.unprotected()? {
                Unprotected::Exited(code) => return Ok(code),
                Unprotected::Halted => return self.halt(),
                Unprotected::NewSecondary(link) => self.reprotect(link.0, link.1)?,
            }
        }
    }

    /// The evidence and outcome of an arbitration, at warn level when the secondary was lost.
    fn log_arbitration(&self, why: Why, verdict: Verdict) {
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
            Why::SecondaryLost(_) => self
                .link
                .as_ref()
                .and_then(|l| l.lost.get())
                .map_or_else(|| "the link failed".to_string(), |l| l.to_string()),
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
                let _ = reply.send(format!(
                    "error: {} needs FT on; the VM runs unprotected",
                    req.word()
                ));
            }
        }
    }

    /// Whether transmitted frames wait in the device (an epoch then closes early).
    fn frames_waiting(&self) -> bool {
        self.sinks.tap.is_some() && self.vm.with_net(|n| n.held_tx() > 0).unwrap_or(false)
    }

    /// Acknowledgements that arrived (released as the core allows) and the link's state (a
    /// lost secondary moves the core to arbitration).
    fn poll_link(&mut self) -> Result<()> {
        let mut bad = None;
        while let Ok(k) = self.link().acks.try_recv() {
            if let Err(e) = self.core.handle_ack(k) {
                bad = Some(e);
                break;
            }
        }
        if let Some(e) = bad {
            self.link().lost.set(Lost::Closed(e.to_string()));
        }
        self.release()?;
        if let Some(why) = self.link().lost.get() {
            self.core.handle_lost(why.silence());
        }
        Ok(())
    }

    /// Waits up to 5 ms for an acknowledgement, then takes in whatever the link brought (see
    /// [`Primary::poll_link`]). Callers loop on the condition they wait for.
    fn wait_link(&mut self) -> Result<()> {
        if let Ok(k) = self.link().acks.recv_timeout(Duration::from_millis(5)) {
            if let Err(e) = self.core.handle_ack(k) {
                self.link().lost.set(Lost::Closed(e.to_string()));
            }
        }
        self.poll_link()
    }

    /// Sends encoded frames; a failure marks the secondary lost.
    fn send_owned(&mut self, b: Bytes, frames: u64) {
        let r = self.rt.block_on(
            self.link
                .as_mut()
                .unwrap()
                .log_tx
                .send_frames_owned(b, frames),
        );
        if let Err(e) = r {
            self.link().lost.set(Lost::Closed(format!("sending: {e}")));
        }
    }

    fn send_record(&mut self, epoch: u64, rec: &ft_log::Record) {
        let mut b = BytesMut::new();
        rec.encode(epoch, &mut b);
        self.send_owned(b.freeze(), 1);
    }

    /// Sends what the core encoded into the frames buffer.
    fn flush_frames(&mut self, frames: u64) {
        if frames > 0 {
            let b = self.frames.split().freeze();
            self.send_owned(b, frames);
        }
    }

    /// One protection session: pre-copy sync (epoch 0), then epochs, until the core leaves
    /// the protected phases (the guest ended and the secondary knows, the secondary is lost,
    /// a stop was requested, or a write was fenced off). Called with the guest paused.
    fn protect(&mut self) -> Result<()> {
        self.sync()?;
        for epoch in 1.. {
            if self.core.phase() != Phase::Protected {
                return self.drain();
            }
            // Run the epoch; the core says when it closes.
            let t0 = Instant::now();
            let mut ended = None;
            loop {
                if let Some(ev) = self.vm.wait_event(Some(Duration::from_micros(500))) {
                    ended = Some(ev);
                    break;
                }
                let waiting = !self.held.is_empty() || self.frames_waiting();
                if self
                    .core
                    .epoch_due(Instant::now(), t0, waiting, self.events.len())
                {
                    break;
                }
                self.poll_link()?;
                if self.core.phase() != Phase::Protected {
                    return Ok(());
                }
                if let Ok((req, reply)) = self.requests.try_recv() {
                    match self.core.request_stop(req == ctl::Request::FtOff) {
                        Ok(rec) => {
                            self.vm.pause()?;
                            // The secondary exits without taking over; the arbitration comes
                            // next. No close here: it could discard the Stop in flight.
                            self.send_record(0, &rec);
                            self.stop_reply = Some(reply);
                            return Ok(());
                        }
                        Err(e) => {
                            let _ = reply.send(format!("error: {e}"));
                        }
                    }
                }
            }
            let paused_at = Instant::now();
            self.vm.pause()?;
            let kick = paused_at.elapsed();
            let dirty = self.vm.dirty_pages()?.all();
            let harvest = paused_at.elapsed() - kick;
            let exit_code = match &ended {
                None => None,
                Some(VmEvent::Exit(c)) => Some(*c),
                Some(other) => bail!("guest stopped: {other:?}"),
            };
            let snap = self.snapshot(epoch, &dirty, exit_code)?;
            // Backpressure: with too many epochs unacknowledged the guest stays paused until
            // the secondary catches up, rather than the primary buffering without bound.
            let throttled_at = Instant::now();
            while self.core.throttled() && self.core.phase() == Phase::Protected {
                self.wait_link()?;
            }
            let throttle = throttled_at.elapsed();
            if self.core.phase() != Phase::Protected {
                // Lost while throttled: the epoch is held (released if the arbitration is
                // won) but never sent.
                if let Some(code) = exit_code {
                    self.core.guest_ended(code);
                }
                return Ok(());
            }
            if exit_code.is_none() {
                self.vm.resume()?;
            }
            let pause = paused_at.elapsed();
            let pages = snap.pages.len();
            let sent = self.stream(snap)?;
            self.stats.epochs.push(EpochStat {
                pause,
                pages,
                sent,
                kick,
                harvest,
                capture: self.cap.split.0,
                copy: self.cap.split.1,
                bg_copy: self.cap.bg_split.0,
                bg_faults: self.cap.bg_split.1,
                throttle,
            });
            self.update_status(epoch, pause);
            self.poll_link()?;
            if let Some(code) = exit_code {
                self.core.guest_ended(code);
            }
        }
        unreachable!()
    }

    /// The guest ended: once the secondary has acknowledged everything, tell it.
    fn drain(&mut self) -> Result<()> {
        loop {
            self.poll_link()?;
            if !matches!(self.core.phase(), Phase::Draining { .. }) {
                return Ok(());
            }
            if let Some((epoch, rec)) = self.core.poll_shutdown() {
                let link = self.link.as_mut().expect("a protection session has a link");
                let _ = self.rt.block_on(link.log_tx.send_record(epoch, &rec));
                return Ok(());
            }
            self.wait_link()?;
        }
    }

    /// For a sync: the guest's disk (a second handle), with write keeping switched on and
    /// the writes kept so far dropped (the full copy supersedes them). None without a disk.
    fn disk_copy_source(&mut self) -> Result<Option<std::fs::File>> {
        let f = self.vm.with_disk(|d| {
            d.keep_writes(true);
            drop(d.take_writes());
            d.disk().try_clone()
        });
        Ok(f.transpose()?)
    }

    /// Sends the disk's size and its contents as epoch-0 records (the core skips all-zero
    /// chunks: the secondary's copy starts all zeros). False if the secondary was lost.
    fn send_disk_copy(&mut self, disk: &std::fs::File) -> Result<bool> {
        use std::os::unix::fs::FileExt;
        let size = disk.metadata()?.len();
        let n = self.core.sync_disk_size(size, &mut self.frames);
        self.flush_frames(n);
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(DISK_CHUNK as u64) as usize;
            let mut data = vec![0u8; n];
            disk.read_exact_at(&mut data, off)
                .context("reading the disk for the secondary's copy")?;
            let frames = self
                .core
                .sync_disk_chunk(off, Bytes::from(data), &mut self.frames);
            self.flush_frames(frames);
            if self.link().lost.is_set() {
                return Ok(false);
            }
            off += n as u64;
            self.status.lock().unwrap().note = format!(
                "syncing the secondary: disk {} of {} MiB",
                off >> 20,
                size >> 20
            );
        }
        Ok(true)
    }

    /// Pre-copy sync of a new secondary, as epoch 0: every non-zero page is sent while the
    /// guest runs, then the pages it dirtied meanwhile, round after round, until the core
    /// says the rounds converged; those and the vCPU and device state go with the guest
    /// paused. Called with the guest paused; returns with epoch 0 acknowledged and the guest
    /// running, or with the core out of the sync (the secondary lost, the guest ended).
    fn sync(&mut self) -> Result<()> {
        let t0 = Instant::now();
        let from_boot = self.cap.tracked_from_boot.take();
        // A VM protected from boot (chunk tracking on since before its first instruction)
        // starts running only once its secondary holds epoch 0: there is nothing to chase,
        // and the secondary's setup does not share the cores with the guest's first epochs.
        let hold = from_boot.is_some();
        self.cap.choose_tracking(&self.vm, from_boot.is_some());
        // Chunk tracking starts once the guest runs (below), if it is not on since boot;
        // KVM's log would only cost.
        self.vm.set_dirty_logging(!self.cap.chunks)?;
        self.vm.dirty_pages()?; // a clean log: from here every guest write is seen
        self.cap.background_copy(&self.vm, true); // set up now, not in an epoch's pause
        let n = self.core.begin_sync(self.hello.vcpus, &mut self.frames);
        self.flush_frames(n);
        if !hold {
            self.vm.resume()?;
        }
        if self.cap.chunks && from_boot.is_none() && !self.cap.start_chunk_tracking(&self.vm) {
            // Refused: KVM's log from here (it starts clean, and nothing was read yet).
            self.cap.chunks = false;
            self.vm.set_dirty_logging(true)?;
        }
        let lost = |p: &mut Self| -> Result<()> {
            p.poll_link()?;
            p.core.handle_lost(None);
            Ok(())
        };
        if let Some(disk) = self.disk_copy_source()? {
            // The whole disk first, while the guest runs; writes it makes from here on are
            // kept and follow in the epoch, so the secondary's copy ends up exact.
            if !self.send_disk_copy(&disk)? {
                return lost(self);
            }
        }
        // Pages harvested (or found non-zero) and not sent yet. A page is read after the
        // harvest that reported it, so a write the read misses is reported by the next one.
        let mut todo = match from_boot {
            Some(pages) => pages,
            None => capture::all_nonzero_pages(self.vm.memory())?,
        };
        let mut ended = None;
        let mut rounds = 0;
        loop {
            rounds += 1;
            let mut sent_in_round = 0;
            for chunk in todo.chunks(PRECOPY_BATCH) {
                let data = capture::read_pages(self.vm.memory(), chunk)?;
                let (frames, sent) =
                    self.core
                        .precopy_pages(chunk, &data, self.cap.chunks, &mut self.frames);
                sent_in_round += sent;
                self.flush_frames(frames);
                if self.link().lost.is_set() {
                    return lost(self);
                }
                self.status.lock().unwrap().note = format!(
                    "syncing the secondary: round {rounds}, {} pages sent",
                    self.core.precopy_sent()
                );
            }
            if let Some(ev) = self.vm.wait_event(Some(Duration::ZERO)) {
                ended = Some(ev);
                break;
            }
            let dirty = self.vm.dirty_pages()?.all();
            todo = self.cap.take_written(&self.vm, dirty)?;
            if self
                .core
                .precopy_done(rounds, todo.len(), sent_in_round, self.cap.chunks)
            {
                break;
            }
        }
        let paused_at = Instant::now();
        self.vm.pause()?;
        todo.extend(self.vm.dirty_pages()?.all());
        todo.sort_unstable();
        todo.dedup();
        let exit_code = match &ended {
            None => None,
            Some(VmEvent::Exit(c)) => Some(*c),
            Some(other) => bail!("guest stopped: {other:?}"),
        };
        let snap = self.snapshot(0, &todo, exit_code)?;
        if exit_code.is_none() && !hold {
            self.vm.resume()?;
        }
        let pause = paused_at.elapsed();
        let pre_sent = self.core.precopy_sent();
        let paused_pages = snap.pages.len();
        let cut_sent = self.stream(snap)?;
        while self.core.phase() == Phase::Syncing {
            self.wait_link()?;
        }
        if self.core.phase() != Phase::Protected {
            if let Some(code) = exit_code {
                self.core.guest_ended(code);
            }
            return Ok(());
        }
        self.link().synced.store(true, Ordering::SeqCst);
        if exit_code.is_none() && hold {
            self.vm.resume()?;
        }
        eprintln!(
            "ftvm primary: secondary synced in {} ms: {rounds} pre-copy rounds sent {} pages while the guest ran, then {} pages with the guest paused for {} us ({} pages taken at the pause{})",
            t0.elapsed().as_millis(),
            pre_sent,
            cut_sent,
            pause.as_micros(),
            paused_pages,
            if self.cap.chunks { ", whole chunks, sent if changed" } else { "" }
        );
        self.stats.sync_pauses.push(pause);
        {
            let mut st = self.status.lock().unwrap();
            st.protected = true;
            st.note.clear();
        }
        if let Some(code) = exit_code {
            self.core.guest_ended(code);
        }
        Ok(())
    }

    /// With the vCPUs paused: captures epoch `epoch`'s state and pages and takes its output
    /// into the core (held from this moment). Everything slow (hashing, encoding, sending)
    /// happens later, in [`Primary::stream`], while the guest runs again.
    fn snapshot(&mut self, epoch: u64, pages: &[u64], exit: Option<u8>) -> Result<Snapshot> {
        let (state, pages, data) = self.cap.snapshot(&mut self.vm, pages, exit.is_none())?;
        let (output, since) = self.held.take_timed();
        let output = Bytes::from(output);
        let net = self.vm.with_net(|n| Arc::new(n.take_tx()));
        let captured = self
            .core
            .hold(output.clone(), net.clone().unwrap_or_default(), since);
        debug_assert_eq!(captured.epoch, Some(epoch));
        Ok(Snapshot {
            epoch,
            state,
            pages,
            data,
            output,
            offset: captured.offset,
            exit,
            events: self.events.take(),
            disk: self.vm.with_disk(|d| d.take_writes()).unwrap_or_default(),
            net,
        })
    }

    /// Streams a snapshot (guest running); its output is already held. Returns how many of
    /// its pages were sent.
    fn stream(&mut self, snap: Snapshot) -> Result<usize> {
        let Snapshot {
            epoch,
            state,
            pages,
            data,
            output,
            offset,
            exit,
            events,
            disk,
            net,
        } = snap;
        let data = self.cap.finish(data)?;
        let vcpus = state
            .vcpus
            .iter()
            .map(|v| Ok((v.id, Bytes::from(encode_part(v)?))))
            .collect::<Result<Vec<_>>>()?;
        let parts = EpochParts {
            epoch,
            pages: &pages,
            data: &data,
            changed_only: self.cap.chunks,
            vcpus: &vcpus,
            kvm: Bytes::from(encode_part(&state.vm)?),
            vmm: Bytes::from(encode_part(&state.devices)?),
            events: &events,
            exit,
            disk: disk
                .into_iter()
                .map(|w| (w.offset, Bytes::from(w.data)))
                .collect(),
            output,
            offset,
            frames: net.as_deref().map(Vec::as_slice),
        };
        self.frames.clear();
        let a = self.core.assemble(parts, &mut self.frames);
        self.status.lock().unwrap().events += events.len() as u64;
        self.flush_frames(a.frames);
        self.cap.recycle(data);
        Ok(a.pages)
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
        let mut st = self.status.lock().unwrap();
        st.epoch = epoch;
        st.lag_epochs = self.core.in_flight() as u64;
        st.bytes_sent = sent;
        st.last_pause_us = pause.as_micros() as u64;
        if t.elapsed() >= Duration::from_secs(1) {
            st.bytes_per_sec = ((sent - b) as f64 / t.elapsed().as_secs_f64()) as u64;
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
