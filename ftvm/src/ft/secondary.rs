//! `ftvm secondary`: the driver of the standby. It receives the primary's stream into
//! [`ft_core::secondary::Secondary`], does what it says (disk copy writes, acknowledgements),
//! and when the primary is lost confirms with the datastore, takes over under the fence
//! ([`ft_core::datastore::take_over`]) and runs the VM on as the new primary.
use super::datastore::Datastore;
use super::link::{self, Lost, LostFlag};
use super::primary::{Primary, Start};
use super::sinks::{Console, HeldOutput};
use super::HALTED;
use super::{attach_disk, attach_net, instance, open_disk, open_tap, FtConfig, SecondaryConfig};
use crate::ctl::{self, Status};
use crate::now_us;
use anyhow::{anyhow, bail, Context, Result};
use ft_core::datastore::{Role as DsRole, Verdict};
use ft_core::secondary::{Action, Confirm, Exit, Takeover};
use ft_core::Standby;
use ft_log::Role;
use net::link::{Listener, Parts};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::persist::{decode_part, VmState};
use vmm::{DirtyTracking, Vmm};

/// How long a secondary waits for its primary to connect.
const PRIMARY_WAIT: Duration = Duration::from_secs(120);

/// This side's disk copy.
struct DiskCopy {
    path: PathBuf,
    file: std::fs::File,
}

impl DiskCopy {
    /// Replaces the copy by a new all-zero file of `size` bytes: written beside it and
    /// renamed over it, so that any process still holding the old file open (an earlier,
    /// paused secondary or primary) writes only to a file nobody reads any more.
    fn reset(&mut self, size: u64) -> Result<()> {
        let tmp = self.path.with_extension("new~");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .with_context(|| format!("creating the disk copy {}", tmp.display()))?;
        f.set_len(size).context("sizing the disk copy")?;
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("replacing the disk copy {}", self.path.display()))?;
        self.file = f;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(data, offset)
            .context("writing the secondary's disk copy")
    }
}

/// How the secondary's receive loop ended.
enum Received {
    PrimaryLost(Option<Lost>),
    Ended(Exit),
}

/// Runs the standby. Returns the guest's exit code (after a takeover, or when the primary
/// reports the guest ended), or [`HALTED`] if it lost the arbitration.
pub fn secondary(cfg: SecondaryConfig) -> Result<u8> {
    let ds = Datastore::open(&cfg.datastore, true)?;
    // How to start another secondary like this one (`ftvm ctl test-restart-secondary`).
    ds.record_secondary_command(&std::env::args().collect::<Vec<_>>())?;
    let rt = link::runtime()?;
    let link_cfg = link::link_config(&ds, "secondary", "primary", Duration::from_secs(120))?;
    let hello = link::hello(Role::Secondary, 0, 0);
    let listener = rt.block_on(async { Listener::bind(cfg.listen, &link_cfg) })?;
    eprintln!("ftvm secondary: listening on {}", listener.local_addr());
    let (link, peer, _) = rt
        .block_on(async { tokio::time::timeout(PRIMARY_WAIT, listener.accept(&hello)).await })
        .map_err(|_| anyhow!("no primary connected within {PRIMARY_WAIT:?}"))??;
    vmm::check_vcpus(u32::from(peer.vcpus))?;
    let mem = vmm::memory::create(peer.mem_mib).context("the primary's guest memory size")?;
    // Back the standby now, during the sync, rather than page by page as epochs land in it
    // (first-touch zeroing was measured the largest CPU cost of a secondary here, taken from
    // the core the guest shares; and vSphere FT too reserves a protected VM's memory in
    // full). Done before epoch 0 is acknowledged: a VM protected from boot starts only then.
    let mut backing = Some(
        std::thread::Builder::new()
            .name("standby-back".into())
            .spawn({
                let mem = mem.clone();
                move || vmm::memory::populate(&mem)
            })?,
    );
    let mut core = ft_core::secondary::Secondary::new(Default::default(), Standby::new(mem));
    let mut disk = match &cfg.disk {
        Some(p) => Some(DiskCopy {
            path: p.clone(),
            file: open_disk(p)?,
        }),
        None => None,
    };
    // Attached only at takeover (the standby must not take the tap's frames, and a new
    // secondary may start on the host where the primary holds the same tap); a name that can
    // never work is refused now.
    if let Some(name) = &cfg.tap {
        vmm::devices::tap::check(name).with_context(|| format!("cannot use --tap {name}"))?;
    }
    let status = Arc::new(Mutex::new(Status {
        role: ctl::Role::Secondary,
        protected: false,
        note: "syncing from the primary".into(),
        ..Default::default()
    }));
    ctl::serve(
        ctl::socket_path(ds.path(), "secondary"),
        status.clone(),
        Some(ctl::Request::TestRestartSecondary),
        None,
    )?;
    let Parts {
        mut log_tx,
        mut log_rx,
        hb_tx,
        hb_rx,
        control,
    } = link.into_parts();
    let lost = Arc::new(LostFlag::default());
    let synced = Arc::new(AtomicBool::new(false));
    link::spawn_heartbeats(
        &rt,
        hb_tx,
        hb_rx,
        lost.clone(),
        synced.clone(),
        cfg.detect,
        "primary",
    );
    // Receive and commit epochs until the primary is gone or the session ends.
    let outcome: Result<Received> = rt.block_on(async {
        let mut actions = Vec::new();
        loop {
            let rec = tokio::select! {
                r = log_rx.recv_record() => r,
                _ = wait_lost(&lost) => return Ok(Received::PrimaryLost(lost.get())),
            };
            let (e, r) = match rec {
                Ok(x) => x,
                Err(e) => {
                    return Ok(Received::PrimaryLost(Some(Lost::Closed(e.to_string()))));
                }
            };
            match core.handle_record(e, r, &mut actions) {
                Ok(Some(exit)) => return Ok(Received::Ended(exit)),
                Ok(None) => {}
                // A bad epoch from an authenticated primary means the stream can no longer
                // be trusted; the committed standby is intact. Leave the link: the primary
                // notices and keeps the guest (it wins the arbitration).
                Err(err) => {
                    eprintln!("ftvm secondary: {err}; leaving the FT link");
                    return Ok(Received::PrimaryLost(Some(Lost::Closed(err.to_string()))));
                }
            }
            for a in actions.drain(..) {
                match a {
                    Action::ResetDisk { .. } | Action::WriteDisk { .. } => {
                        if let Err(e) = apply_disk(&mut disk, a) {
                            eprintln!("ftvm secondary: {e:#}; leaving the FT link");
                            return Ok(Received::PrimaryLost(None));
                        }
                    }
                    Action::Ack(k) => {
                        if let Some(t) = backing.take() {
                            match t.join() {
                                Ok(Ok(())) => {}
                                Ok(Err(e)) => tracing::warn!("backing the standby: {e}"),
                                Err(_) => tracing::warn!("backing the standby panicked"),
                            }
                        }
                        synced.store(true, Ordering::SeqCst);
                        {
                            let mut st = status.lock().unwrap();
                            st.epoch = k;
                            st.events = core.standby().events_committed;
                            st.protected = true;
                            st.note.clear();
                        }
                        if log_tx.send_record(k, &ft_log::Record::Ack).await.is_err() {
                            return Ok(Received::PrimaryLost(lost.get()));
                        }
                    }
                }
            }
        }
    });
    let why = match outcome? {
        Received::Ended(Exit::Stopped) => {
            eprintln!(
                "ftvm secondary: the primary stopped replicating (suspend or FT off); exiting"
            );
            return Ok(0);
        }
        Received::Ended(Exit::GuestEnded(code)) => {
            eprintln!("ftvm secondary: the guest ended on the primary (exit {code})");
            return Ok(code);
        }
        Received::PrimaryLost(why) => why,
    };
    // Whatever ended the stream, end the link too, so a primary that is still alive learns
    // it now rather than after its heartbeat timeout.
    control.close("secondary left");
    let detected_us = now_us();
    let Some((session, plan, console, evidence)) =
        confirm_and_take_over(&mut core, &ds, &cfg, why)?
    else {
        return Ok(HALTED);
    };
    // Free the FT port (a new secondary may listen there) and the link before going live.
    drop((listener, log_tx, log_rx, control));
    drop(rt);
    takeover(
        core.into_standby(),
        plan,
        console,
        &cfg,
        ds,
        session,
        ctl::Takeover {
            detected_us,
            arbitrated_us: now_us(),
            live_us: 0,
            evidence,
        },
    )
}

/// The primary is lost (`why`): confirm with its datastore heartbeat, then arbitrate and —
/// under the same lock — write the committed output the console lacks. None: lost the
/// arbitration (halt). Every decision is the core's; the verdict is logged at warn with its
/// evidence.
fn confirm_and_take_over(
    core: &mut ft_core::secondary::Secondary,
    ds: &Datastore,
    cfg: &SecondaryConfig,
    why: Option<Lost>,
) -> Result<Option<(u64, Takeover, Console, String)>> {
    core.handle_lost(Instant::now(), why.as_ref().and_then(Lost::silence));
    // Give a primary that is still alive (its datastore heartbeat is fresh) the chance to
    // win the arbitration first.
    let session = loop {
        match core.confirm(
            Instant::now(),
            ds.heartbeat_age(DsRole::Primary),
            cfg.detect.timeout,
        ) {
            Confirm::Wait => std::thread::sleep(Duration::from_millis(10)),
            Confirm::Arbitrate { session } => break session,
            Confirm::NothingToTakeOver => bail!(
                "the primary was lost before the initial sync completed: {}; nothing to take over",
                why.map_or_else(|| "the link failed".into(), |w| w.to_string())
            ),
        }
    };
    // Under the lock: win the arbitration, measure the console, write what it lacks.
    let mut console = Console::open(cfg.serial_out.as_deref())?;
    let me = instance();
    let r = ft_core::datastore::take_over(ds, session, me, || -> Result<Takeover> {
        let plan = core.takeover(console.len())?;
        console
            .write(&plan.missing)
            .context("writing the committed output the console lacked")?;
        Ok(plan)
    })?;
    let verdict = match &r {
        Ok(_) => Verdict::Won,
        Err(v) => *v,
    };
    core.handle_arbitration(verdict);
    let ev = core.evidence().expect("confirmed");
    let evidence = format!(
        "primary lost: {}; its datastore heartbeat {} (waited {} ms for it); arbitration: {}",
        why.map_or_else(|| "the FT link failed".into(), |w| w.to_string()),
        ev.heartbeat_age.map_or("never written".into(), |a| format!(
            "{} ms old",
            a.as_millis()
        )),
        ev.confirmed_after.as_millis(),
        match verdict {
            Verdict::Won => "won: taking over",
            Verdict::Lost => "lost: the primary lives",
            Verdict::Superseded => "the session is over",
        }
    );
    tracing::warn!(session, ?verdict, "{evidence}");
    match r {
        Ok(plan) => Ok(Some((session, plan?, console, evidence))),
        Err(_) => {
            eprintln!(
                "ftvm secondary: lost the primary on the link but it won the arbitration; halting"
            );
            Ok(None)
        }
    }
}

/// Does a disk action of the core's on this side's copy.
fn apply_disk(disk: &mut Option<DiskCopy>, a: Action) -> Result<()> {
    let d = disk.as_mut().ok_or_else(no_disk)?;
    match a {
        Action::ResetDisk { size } => d.reset(size),
        Action::WriteDisk { offset, data } => d.write(offset, &data),
        Action::Ack(_) => Ok(()),
    }
}

fn no_disk() -> anyhow::Error {
    anyhow!("the primary's guest has a disk: start the secondary with --disk FILE (its own copy)")
}

async fn wait_lost(flag: &LostFlag) {
    while !flag.is_set() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Goes live on the last committed epoch, as the primary: the guest runs on unprotected
/// until a new secondary connects (at the datastore's `peer` address if one is named, else
/// at this side's own listening address), which then syncs and protection returns.
fn takeover(
    standby: Standby,
    plan: Takeover,
    console: Console,
    cfg: &SecondaryConfig,
    ds: Datastore,
    session: u64,
    // Its times so far and its evidence; `live_us` is set here.
    times: ctl::Takeover,
) -> Result<u8> {
    let epoch = plan.epoch;
    eprintln!("ftvm secondary: taking over at epoch {epoch}");
    drop(console);
    if let Some(code) = plan.exit {
        // The guest ended in the committed epoch: nothing to run, but the last epochs'
        // frames go out again (the old primary may not have sent them), through the fence.
        if let (Some(name), false) = (&cfg.tap, plan.resend.is_empty()) {
            let tap = open_tap(name)?;
            vmm::devices::tap::wait_running(name, Duration::from_secs(1));
            let (frames, _) = ft_log::frames::decode(&plan.resend);
            ft_core::datastore::fenced(&ds, session, instance(), || {
                for f in &frames {
                    vmm::devices::tap::write_frame(&tap, f);
                }
            })?;
        }
        return Ok(code);
    }
    let st = standby.state();
    let mut vcpus = Vec::new();
    for blob in st.vcpus.values() {
        vcpus.push(decode_part::<vmm::vstate::vcpu::VcpuState>(blob)?);
    }
    let part = |id| {
        st.devices
            .get(&id)
            .ok_or_else(|| anyhow!("committed state lacks device {id}"))
    };
    let vm = decode_part(part(ft_log::device::KVM)?)?;
    let devices = decode_part(part(ft_log::device::VMM)?)?;
    let mem_mib = vmm::layout::mem_mib_of(&vmm::memory::host_regions(standby.memory()));
    let vcpu_count = vcpus.len() as u8;
    let state = VmState {
        mem_mib,
        vcpus,
        vm,
        devices,
    };
    let held = HeldOutput::default();
    let mut vm = Vmm::from_state(
        standby.into_memory(),
        state,
        Box::new(held.clone()),
        DirtyTracking::Bitmap,
    )?;
    attach_disk(
        &mut vm,
        cfg.disk.as_deref(),
        "the guest has a disk but this secondary has none (--disk): cannot take over",
    )?;
    attach_net(
        &mut vm,
        cfg.tap.as_deref().map(open_tap).transpose()?,
        vmm::devices::virtio_net::DEFAULT_MAC,
        "the guest has a network device but this secondary has no --tap: cannot take over",
    )?;
    if let (Some((tap, mac)), Some(name)) = (vm.with_net(|n| (n.tap(), n.mac())), &cfg.tap) {
        announce(name, tap, mac);
    }
    // This process is the primary now: its control socket is the primary's.
    let _ = std::fs::remove_file(ctl::socket_path(ds.path(), "secondary"));
    let ds = Arc::new(ds);
    let link_cfg = link::link_config(&ds, "primary", "secondary", Duration::from_secs(5))?;
    let status = Status {
        role: ctl::Role::Primary,
        protected: false,
        note: format!("took over at epoch {epoch}; waiting for a new secondary"),
        epoch,
        takeover: Some(ctl::Takeover {
            live_us: now_us(),
            ..times
        }),
        ..Default::default()
    };
    let mut p = Primary::new(Start {
        cfg: FtConfig::after_takeover(cfg),
        rt: link::runtime()?,
        ds,
        vm,
        held,
        status,
        link_cfg,
        hello: link::hello(Role::Primary, vcpu_count, mem_mib),
        session,
        offsets: (plan.out_offset, plan.net_offset),
    })?;
    p.run_after_takeover(&plan.resend)
}

/// A new primary on a new host: tells the network where the guest's MAC is now (RARP, as
/// live migration does). The tap just attached is waited for first (up to a second): until
/// the kernel has brought it up its bridge drops what it sends, and a lost announcement
/// leaves the switch sending the guest's frames to the old host until the guest itself
/// talks — a client opening a connection would never get an answer. Then five
/// announcements, as QEMU makes: at once and after 50, 150, 300 and 500 ms.
fn announce(name: &str, tap: Arc<std::fs::File>, mac: [u8; 6]) {
    use vmm::devices::tap::{rarp_announce, wait_running, write_frame};
    let t = Instant::now();
    let up = wait_running(name, Duration::from_secs(1));
    let rarp = rarp_announce(mac);
    write_frame(&tap, &rarp);
    let mac = mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    if up {
        eprintln!(
            "ftvm secondary: announced MAC {mac} with RARP (tap {name} running after {} us)",
            t.elapsed().as_micros()
        );
    } else {
        tracing::warn!("tap {name} is not running after 1 s; announced MAC {mac} with RARP anyway (the switch may keep sending the guest's frames to the old host)");
    }
    let _ = std::thread::Builder::new()
        .name("announce".into())
        .spawn(move || {
            for gap in [50, 100, 150, 200] {
                std::thread::sleep(Duration::from_millis(gap));
                write_frame(&tap, &rarp);
            }
        });
}
