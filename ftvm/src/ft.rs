//! `ftvm primary` and `ftvm secondary`: a protected pair.
//!
//! The primary runs the guest in epochs. At each epoch boundary it pauses the vCPUs, harvests
//! the dirty pages, captures vCPU and device state, takes the guest output the epoch produced,
//! write-protects the dirty pages ([`vmm::wp`]), resumes the guest, copies the pages (a guest
//! write to one not copied yet waits for its copy), and streams the epoch to the secondary.
//! That output is **held** until the secondary acknowledges the epoch (the output rule). The secondary ([`replay::Secondary`])
//! commits each epoch all-or-nothing into its standby memory and acknowledges it.
//!
//! When the secondary loses the primary (link heartbeats stop and the primary's datastore
//! heartbeat goes stale) it must win the datastore arbitration, then it takes over: it
//! releases exactly the committed output the outside world has not seen (comparing the
//! append-only `--serial-out` file's length with the committed output), and runs the VM on
//! from the last committed epoch. A primary that loses its secondary must win the same
//! arbitration to go on unprotected; the loser halts. Never two live copies.
//!
//! The guest's network device follows the same rule: frames it transmits are held with the
//! epoch and sent when the epoch is acknowledged (they also travel in the epoch, as output
//! stream [`ft_log::frames::NET_STREAM`], so a new primary sends the last committed epochs'
//! frames again: duplicates TCP discards, rather than frames lost); frames it receives are
//! recorded as input. After a takeover the new primary announces the guest's MAC (RARP) so
//! switches learn its new port.
use crate::ctl::{self, Status};
use crate::datastore::Datastore;
use crate::now_us;
use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use ft_log::frames::NET_STREAM;
use ft_log::page::{Delta, PageData, PageEntry, PAGE_SIZE};
use ft_log::record::{encode_pages, EpochEnd, EpochHasher};
use ft_log::{Hello, Record, Role};
use net::link::{connect, Listener, Parts};
use net::{Identity, LinkConfig};
use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::devices::events::{DeviceEvent, EventLog};
use vmm::persist::{decode_part, encode_part, VmState};
use vmm::{DirtyTracking, VmConfig, VmEvent, Vmm};

/// Failure detection: the peer counts as lost when its FT-link heartbeats have been missing
/// for `timeout`, and the primary's datastore heartbeat as stale when it is `timeout` old.
/// Both heartbeats beat six times per timeout. Give both sides the same value.
#[derive(Clone, Copy, Debug)]
pub struct Detect {
    pub timeout: Duration,
}

impl Detect {
    /// The default, chosen by measurement (README, Performance): no false detection in the
    /// benchmark runs under full page traffic, failover well under 100 ms.
    pub const DEFAULT_MS: u64 = 60;

    fn interval(&self) -> Duration {
        (self.timeout / 6).max(Duration::from_millis(1))
    }
}
/// The longest epoch by default (`ftvm primary --epoch-ms`), chosen by measurement
/// (`ftvm-bench ft`, README Performance): at 1 vCPU the compile-profile stand-in ran 1.07×
/// its unprotected time with 50 ms epochs and 1.21× with 20 ms, with output latency and
/// failover time unchanged (epochs close early when output waits).
pub const DEFAULT_EPOCH_MS: u64 = 50;
/// Epochs streamed but not yet acknowledged before the primary throttles the guest.
const MAX_IN_FLIGHT: usize = 4;
/// An epoch closes early once its guest has seen this many device inputs (bounds the
/// epoch's event records; a guest polling a port in a loop produces one per read).
const MAX_EPOCH_EVENTS: usize = 16 * 1024;
/// Pre-copy sync: rounds of pages sent while the guest runs end when at most this many pages
/// were dirtied during the last round (≈ 4 MiB: a few ms of pause to send with the state)…
const PRECOPY_DONE_PAGES: usize = 1024;
/// … or after this many rounds (a guest dirtying faster than the link drains never converges).
const PRECOPY_MAX_ROUNDS: usize = 8;
/// Pages read and sent at a time while the guest runs.
const PRECOPY_BATCH: usize = 1024;
/// Device-state ids in the FT log.
const DEV_KVM: u16 = 0;
const DEV_VMM: u16 = 1;
/// Present in an epoch when the guest ended in it; payload: the exit code.
const DEV_EXIT: u16 = 2;
/// The primary's disk size in bytes (u64 LE), sent with the full disk copy of a sync: the
/// secondary sizes its disk copy to it.
const DEV_DISK: u16 = 3;
/// Chunk of the full disk copy during a sync.
const DISK_CHUNK: usize = 1 << 20;
/// One attempt to reach a secondary (a handshake on a LAN takes milliseconds; nobody
/// listening would otherwise cost the whole QUIC idle timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a secondary waits for its primary to connect.
const PRIMARY_WAIT: Duration = Duration::from_secs(120);
/// Committed epochs whose transmitted frames a new primary sends again at takeover: every
/// epoch the old primary may not have released (it holds at most `MAX_IN_FLIGHT + 1`).
const RESEND_EPOCHS: usize = MAX_IN_FLIGHT + 2;
/// Exit status of a side that lost arbitration and halted.
pub const HALTED: u8 = 3;

/// A recorded device input as an FT-log event. The UART's interrupt belongs to no vCPU:
/// `vcpu` is [`NO_VCPU`] there.
fn log_event(seq: u32, e: &DeviceEvent) -> ft_log::Event {
    use ft_log::record::EventKind;
    let (vcpu, kind) = match *e {
        DeviceEvent::PioRead {
            vcpu,
            port,
            size,
            value,
        } => (vcpu, EventKind::PioRead { port, size, value }),
        DeviceEvent::MmioRead {
            vcpu,
            addr,
            size,
            value,
        } => (vcpu, EventKind::MmioRead { addr, size, value }),
        DeviceEvent::Interrupt { gsi } => (NO_VCPU, EventKind::Interrupt { gsi, level: true }),
        DeviceEvent::DeviceInput { device, ref data } => (
            NO_VCPU,
            EventKind::DeviceInput {
                device,
                data: Bytes::copy_from_slice(data),
            },
        ),
    };
    ft_log::Event { vcpu, seq, kind }
}

/// `Event::vcpu` of an event no vCPU caused.
const NO_VCPU: u8 = u8::MAX;

/// Reads the page at `gpa` of `mem`.
fn read_page(mem: &vmm::memory::GuestMemory, gpa: u64, out: &mut [u8]) -> Result<()> {
    vmm::memory::read_bytes(mem, gpa, out).map_err(|e| anyhow!("reading guest page {gpa:#x}: {e}"))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ft-net")
        .enable_all()
        .build()
        .context("starting the FT link runtime")
}

/// This side's link settings: its identity (created on first use) and the peer's certificate
/// (waited for, up to `wait`, until the peer has published it in the datastore).
fn link_config(ds: &Datastore, me: &str, peer: &str, wait: Duration) -> Result<LinkConfig> {
    Ok(LinkConfig {
        identity: Identity::load_or_create(&ds.keys(), me)?,
        peer_cert: ds.wait_for_cert(peer, wait)?,
        idle_timeout: Duration::from_secs(2),
        tuning: Default::default(),
    })
}

fn hello(role: Role, vcpus: u8, mem_mib: u64) -> Hello {
    Hello {
        min_version: ft_log::MIN_VERSION,
        max_version: ft_log::VERSION,
        role,
        vcpus,
        mem_mib,
        vm_id: [0; 16],
    }
}

/// Until the initial sync is done (epoch 0 committed), the peer counts as lost only after
/// this long without heartbeats (or `Detect::timeout` if longer). Nothing is protected yet, so
/// a quick verdict buys nothing, while both sides back memory in advance then (the standby,
/// the primary's shadow for deltas): measured here, that work on both of this host's two
/// cores at once now and then kept a heartbeat out past 60 ms and split the pair before it
/// was ever protected.
const SYNC_DETECT: Duration = Duration::from_secs(1);

/// Heartbeats both ways; `lost` is set when the peer's stop arriving (see [`SYNC_DETECT`]
/// for the time before `synced` is set).
fn spawn_heartbeats(
    rt: &tokio::runtime::Runtime,
    mut tx: net::link::Sender,
    mut rx: net::link::Receiver,
    lost: Arc<AtomicBool>,
    synced: Arc<AtomicBool>,
    detect: Detect,
) {
    rt.spawn(async move {
        let mut seq = 1;
        while tx.send_heartbeat(seq, now_us()).await.is_ok() {
            seq += 1;
            tokio::time::sleep(detect.interval()).await;
        }
    });
    rt.spawn(async move {
        loop {
            let timeout = if synced.load(Ordering::SeqCst) {
                detect.timeout
            } else {
                detect.timeout.max(SYNC_DETECT)
            };
            if rx.recv_heartbeat(timeout).await.is_err() {
                break;
            }
        }
        lost.store(true, Ordering::SeqCst);
    });
}

/// Guest console output collected by the serial device, held until released.
#[derive(Clone, Default)]
struct HeldOutput(Arc<Mutex<(Vec<u8>, Option<Instant>)>>);

impl Write for HeldOutput {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut g = self.0.lock().unwrap();
        if g.0.is_empty() && !b.is_empty() {
            g.1 = Some(Instant::now());
        }
        g.0.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl HeldOutput {
    fn take(&self) -> Vec<u8> {
        self.take_timed().0
    }
    /// The output, and when its first byte left the guest.
    fn take_timed(&self) -> (Vec<u8>, Option<Instant>) {
        let mut g = self.0.lock().unwrap();
        (std::mem::take(&mut g.0), g.1.take())
    }
    fn is_empty(&self) -> bool {
        self.0.lock().unwrap().0.is_empty()
    }
}

/// How dirty pages travel on the FT link (`ftvm primary --page-encoding`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PageEncoding {
    /// Whole pages (all-zero pages as a marker).
    Raw,
    /// XOR against the page as the secondary holds it, LZ4-compressed, when that is at most
    /// half a page; pages the secondary holds unchanged are not sent. Costs the primary a
    /// shadow of guest memory (as much memory again), backed when a session starts.
    #[default]
    XorLz4,
}

/// When an epoch's dirty pages are copied out (`ftvm primary --epoch-copy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum EpochCopy {
    /// After the guest resumes: the pages are write-protected in the pause and copied while
    /// the guest runs; a guest write to a page not copied yet waits until the dirty pages of
    /// its 2 MiB chunk are copied (userfaultfd, see [`vmm::wp`]). Falls back to `paused`
    /// where the kernel does not allow.
    #[default]
    Background,
    /// With the guest paused (~0.5 µs per page on this project's host).
    Paused,
}

/// How the primary finds the pages an epoch changed (`ftvm primary --dirty-tracking`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Tracking {
    /// Write protection of 2 MiB chunks (userfaultfd, see [`vmm::wp`]): each epoch copies
    /// every page of the chunks the guest wrote and sends those whose content changed since
    /// sent (told by the shadow with deltas, else by a 128-bit hash per page). Guest memory stays mapped in huge pages, and is fully
    /// backed while protected. Falls back to `dirty-log` where the kernel does not allow.
    #[default]
    Chunks,
    /// KVM's dirty log (4 KiB exact; KVM maps guest memory in 4 KiB pages while it logs,
    /// which is most of FT's overhead on this project's host).
    DirtyLog,
}

/// Chooses each page's wire encoding. For deltas it keeps a shadow of every page as the
/// secondary will hold it once the epochs sent so far commit: epochs commit in order, and a
/// discarded epoch ends the session (a new session starts from an empty shadow, and empty
/// hashes). With deltas it skips every page the shadow shows unchanged (XOR and the test in
/// one pass); with raw pages and chunk tracking, pages whose hash is unchanged (see
/// [`SentHashes`]).
#[derive(Default)]
struct PageEncoder {
    encoding: PageEncoding,
    /// Pages encoded so far (this process, all sessions).
    pages: u64,
    shadow: Shadow,
    delta: ft_log::page::DeltaEncoder,
    sent: SentHashes,
}

/// Every page as the secondary holds it, flat by page number (a page never sent is zeros, as
/// on the secondary). Allocated and backed at once, for all of guest memory, when a session
/// with deltas starts: filled page by page instead, its first-touch faults were measured the
/// largest CPU cost of a primary with deltas here.
#[derive(Default)]
struct Shadow(Vec<u8>);

impl Shadow {
    /// All zeros, `bytes` long, backed.
    fn reset(&mut self, bytes: usize) {
        if self.0.len() == bytes {
            self.0.fill(0);
        } else {
            // calloc: fresh zeroed memory, not written here.
            self.0 = vec![0; bytes];
        }
        if let Err(e) = vmm::memory::populate_buf(&mut self.0) {
            tracing::warn!("cannot back the shadow of guest memory in advance: {e}");
        }
    }

    fn page(&mut self, gpa: u64) -> &mut [u8] {
        let at = (gpa / PAGE_SIZE as u64) as usize * PAGE_SIZE;
        if at + PAGE_SIZE > self.0.len() {
            // Not met: the shadow covers all of guest memory.
            self.0.resize(at + PAGE_SIZE, 0);
        }
        &mut self.0[at..at + PAGE_SIZE]
    }
}

/// A keyed 128-bit hash (xxh3-128, seeded per process) of every page as the secondary will
/// hold it once the epochs sent so far commit, by page number; 0 for a page not sent this
/// session, which the secondary holds as zeros (each session's secondary starts from zeroed
/// memory, and the sync sends only non-zero pages). Chunk tracking copies whole 2 MiB
/// chunks; with raw pages only pages whose hash differs go on the link (deltas use the
/// shadow instead). 16 bytes per guest page (0.4 %).
struct SentHashes {
    seed: u64,
    /// The hash of a zero page.
    zero: u128,
    by_page: Vec<u128>,
}

impl Default for SentHashes {
    fn default() -> Self {
        use std::hash::BuildHasher;
        // A per-process random key: a guest cannot aim a collision at it.
        let seed = std::collections::hash_map::RandomState::new().hash_one(now_us());
        SentHashes {
            seed,
            zero: Self::hash(seed, &[0; PAGE_SIZE]),
            by_page: Vec::new(),
        }
    }
}

impl SentHashes {
    fn hash(seed: u64, page: &[u8]) -> u128 {
        xxhash_rust::xxh3::xxh3_128_with_seed(page, seed).max(1)
    }

    /// Whether `page` differs from what the secondary holds at `gpa`; records it as sent.
    fn changed(&mut self, gpa: u64, page: &[u8]) -> bool {
        let h = Self::hash(self.seed, page);
        let n = (gpa / PAGE_SIZE as u64) as usize;
        if n >= self.by_page.len() {
            self.by_page.resize(n + 1, 0);
        }
        let old = std::mem::replace(&mut self.by_page[n], h);
        h != if old == 0 { self.zero } else { old }
    }

    fn clear(&mut self) {
        self.by_page.clear();
    }
}

impl PageEncoder {
    /// One page's entry; None when the secondary already holds exactly this page (known
    /// with deltas, from the shadow). `delta_ok` is false when the page may already be in
    /// this epoch (the secondary applies a delta to its committed page, not to an earlier
    /// entry).
    fn entry(&mut self, gpa: u64, page: &Bytes, delta_ok: bool) -> Option<PageEntry> {
        if self.encoding == PageEncoding::Raw {
            let data = if vmm::memory::is_zero(page) {
                PageData::Zero
            } else {
                PageData::Raw(page.clone())
            };
            return Some(PageEntry { gpa, data });
        }
        let slot = self.shadow.page(gpa);
        let data = match self.delta.encode(page, slot, delta_ok) {
            Delta::Same => return None,
            Delta::Zero => PageData::Zero,
            Delta::XorLz4(b) => PageData::XorLz4(b),
            Delta::Raw => PageData::Raw(page.clone()),
        };
        slot.copy_from_slice(page);
        Some(PageEntry { gpa, data })
    }

    /// Entries for `pages` whose contents are `data` back to back, hashed into `hasher`.
    /// `changed_only`: only the pages that differ from what was sent (see [`SentHashes`];
    /// with deltas always so).
    fn entries(
        &mut self,
        pages: &[u64],
        data: &Bytes,
        hasher: &mut EpochHasher,
        delta_ok: bool,
        changed_only: bool,
    ) -> Vec<PageEntry> {
        let mut entries = Vec::with_capacity(pages.len());
        for (i, &gpa) in pages.iter().enumerate() {
            let page = data.slice(i * PAGE_SIZE..(i + 1) * PAGE_SIZE);
            // With deltas the shadow tells a changed page (`entry`); else the hashes do.
            if changed_only && self.encoding == PageEncoding::Raw && !self.sent.changed(gpa, &page)
            {
                continue;
            }
            let Some(entry) = self.entry(gpa, &page, delta_ok) else {
                continue;
            };
            hasher.add(gpa, &page);
            entries.push(entry);
        }
        self.pages += entries.len() as u64;
        entries
    }

    /// A new session: the secondary holds nothing sent before. `mem_end`: the end of guest
    /// memory.
    fn reset(&mut self, mem_end: u64) {
        if self.encoding == PageEncoding::XorLz4 {
            self.shadow.reset(mem_end as usize);
        }
        self.sent.clear();
    }
}

/// Pages in a 2 MiB chunk of chunk tracking.
const CHUNK_PAGES: usize = vmm::wp::CHUNK as usize / PAGE_SIZE;

/// Epoch 0 as sent so far by the pre-copy rounds.
struct Precopy {
    hasher: EpochHasher,
    pages: u32,
    /// Over the disk writes sent so far in this epoch (see `EpochEnd::page_hash`).
    disk: Option<EpochHasher>,
}

/// How a pre-copy sync ended.
enum Synced {
    /// Epoch 0 acknowledged; the guest runs.
    Running,
    /// The guest ended during the sync; epoch 0 (acknowledged) carries its exit.
    Exited(u8),
    Lost,
}

/// The FT log's sending side of the session's link (there is one while protected).
fn log_tx(link: &mut Option<LinkSide>) -> &mut net::link::Sender {
    &mut link
        .as_mut()
        .expect("a protection session has a link")
        .log_tx
}

/// The primary's end of one protection session's link.
struct LinkSide {
    log_tx: net::link::Sender,
    acks: mpsc::Receiver<u64>,
    lost: Arc<AtomicBool>,
    /// Set once the secondary has acknowledged epoch 0 (failure detection at full speed).
    synced: Arc<AtomicBool>,
    control: net::link::Control,
}

impl LinkSide {
    /// Starts heartbeats and the acknowledgement reader for an established link.
    fn attach(rt: &tokio::runtime::Runtime, link: net::Link, detect: Detect) -> Self {
        let Parts {
            log_tx,
            mut log_rx,
            hb_tx,
            hb_rx,
            control,
        } = link.into_parts();
        let lost = Arc::new(AtomicBool::new(false));
        let synced = Arc::new(AtomicBool::new(false));
        spawn_heartbeats(rt, hb_tx, hb_rx, lost.clone(), synced.clone(), detect);
        let (ack_tx, acks) = mpsc::channel();
        let lost2 = lost.clone();
        rt.spawn(async move {
            while let Ok((epoch, rec)) = log_rx.recv_record().await {
                if rec == Record::Ack && ack_tx.send(epoch).is_err() {
                    return;
                }
            }
            lost2.store(true, Ordering::SeqCst);
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

/// How a protected phase ended.
enum Protected {
    /// The guest exited; the secondary knows.
    Exited(u8),
    /// The secondary was lost; `Some(code)` if the guest had already exited.
    Lost(Option<u8>),
    /// Replication stopped on request (suspend, or FT off); the guest is paused.
    Stopped {
        off: bool,
        reply: mpsc::Sender<String>,
    },
}

/// How an unprotected phase ended.
enum Unprotected {
    Exited(u8),
    /// A secondary connected (at this address).
    NewSecondary(Box<(SocketAddr, net::Link)>),
}

/// One epoch as captured while the guest was paused.
struct Snapshot {
    epoch: u64,
    state: VmState,
    pages: Vec<u64>,
    /// The pages' contents, back to back (or being copied).
    data: PageCopy,
    output: Bytes,
    /// Console-stream offset of `output`'s first byte.
    offset: u64,
    exit: Option<u8>,
    /// The device inputs the guest saw during the epoch, in order.
    events: Vec<DeviceEvent>,
    /// The guest's disk writes during the epoch, in order.
    disk: Vec<vmm::devices::virtio_blk::DiskWrite>,
    /// The frames the guest transmitted in the epoch (None: the VM has no network device),
    /// shared with the epoch's [`Held`] entry.
    net: Option<Arc<Vec<Vec<u8>>>>,
}

/// An epoch's page contents: copied in the pause, or protected and copied after it.
enum PageCopy {
    Copied(Bytes),
    Copying(vmm::wp::Copying),
}

/// Where one epoch's pause went.
struct EpochStat {
    pause: Duration,
    /// Pages taken at the pause (with chunk tracking every page of each written chunk).
    pages: usize,
    /// Pages sent: those whose content changed (all taken pages with raw pages and the dirty
    /// log).
    sent: usize,
    /// Stopping the vCPUs.
    kick: Duration,
    /// Reading and clearing the dirty log.
    harvest: Duration,
    /// vCPU and device state, with `copy` running beside it (from the same start).
    capture: Duration,
    /// Copying the dirty pages out (`--epoch-copy paused`) or write-protecting them
    /// (`background`), from the start of the capture.
    copy: Duration,
    /// With `--epoch-copy background`: copying the pages after the guest resumed, and the
    /// guest writes that had to wait for a page's copy meanwhile.
    bg_copy: Duration,
    bg_faults: u64,
    /// Part of the pause spent waiting for the secondary (backpressure: more than
    /// `MAX_IN_FLIGHT` epochs unacknowledged).
    throttle: Duration,
}

/// One epoch's output, held until the secondary acknowledges the epoch.
struct Held {
    epoch: u64,
    output: Bytes,
    /// Network frames the guest transmitted in the epoch.
    frames: Arc<Vec<Vec<u8>>>,
    /// When its first byte left the guest (for the output-latency statistics).
    since: Option<Instant>,
}

/// Settings of `ftvm primary`.
pub struct PrimaryConfig {
    pub vm: VmConfig,
    pub boot: vmm::BootSource,
    pub ft: FtConfig,
    /// The guest's disk (virtio-blk); the secondary keeps its own copy.
    pub disk: Option<PathBuf>,
    /// The guest's network device (virtio-net on a tap).
    pub net: Option<NetConfig>,
}

/// A VM's network device: the host tap it is attached to, and its MAC.
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub tap: String,
    pub mac: [u8; 6],
}

/// How a primary replicates (also what a secondary uses once it has taken over).
#[derive(Clone, Debug)]
pub struct FtConfig {
    /// Where the secondary listens. A `peer` file in the datastore (written by whoever places
    /// secondaries) overrides it when reconnecting. None: the guest starts unprotected and a
    /// secondary is connected only once a `peer` file names one (FT turned on later).
    pub peer: Option<SocketAddr>,
    pub datastore: PathBuf,
    pub serial_out: Option<PathBuf>,
    pub epoch: Duration,
    pub min_epoch: Duration,
    pub detect: Detect,
    pub page_encoding: PageEncoding,
    pub epoch_copy: EpochCopy,
    pub tracking: Tracking,
    /// Write per-epoch statistics here (CSV) when the guest ends.
    pub epoch_stats: Option<PathBuf>,
}

impl FtConfig {
    /// The defaults of `ftvm primary`, for a secondary that becomes the primary.
    fn after_takeover(cfg: &SecondaryConfig) -> Self {
        FtConfig {
            peer: Some(cfg.listen),
            datastore: cfg.datastore.clone(),
            serial_out: cfg.serial_out.clone(),
            epoch: Duration::from_millis(DEFAULT_EPOCH_MS),
            min_epoch: Duration::from_millis(2),
            detect: cfg.detect,
            page_encoding: PageEncoding::default(),
            epoch_copy: EpochCopy::default(),
            tracking: Tracking::default(),
            epoch_stats: None,
        }
    }
}

/// A process-unique name for arbitration.
fn instance() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| format!("{}-{}", std::process::id(), now_us()))
}

struct Primary {
    rt: tokio::runtime::Runtime,
    vm: Vmm,
    held: HeldOutput,
    /// The guest's device inputs, recorded for the log.
    events: Arc<EventLog>,
    out: Box<dyn Write + Send>,
    /// The current secondary's link (none while running unprotected after a takeover).
    link: Option<LinkSide>,
    /// The protection session this primary runs (see [`Datastore::arbitrate`]).
    session: u64,
    link_cfg: LinkConfig,
    hello: Hello,
    cfg: FtConfig,
    /// `ftvm ctl suspend | ft-off`, forwarded by the control thread.
    requests: mpsc::Receiver<(ctl::Request, mpsc::Sender<String>)>,
    /// (epoch, output) taken from the guest and not yet released: held until the secondary
    /// acknowledges the epoch.
    pending: VecDeque<Held>,
    out_offset: u64,
    /// Network frame stream offset (see [`ft_log::frames`]).
    net_offset: u64,
    /// The guest's tap, for releasing held frames.
    tap: Option<Arc<std::fs::File>>,
    ds: Arc<Datastore>,
    status: Arc<Mutex<Status>>,
    rate_mark: (Instant, u64),
    /// Per epoch, for the exit summary and `--epoch-stats`.
    epochs: Vec<EpochStat>,
    /// (state capture, page copy or protection) of the last snapshot.
    split: (Duration, Duration),
    /// (copy after the pause, write faults it served) of the last streamed epoch.
    bg_split: (Duration, u64),
    /// Write protection for `--epoch-copy background` and chunk tracking: None until first
    /// needed, then Err when the kernel refused it (said once; epochs then copy in the pause
    /// and track with KVM's dirty log).
    wp: Option<std::result::Result<vmm::wp::BackgroundCopy, ()>>,
    /// This protection session tracks writes in 2 MiB chunks (`wp`), not KVM's dirty log.
    chunks: bool,
    /// Chunk tracking started before the guest first ran: the non-zero pages then. The
    /// first sync starts from these and the chunks written since, instead of reading all
    /// of guest memory.
    tracked_from_boot: Option<Vec<u64>>,
    /// The last snapshot's page buffer and frame buffer, for reuse.
    spare: Vec<u8>,
    /// A page buffer outgrown in the last pause, freed once the guest runs again (freeing
    /// a large buffer unmaps it: measured up to 2 ms of a pause when it was freed there).
    retired: Vec<u8>,
    frames: BytesMut,
    /// The guest's pause at the end of each pre-copy sync.
    sync_pauses: Vec<Duration>,
    /// Per released epoch with output: how long its first byte was held (the latency the
    /// output rule adds).
    holds: Vec<(u64, Duration)>,
    encoder: PageEncoder,
    started: Instant,
}

/// Runs a protected VM as the primary. Returns the guest's exit code.
pub fn primary(cfg: PrimaryConfig) -> Result<u8> {
    let ds = Arc::new(Datastore::open(&cfg.ft.datastore)?);
    let session = ds.new_session()?;
    let rt = runtime()?;
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
    let hello = hello(Role::Primary, vm_cfg.vcpus, vm_cfg.mem_mib);
    let Some(peer) = cfg.ft.peer else {
        // No secondary yet: run unprotected (untracked, output released at once), holding
        // this session's arbitration, until a `peer` file names a secondary.
        // The secondary's identity is made now (both sides share the datastore's keys), so
        // the link can be set up before any secondary has run.
        net::identity::Identity::load_or_create(&ds.keys(), "secondary")?;
        let link_cfg = link_config(&ds, "primary", "secondary", Duration::ZERO)?;
        if !ds.arbitrate(session, instance())? {
            bail!("another process holds this datastore's new protection session");
        }
        let status = Arc::new(Mutex::new(Status {
            role: "primary",
            protected: false,
            note: "FT off: running unprotected until a secondary is placed".into(),
            ..Default::default()
        }));
        let mut p = Primary::new(cfg.ft, rt, ds, vm, held, status, link_cfg, hello, 0)?;
        p.session = session;
        return p.run(false);
    };
    // Before connecting: backing guest memory takes longer than the link's failure detection.
    let boot_tracking = if cfg.ft.tracking == Tracking::Chunks {
        track_from_boot(&vm)?
    } else {
        None
    };
    let link_cfg = link_config(&ds, "primary", "secondary", Duration::from_secs(60))?;
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
    let status = Arc::new(Mutex::new(Status {
        role: "primary",
        protected: false,
        peer: peer.to_string(),
        note: "syncing the secondary".into(),
        ..Default::default()
    }));
    let mut p = Primary::new(cfg.ft, rt, ds, vm, held, status, link_cfg, hello, 0)?;
    p.session = session;
    if let Some((wp, pages)) = boot_tracking {
        p.wp = Some(Ok(wp));
        p.tracked_from_boot = Some(pages);
    }
    p.link = Some(LinkSide::attach(&p.rt, link, p.cfg.detect));
    p.run(true)
}

impl Primary {
    /// The primary role's machinery around a VM whose console goes to `held`: control socket,
    /// datastore heartbeat, output sink. No secondary yet.
    #[allow(clippy::too_many_arguments)]
    fn new(
        cfg: FtConfig,
        rt: tokio::runtime::Runtime,
        ds: Arc<Datastore>,
        vm: Vmm,
        held: HeldOutput,
        status: Arc<Mutex<Status>>,
        link_cfg: LinkConfig,
        hello: Hello,
        out_offset: u64,
    ) -> Result<Self> {
        let (forward, requests) = mpsc::channel();
        ctl::serve(
            ctl::socket_path(ds.path(), "primary"),
            status.clone(),
            Some(ctl::Request::TestFailover),
            Some(forward),
        )?;
        let ds2 = ds.clone();
        let detect = cfg.detect;
        std::thread::Builder::new()
            .name("ds-heartbeat".into())
            .spawn(move || loop {
                if let Err(e) = ds2.touch_heartbeat("primary") {
                    tracing::warn!("{e:#}");
                }
                std::thread::sleep(detect.interval());
            })?;
        let out = crate::serial_sink(cfg.serial_out.as_deref())?;
        let tap = vm.with_net(|n| n.tap());
        let events = vm.events();
        events.set_recording(true);
        Ok(Primary {
            rt,
            vm,
            held,
            events,
            out,
            link: None,
            session: 0,
            link_cfg,
            hello,
            requests,
            pending: VecDeque::new(),
            out_offset,
            net_offset: 0,
            tap,
            ds,
            status,
            rate_mark: (Instant::now(), 0),
            epochs: Vec::new(),
            split: Default::default(),
            bg_split: Default::default(),
            wp: None,
            chunks: false,
            tracked_from_boot: None,
            spare: Vec::new(),
            retired: Vec::new(),
            frames: BytesMut::new(),
            sync_pauses: Vec::new(),
            holds: Vec::new(),
            encoder: PageEncoder {
                encoding: cfg.page_encoding,
                ..Default::default()
            },
            started: Instant::now(),
            cfg,
        })
    }

    /// The current link (only called while protected).
    fn link(&mut self) -> &mut LinkSide {
        self.link.as_mut().expect("a protection session has a link")
    }

    fn lost(&self) -> bool {
        self.link
            .as_ref()
            .is_none_or(|l| l.lost.load(Ordering::SeqCst))
    }

    fn bytes_sent(&self) -> u64 {
        self.link
            .as_ref()
            .map_or(0, |l| l.control.stats().bytes_sent)
    }
}

impl Primary {
    /// The primary's life: protection sessions, and unprotected stretches between them.
    /// `protected`: a session with a secondary starts now (else the guest first runs
    /// unprotected, as after a takeover, until a secondary connects).
    fn run(&mut self, protected: bool) -> Result<u8> {
        if !protected {
            match self.unprotected()? {
                Unprotected::Exited(code) => return Ok(code),
                Unprotected::NewSecondary(link) => self.reprotect(link.0, link.1)?,
            }
        }
        loop {
            // Why the session ended: the secondary was lost (`stop` is None, `ended` says
            // whether the guest had already exited), or a stop was requested.
            let (ended, stop) = match self.protect()? {
                Protected::Exited(code) => {
                    self.vm.stop();
                    self.print_summary();
                    return Ok(code);
                }
                Protected::Lost(ended) => {
                    if let Some(l) = self.link.take() {
                        l.control.close("secondary lost");
                    }
                    (ended, None)
                }
                Protected::Stopped { off, reply } => (None, Some((off, reply))),
            };
            let _ = self.vm.pause();
            // Running unprotected requires holding the arbitration, whatever the reason: a
            // secondary that thinks the primary died (or missed a Stop) must lose it and halt.
            // (After a Stop the link stays open: closing it could discard the Stop in flight;
            // the secondary closes it when it leaves.)
            if !self.ds.arbitrate(self.session, instance())? {
                eprintln!("ftvm primary: lost the secondary and the arbitration: the secondary is live; halting");
                if let Some((_, reply)) = stop {
                    let _ = reply.send(
                        "error: the secondary went live meanwhile; this primary halts".into(),
                    );
                }
                self.vm.stop();
                return Ok(HALTED);
            }
            // Nobody else can show a different future now: release everything held.
            self.release_through(u64::MAX);
            let note = match &stop {
                None => "secondary lost".to_string(),
                Some((off, _)) => {
                    if *off {
                        self.ds.forget_secondary()?;
                    }
                    (if *off {
                        "FT turned off on request"
                    } else {
                        "FT suspended on request"
                    })
                    .to_string()
                }
            };
            eprintln!("ftvm primary: {note}; running unprotected");
            {
                let mut st = self.status.lock().unwrap();
                st.protected = false;
                st.note = format!("{note}; running unprotected");
            }
            if let Some((_, reply)) = stop {
                let _ = reply.send(format!("ok: {note}; the VM runs unprotected"));
            }
            if let Some(code) = ended {
                self.release_held();
                self.vm.stop();
                return Ok(code);
            }
            match self.unprotected()? {
                Unprotected::Exited(code) => return Ok(code),
                Unprotected::NewSecondary(link) => self.reprotect(link.0, link.1)?,
            }
        }
    }

    /// A new secondary connected: start a new protection session with it.
    fn reprotect(&mut self, peer: SocketAddr, link: net::Link) -> Result<()> {
        eprintln!("ftvm primary: a new secondary connected; re-protecting");
        self.session = self.ds.new_session()?;
        self.link = Some(LinkSide::attach(&self.rt, link, self.cfg.detect));
        let mut st = self.status.lock().unwrap();
        st.sessions += 1;
        st.peer = peer.to_string();
        st.note = "syncing the secondary".into();
        Ok(())
    }

    /// Runs the guest unprotected (output released at once) while connecting to a new
    /// secondary in the background; returns when the guest ends or a secondary is back (with
    /// the guest paused).
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
        self.wp = None; // no userfaultfd on guest memory while nothing is replicated
        self.chunks = false;
        self.vm.with_disk(|d| d.keep_writes(false));
        self.vm.with_net(|n| n.hold_tx(false));
        self.vm.resume()?;
        loop {
            let ev = self.vm.wait_event(Some(Duration::from_micros(500)));
            self.release_held();
            if let Some(ev) = ev {
                let code = self.vm.finish(ev)?;
                self.release_held();
                return Ok(Unprotected::Exited(code));
            }
            if let Ok(link) = rx.try_recv() {
                self.vm.pause()?;
                self.release_held();
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

    /// Unprotected: writes the guest's output straight out (and the frames it transmitted
    /// while they were still held).
    fn release_held(&mut self) {
        let held = self.held.take();
        if !held.is_empty() {
            self.out_offset += held.len() as u64;
            let _ = self.out.write_all(&held);
            let _ = self.out.flush();
        }
        if let Some(frames) = self.vm.with_net(|n| n.take_tx()) {
            self.send_frames(&frames);
        }
    }

    /// Sends frames the guest transmitted to the network.
    fn send_frames(&self, frames: &[Vec<u8>]) {
        if let Some(tap) = &self.tap {
            for f in frames {
                vmm::devices::tap::write_frame(tap, f);
            }
        }
    }

    /// Whether transmitted frames wait in the device (an epoch then closes early).
    fn frames_waiting(&self) -> bool {
        self.tap.is_some() && self.vm.with_net(|n| n.held_tx() > 0).unwrap_or(false)
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

    /// Sends the disk's size and its contents as epoch-0 `DiskWrite` records: every chunk
    /// that is not all zeros (the secondary starts its copy from an all-zero disk of the
    /// size sent).
    fn send_disk_copy(&mut self, disk: &std::fs::File, pre: &mut Precopy) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let size = disk.metadata()?.len();
        let mut b = BytesMut::new();
        Record::DeviceState {
            device: DEV_DISK,
            state: Bytes::copy_from_slice(&size.to_le_bytes()),
        }
        .encode(0, &mut b);
        self.send(&b, 1);
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(DISK_CHUNK as u64) as usize;
            let mut data = vec![0u8; n];
            disk.read_exact_at(&mut data, off)
                .context("reading the disk for the secondary's copy")?;
            if data.iter().all(|b| *b == 0) {
                off += n as u64;
                continue;
            }
            // Only over writes sent: the secondary folds disk writes into the epoch hash only
            // when it staged some (an all-zero disk sends none).
            pre.disk
                .get_or_insert_with(EpochHasher::new)
                .add(off, &data);
            b.clear();
            Record::DiskWrite {
                offset: off,
                data: Bytes::from(data),
            }
            .encode(0, &mut b);
            self.send(&b, 1);
            if self.lost() {
                return Ok(());
            }
            off += n as u64;
            self.status.lock().unwrap().note = format!(
                "syncing the secondary: disk {} of {} MiB",
                off >> 20,
                size >> 20
            );
        }
        Ok(())
    }

    /// One protection session: pre-copy sync (epoch 0), then epochs until the guest ends or
    /// the secondary is lost. Called with the guest paused.
    fn protect(&mut self) -> Result<Protected> {
        match self.sync()? {
            Synced::Running => {}
            Synced::Lost => return Ok(Protected::Lost(None)),
            Synced::Exited(code) => return Ok(self.shutdown(0, code)),
        }
        for epoch in 1.. {
            // Run the epoch; close it early (after min_epoch) when output is waiting.
            let t0 = Instant::now();
            let mut ended = None;
            loop {
                if let Some(ev) = self.vm.wait_event(Some(Duration::from_micros(500))) {
                    ended = Some(ev);
                    break;
                }
                let el = t0.elapsed();
                if el >= self.cfg.epoch
                    || (el >= self.cfg.min_epoch
                        && (!self.held.is_empty() || self.frames_waiting()))
                    || self.events.len() >= MAX_EPOCH_EVENTS
                {
                    break;
                }
                self.release_acked();
                if self.lost() {
                    return Ok(Protected::Lost(None));
                }
                if let Ok((req, reply)) = self.requests.try_recv() {
                    let off = req == ctl::Request::FtOff;
                    self.vm.pause()?;
                    // The secondary exits without taking over; only then may everything held
                    // be released.
                    // No close here: closing could discard the Stop still in flight. The
                    // secondary closes the link when it leaves.
                    self.rt
                        .block_on(log_tx(&mut self.link).send_record(0, &Record::Stop { off }))?;
                    return Ok(Protected::Stopped { off, reply });
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
            // (`pending` already holds this epoch's output.)
            let throttled_at = Instant::now();
            while self.pending.len() > MAX_IN_FLIGHT {
                if !self.wait_ack() {
                    return Ok(Protected::Lost(exit_code));
                }
            }
            let throttle = throttled_at.elapsed();
            if exit_code.is_none() {
                self.vm.resume()?;
            }
            let pause = paused_at.elapsed();
            let pages = snap.pages.len();
            let sent = self.stream(snap, None)?;
            self.epochs.push(EpochStat {
                pause,
                pages,
                sent,
                kick,
                harvest,
                capture: self.split.0,
                copy: self.split.1,
                bg_copy: self.bg_split.0,
                bg_faults: self.bg_split.1,
                throttle,
            });
            self.update_status(epoch, pause);
            self.release_acked();
            if let Some(code) = exit_code {
                return Ok(self.shutdown(epoch, code));
            }
        }
        unreachable!()
    }

    /// The guest ended in `epoch` (streamed): once the secondary has everything, tell it.
    fn shutdown(&mut self, epoch: u64, code: u8) -> Protected {
        while !self.pending.is_empty() {
            if !self.wait_ack() {
                return Protected::Lost(Some(code));
            }
        }
        let _ = self
            .rt
            .block_on(log_tx(&mut self.link).send_record(epoch, &Record::Shutdown { code }));
        Protected::Exited(code)
    }

    /// Sends encoded frames; a failure marks the secondary lost (the caller sees `lost`).
    fn send(&mut self, b: &[u8], frames: u64) {
        let r = self
            .rt
            .block_on(log_tx(&mut self.link).send_frames(b, frames));
        self.sent(r);
    }

    /// [`Self::send`] without a copy: the link keeps `b` until the secondary has it (page
    /// batches; `b` is split off a reused `BytesMut`, whose allocation comes back once the
    /// link lets go of it).
    fn send_owned(&mut self, b: Bytes, frames: u64) {
        let r = self
            .rt
            .block_on(log_tx(&mut self.link).send_frames_owned(b, frames));
        self.sent(r);
    }

    fn sent(&mut self, r: Result<(), net::Error>) {
        if let Err(e) = r {
            tracing::warn!("sending to the secondary failed: {e}");
            self.link().lost.store(true, Ordering::SeqCst);
        }
    }

    /// Pre-copy sync of a new secondary, as epoch 0: every non-zero page is sent while the
    /// guest runs, then the pages it dirtied meanwhile, round after round, until few remain
    /// (or the rounds run out); those and the vCPU and device state go with the guest paused.
    /// Called with the guest paused; returns with it running and epoch 0 acknowledged.
    fn sync(&mut self) -> Result<Synced> {
        let t0 = Instant::now();
        self.encoder.reset(vmm::memory::end(self.vm.memory()));
        // From here the guest's frames leave only with an acknowledged epoch.
        self.vm.with_net(|n| n.hold_tx(true));
        let from_boot = self.tracked_from_boot.take();
        // A VM protected from boot (chunk tracking on since before its first instruction)
        // starts running only once its secondary holds epoch 0: there is nothing to chase,
        // and the secondary's setup does not share the cores with the guest's first epochs.
        let hold = from_boot.is_some();
        self.chunks =
            from_boot.is_some() || self.cfg.tracking == Tracking::Chunks && self.uffd().is_some();
        // Chunk tracking starts once the guest runs (below), if it is not on since boot;
        // KVM's log would only cost.
        self.vm.set_dirty_logging(!self.chunks)?;
        self.vm.dirty_pages()?; // a clean log: from here every guest write is seen
        self.background_copy(true); // set up now, not in an epoch's pause
        let mut b = BytesMut::new();
        Record::EpochBegin {
            vcpus: self.hello.vcpus,
        }
        .encode(0, &mut b);
        self.send(&b, 1);
        let mut pre = Precopy {
            hasher: EpochHasher::new(),
            pages: 0,
            disk: None,
        };
        if !hold {
            self.vm.resume()?;
        }
        if self.chunks && from_boot.is_none() && !self.start_chunk_tracking() {
            // Refused: KVM's log from here (it starts clean, and nothing was read yet).
            self.chunks = false;
            self.vm.set_dirty_logging(true)?;
        }
        if let Some(disk) = self.disk_copy_source()? {
            // The whole disk first, while the guest runs; writes it makes from here on are
            // kept and follow in the epoch, so the secondary's copy ends up exact.
            self.send_disk_copy(&disk, &mut pre)?;
            if self.lost() {
                return Ok(Synced::Lost);
            }
        }
        // Pages harvested (or found non-zero) and not sent yet. A page is read after the
        // harvest that reported it, so a write the read misses is reported by the next one.
        let mut todo = match from_boot {
            Some(pages) => pages,
            None => all_nonzero_pages(self.vm.memory())?,
        };
        let mut ended = None;
        let mut rounds = 0;
        loop {
            rounds += 1;
            let sent_before = pre.pages;
            for chunk in todo.chunks(PRECOPY_BATCH) {
                let data = read_pages(self.vm.memory(), chunk)?;
                let entries =
                    self.encoder
                        .entries(chunk, &data, &mut pre.hasher, false, self.chunks);
                pre.pages += entries.len() as u32;
                b.clear();
                let frames = encode_pages(&entries, 0, &mut b);
                self.send_owned(b.split().freeze(), frames as u64);
                if self.lost() {
                    return Ok(Synced::Lost);
                }
                self.status.lock().unwrap().note = format!(
                    "syncing the secondary: round {rounds}, {} pages sent",
                    pre.pages
                );
            }
            todo.clear();
            if let Some(ev) = self.vm.wait_event(Some(Duration::ZERO)) {
                ended = Some(ev);
                break;
            }
            todo = self.vm.dirty_pages()?.all();
            if self.chunks {
                if let Some(wp) = self.uffd() {
                    todo = wp
                        .take_written(&todo)
                        .map_err(|e| anyhow!("tracking guest writes: {e}"))?;
                }
            }
            // With chunk tracking the pages left are whole chunks' (most unchanged, and
            // copied after the final pause): a round that found few changed pages also ends
            // it.
            let converged = self.chunks
                && rounds > 1
                && (pre.pages - sent_before) as usize <= PRECOPY_DONE_PAGES;
            if todo.len() <= PRECOPY_DONE_PAGES || converged || rounds >= PRECOPY_MAX_ROUNDS {
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
        let pre_sent = pre.pages;
        let paused_pages = snap.pages.len();
        let cut_sent = self.stream(snap, Some(pre))?;
        while !self.pending.is_empty() {
            if !self.wait_ack() {
                return Ok(Synced::Lost);
            }
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
            if self.chunks { ", whole chunks, sent if changed" } else { "" }
        );
        self.sync_pauses.push(pause);
        let mut st = self.status.lock().unwrap();
        st.protected = true;
        st.note.clear();
        Ok(match exit_code {
            Some(code) => Synced::Exited(code),
            None => Synced::Running,
        })
    }

    /// With the vCPUs paused: captures epoch `epoch`'s state, copies its dirty pages and takes
    /// its output. Everything slow (hashing, encoding, sending) happens later, in
    /// [`Primary::stream`], while the guest runs again. `pages`: the dirty pages harvested;
    /// with chunk tracking, the pages of the chunks written join them here.
    fn snapshot(&mut self, epoch: u64, pages: &[u64], exit: Option<u8>) -> Result<Snapshot> {
        let t = Instant::now();
        // The pages are protected (or copied) on this thread while the vCPU threads save
        // their state: the two are independent and each costs a fraction of a millisecond.
        let mut spare = std::mem::take(&mut self.spare);
        let tracked = match &self.wp {
            Some(Ok(wp)) if self.chunks => Some(wp.written_chunks()),
            _ => None,
        };
        let need = (pages.len() + tracked.unwrap_or(0) * CHUNK_PAGES) * PAGE_SIZE;
        if spare.capacity() < need {
            // Half again as much, so that a growing working set soon stops reallocating.
            let grown = Vec::with_capacity(need + need / 2);
            self.retired = std::mem::replace(&mut spare, grown);
        }
        let background = self.background_copy(exit.is_none()).is_some();
        let (wp, track) = match &self.wp {
            Some(Ok(wp)) => (background.then_some(wp), self.chunks.then_some(wp)),
            _ => (None, None),
        };
        let vm = &mut self.vm;
        let mem = vm.memory().clone();
        let mut pages_done = Duration::ZERO;
        let (state, data) = vm.capture_with(|| {
            let r = match (wp, track) {
                (Some(wp), Some(_)) => wp
                    .cut(pages, spare)
                    .map(|(pages, c)| (pages, PageCopy::Copying(c)))
                    .map_err(|e| anyhow!("write-protecting guest memory: {e}")),
                (Some(wp), None) => wp
                    .start(pages, spare)
                    .map(|c| (pages.to_vec(), PageCopy::Copying(c)))
                    .map_err(|e| anyhow!("write-protecting dirty pages: {e}")),
                (None, track) => (|| {
                    let all = match track {
                        Some(wp) => wp
                            .take_written(pages)
                            .map_err(|e| anyhow!("tracking guest writes: {e}"))?,
                        None => pages.to_vec(),
                    };
                    let data = copy_paused_pages(&mem, &all, spare)?;
                    Ok((all, PageCopy::Copied(data)))
                })(),
            };
            pages_done = t.elapsed();
            r
        })?;
        let (pages, data) = data?;
        let capture = t.elapsed();
        let (output, since) = self.held.take_timed();
        let output = Bytes::from(output);
        let net = self.vm.with_net(|n| Arc::new(n.take_tx()));
        // Held from this moment: whatever happens next, this output is released exactly when
        // its epoch is acknowledged, or by whichever side goes live. Offsets are absolute in
        // the console stream and advance as output leaves the guest.
        self.pending.push_back(Held {
            epoch,
            output: output.clone(), // shares the buffer
            frames: net.clone().unwrap_or_default(),
            since,
        });
        let offset = self.out_offset;
        self.out_offset += output.len() as u64;
        self.split = (capture, pages_done);
        Ok(Snapshot {
            epoch,
            state,
            pages,
            data,
            output,
            offset,
            exit,
            events: self.events.take(),
            disk: self.vm.with_disk(|d| d.take_writes()).unwrap_or_default(),
            net,
        })
    }

    /// The write protection to copy an epoch's pages after the pause with (set up on first
    /// use), if configured, wanted (`resumes`: the guest runs on after this epoch) and
    /// allowed by the kernel.
    fn background_copy(&mut self, resumes: bool) -> Option<&vmm::wp::BackgroundCopy> {
        if !resumes || self.cfg.epoch_copy != EpochCopy::Background {
            return None;
        }
        self.uffd()
    }

    /// Write protection of guest memory (set up on first use), unless the kernel refused it.
    fn uffd(&mut self) -> Option<&vmm::wp::BackgroundCopy> {
        let mem = self.vm.memory();
        self.wp
            .get_or_insert_with(|| {
                vmm::wp::BackgroundCopy::new(mem).map_err(|e| {
                    eprintln!(
                        "ftvm primary: {e}: copying dirty pages with the guest paused and tracking writes with KVM's dirty log instead"
                    )
                })
            })
            .as_ref()
            .ok()
    }

    /// Backs all guest memory and starts tracking writes in 2 MiB chunks (guest running);
    /// false if the kernel refused (said why).
    fn start_chunk_tracking(&mut self) -> bool {
        let mem = self.vm.memory().clone();
        let Some(wp) = self.uffd() else {
            return false;
        };
        match back_and_track(&mem, wp) {
            Ok(()) => true,
            Err(e) => {
                eprintln!("ftvm primary: {e}: tracking writes with KVM's dirty log instead");
                false
            }
        }
    }

    /// Streams a snapshot (guest running); its output is already held. `pre`: the part of
    /// epoch 0 that the pre-copy rounds sent (then EpochBegin is already out). Returns how
    /// many of its pages were sent (with chunk tracking, only the changed ones).
    fn stream(&mut self, snap: Snapshot, pre: Option<Precopy>) -> Result<usize> {
        self.retired = Vec::new();
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
        let data = match data {
            PageCopy::Copied(b) => {
                self.bg_split = Default::default();
                b
            }
            PageCopy::Copying(c) => {
                let t = Instant::now();
                let copied = c
                    .finish()
                    .map_err(|e| anyhow!("copying dirty pages: {e}"))?;
                self.bg_split = (t.elapsed(), copied.faults);
                Bytes::from(copied.pages)
            }
        };
        let begun = pre.is_some();
        let (mut hasher, pre_pages, mut disk_hasher) = match pre {
            Some(p) => (p.hasher, p.pages, p.disk),
            None => (EpochHasher::new(), 0, None),
        };
        let entries =
            self.encoder
                .entries(&pages, &data, &mut hasher, !begun && epoch > 0, self.chunks);
        let mut b = std::mem::take(&mut self.frames);
        b.clear();
        // At once, so that the allocation sent last time is taken back whole if the link
        // has let go of it (else a new one), not grown piecemeal.
        b.reserve(entries.len() * (PAGE_SIZE + 32) + 4096);
        let mut frames = 0;
        let mut rec = |r: Record, b: &mut BytesMut| {
            r.encode(epoch, b);
            frames += 1;
        };
        if !begun {
            rec(
                Record::EpochBegin {
                    vcpus: state.vcpus.len() as u8,
                },
                &mut b,
            );
        }
        let n_page_frames = encode_pages(&entries, epoch, &mut b);
        for w in disk {
            disk_hasher
                .get_or_insert_with(EpochHasher::new)
                .add(w.offset, &w.data);
            rec(
                Record::DiskWrite {
                    offset: w.offset,
                    data: Bytes::from(w.data),
                },
                &mut b,
            );
        }
        if let Some(d) = disk_hasher {
            hasher.add(u64::MAX, &d.finish().to_le_bytes());
        }
        for v in &state.vcpus {
            rec(
                Record::VcpuState {
                    vcpu: v.id,
                    state: Bytes::from(encode_part(v)?),
                },
                &mut b,
            );
        }
        rec(
            Record::DeviceState {
                device: DEV_KVM,
                state: Bytes::from(encode_part(&state.vm)?),
            },
            &mut b,
        );
        rec(
            Record::DeviceState {
                device: DEV_VMM,
                state: Bytes::from(encode_part(&state.devices)?),
            },
            &mut b,
        );
        for (seq, e) in events.iter().enumerate() {
            rec(Record::Event(log_event(seq as u32, e)), &mut b);
        }
        self.status.lock().unwrap().events += events.len() as u64;
        if let Some(code) = exit {
            rec(
                Record::DeviceState {
                    device: DEV_EXIT,
                    state: Bytes::copy_from_slice(&[code]),
                },
                &mut b,
            );
        }
        let end_off = offset + output.len() as u64;
        if !output.is_empty() {
            rec(
                Record::Output {
                    stream: 0,
                    offset,
                    data: output,
                },
                &mut b,
            );
        }
        let mut outputs = vec![(0, end_off)];
        if let Some(frames) = net {
            let mut data = Vec::new();
            ft_log::frames::encode(frames.iter().map(Vec::as_slice), &mut data);
            let at = self.net_offset;
            self.net_offset += data.len() as u64;
            outputs.push((NET_STREAM, self.net_offset));
            if !data.is_empty() {
                rec(
                    Record::Output {
                        stream: NET_STREAM,
                        offset: at,
                        data: Bytes::from(data),
                    },
                    &mut b,
                );
            }
        }
        rec(
            Record::EpochEnd(EpochEnd {
                pages: pre_pages + entries.len() as u32,
                events: events.len() as u32,
                page_hash: hasher.finish(),
                outputs,
            }),
            &mut b,
        );
        self.send_owned(b.split().freeze(), frames + n_page_frames as u64);
        // Both buffers are reused (`b` once the link has let go of what it sent): fresh
        // memory page-faults, measured the largest single CPU cost of replication here.
        self.frames = b;
        let sent = entries.len();
        drop(entries);
        if let Ok(m) = data.try_into_mut() {
            self.spare = m.into();
        }
        Ok(sent)
    }

    /// One stderr line with the epoch statistics (benchmarks parse it).
    fn print_summary(&self) {
        let mut pauses: Vec<u64> = self
            .epochs
            .iter()
            .map(|e| e.pause.as_micros() as u64)
            .collect();
        let mut pages: Vec<u64> = self.epochs.iter().map(|e| e.pages as u64).collect();
        let mut holds: Vec<u64> = self
            .holds
            .iter()
            .map(|(_, d)| d.as_micros() as u64)
            .collect();
        pauses.sort_unstable();
        pages.sort_unstable();
        holds.sort_unstable();
        if let Some(path) = &self.cfg.epoch_stats {
            let mut csv = String::from(
                "epoch,pause_us,dirty_pages,kick_us,harvest_us,capture_us,copy_us,output_hold_us,bg_copy_us,bg_faults,throttle_us,pages_sent\n",
            );
            let us = |d: Duration| d.as_micros();
            // How long the epoch's first output byte was held (empty: no output).
            let hold: std::collections::HashMap<u64, u128> =
                self.holds.iter().map(|(k, d)| (*k, us(*d))).collect();
            for (i, e) in self.epochs.iter().enumerate() {
                let k = i as u64 + 1;
                csv += &format!(
                    "{k},{},{},{},{},{},{},{},{},{},{},{}\n",
                    us(e.pause),
                    e.pages,
                    us(e.kick),
                    us(e.harvest),
                    us(e.capture),
                    us(e.copy),
                    hold.get(&k).map_or(String::new(), u128::to_string),
                    us(e.bg_copy),
                    e.bg_faults,
                    us(e.throttle),
                    e.sent,
                );
            }
            if let Err(e) = std::fs::write(path, csv) {
                eprintln!("ftvm primary: cannot write {}: {e}", path.display());
            }
        }
        let q = |v: &[u64], f: f64| {
            v.get(((v.len().max(1) - 1) as f64 * f) as usize)
                .copied()
                .unwrap_or(0)
        };
        let secs = self.started.elapsed().as_secs_f64();
        let sent = self.bytes_sent();
        eprintln!(
            "ftvm primary: summary epochs={} pause_us_p50={} pause_us_p99={} pause_us_max={} dirty_pages_p50={} dirty_pages_p99={} bytes_sent={} bytes_per_sec={} pages_sent={} sync_pause_us_max={} output_hold_us_p50={} output_hold_us_p99={}",
            pauses.len(),
            q(&pauses, 0.5),
            q(&pauses, 0.99),
            pauses.last().copied().unwrap_or(0),
            q(&pages, 0.5),
            q(&pages, 0.99),
            sent,
            (sent as f64 / secs) as u64,
            self.encoder.pages,
            self.sync_pauses
                .iter()
                .max()
                .map_or(0, |d| d.as_micros() as u64),
            q(&holds, 0.5),
            q(&holds, 0.99),
        );
    }

    fn update_status(&mut self, epoch: u64, pause: Duration) {
        let sent = self.bytes_sent();
        let (t, b) = self.rate_mark;
        let mut st = self.status.lock().unwrap();
        st.epoch = epoch;
        st.lag_epochs = self.pending.len() as u64;
        st.bytes_sent = sent;
        st.last_pause_us = pause.as_micros() as u64;
        if t.elapsed() >= Duration::from_secs(1) {
            st.bytes_per_sec = ((sent - b) as f64 / t.elapsed().as_secs_f64()) as u64;
            self.rate_mark = (Instant::now(), sent);
        }
    }

    /// Releases the output of every acknowledged epoch, in order.
    fn release_acked(&mut self) {
        while let Ok(k) = self.link().acks.try_recv() {
            self.release_through(k);
        }
    }

    fn release_through(&mut self, k: u64) {
        while self.pending.front().is_some_and(|h| h.epoch <= k) {
            let h = self.pending.pop_front().unwrap();
            if let Err(e) = self.out.write_all(&h.output).and_then(|_| self.out.flush()) {
                tracing::warn!("releasing guest output failed: {e}");
            }
            self.send_frames(&h.frames);
            if let Some(t) = h.since {
                self.holds.push((h.epoch, t.elapsed()));
            }
        }
    }

    /// Blocks until one more acknowledgement arrives: `true`; or the secondary is lost: `false`.
    fn wait_ack(&mut self) -> bool {
        loop {
            match self.link().acks.recv_timeout(Duration::from_millis(5)) {
                Ok(k) => {
                    self.release_through(k);
                    return true;
                }
                Err(_) if self.lost() => return false,
                Err(_) => {}
            }
        }
    }
}

/// The contents of `pages`, back to back.
fn read_pages(mem: &vmm::memory::GuestMemory, pages: &[u64]) -> Result<Bytes> {
    let mut buf = BytesMut::zeroed(pages.len() * PAGE_SIZE);
    for (i, &gpa) in pages.iter().enumerate() {
        read_page(mem, gpa, &mut buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE])?;
    }
    Ok(buf.freeze())
}

/// As [`read_pages`], with the vCPUs paused (a plain memcpy), into `buf` (grown if needed,
/// never shrunk: the result may be longer than the pages).
fn copy_paused_pages(
    mem: &vmm::memory::GuestMemory,
    pages: &[u64],
    mut buf: Vec<u8>,
) -> Result<Bytes> {
    let need = pages.len() * PAGE_SIZE;
    if buf.len() < need {
        buf.resize(need, 0);
    }
    vmm::memory::copy_pages(mem, pages, &mut buf)
        .map_err(|e| anyhow!("copying dirty pages: {e}"))?;
    Ok(Bytes::from(buf))
}

fn all_nonzero_pages(mem: &vmm::memory::GuestMemory) -> Result<Vec<u64>> {
    let mut pages = Vec::new();
    let mut page = [0u8; PAGE_SIZE];
    let backed = vmm::memory::backed_pages(mem);
    for ((base, _, _), backed) in vmm::memory::host_regions(mem).into_iter().zip(backed) {
        // Never-backed pages are zero, and reading them would slow the guest down (see
        // `backed_pages`).
        for (i, _) in backed.iter().enumerate().filter(|(_, b)| **b) {
            let gpa = base + (i * PAGE_SIZE) as u64;
            read_page(mem, gpa, &mut page)?;
            if !vmm::memory::is_zero(&page) {
                pages.push(gpa);
            }
        }
    }
    Ok(pages)
}

/// For a VM protected from boot (guest not run yet, memory still sparse): its non-zero pages
/// (cheap now: only backed pages are read), then all memory backed and chunk tracking
/// started, so that the first sync need not read all of guest memory. None where the kernel
/// does not allow (the sync then says why and falls back).
fn track_from_boot(vm: &Vmm) -> Result<Option<(vmm::wp::BackgroundCopy, Vec<u64>)>> {
    let Ok(wp) = vmm::wp::BackgroundCopy::new(vm.memory()) else {
        return Ok(None);
    };
    let pages = all_nonzero_pages(vm.memory())?;
    Ok(back_and_track(vm.memory(), &wp)
        .is_ok()
        .then_some((wp, pages)))
}

/// Backs all of `mem` (unpopulated memory first written under protection would be backed
/// in 4 KiB pages: a failure costs speed, not correctness), then starts chunk tracking.
fn back_and_track(
    mem: &vmm::memory::GuestMemory,
    wp: &vmm::wp::BackgroundCopy,
) -> std::result::Result<(), vmm::wp::Error> {
    if let Err(e) = vmm::memory::populate(mem) {
        tracing::warn!("cannot back all guest memory in advance: {e}");
    }
    wp.track()
}

/// Settings of `ftvm secondary`.
pub struct SecondaryConfig {
    pub listen: SocketAddr,
    pub datastore: PathBuf,
    pub serial_out: Option<PathBuf>,
    pub detect: Detect,
    /// This side's copy of the guest's disk (filled by the sync, updated on every commit,
    /// the guest's disk after a takeover).
    pub disk: Option<PathBuf>,
    /// The host tap the guest's network device uses after a takeover.
    pub tap: Option<String>,
}

/// Attaches the disk image `disk` to `vm`; without one, a VM whose state has a disk device
/// is refused with `missing`.
pub fn attach_disk(vm: &mut Vmm, disk: Option<&std::path::Path>, missing: &str) -> Result<()> {
    match disk {
        Some(p) => vm
            .attach_disk(open_disk(p)?)
            .with_context(|| format!("cannot attach --disk {}", p.display())),
        None if vm.needs_disk() => bail!("{missing}"),
        None => Ok(()),
    }
}

/// Opens the host tap `name` for a guest's network device.
pub fn open_tap(name: &str) -> Result<std::fs::File> {
    vmm::devices::tap::open(name).with_context(|| format!("cannot use --tap {name}"))
}

/// Attaches `tap` as `vm`'s network device with MAC `mac` (a restored VM keeps its saved
/// MAC); without one, a VM whose state has a network device is refused with `missing`.
pub fn attach_net(
    vm: &mut Vmm,
    tap: Option<std::fs::File>,
    mac: [u8; 6],
    missing: &str,
) -> Result<()> {
    match tap {
        Some(t) => vm
            .attach_net(t, mac)
            .context("cannot attach the network device"),
        None if vm.needs_net() => bail!("{missing}"),
        None => Ok(()),
    }
}

/// A new primary on a new host: tells the network where the guest's MAC is now (RARP, as
/// live migration does: at once, then twice more in case the first is lost), and sends the
/// frames of the last committed epochs again (`resend`, in stream form).
fn announce(tap: Arc<std::fs::File>, mac: [u8; 6], resend: &[u8]) {
    use vmm::devices::tap::{rarp_announce, write_frame};
    let rarp = rarp_announce(mac);
    write_frame(&tap, &rarp);
    let (frames, _) = ft_log::frames::decode(resend);
    for f in &frames {
        write_frame(&tap, f);
    }
    eprintln!(
        "ftvm secondary: announced MAC {} with RARP; sent the last committed epochs' {} frames again",
        mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"),
        frames.len()
    );
    let _ = std::thread::Builder::new()
        .name("announce".into())
        .spawn(move || {
            for gap in [50, 100] {
                std::thread::sleep(Duration::from_millis(gap));
                write_frame(&tap, &rarp);
            }
        });
}

/// Opens a disk image for a guest (read-write).
fn open_disk(p: &std::path::Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .with_context(|| format!("cannot open --disk {}", p.display()))
}

/// Runs the standby. Returns the guest's exit code (after a takeover, or when the primary
/// reports the guest ended), or [`HALTED`] if it lost the arbitration.
pub fn secondary(cfg: SecondaryConfig) -> Result<u8> {
    let ds = Datastore::open(&cfg.datastore)?;
    // How to start another secondary like this one (`ftvm ctl test-restart-secondary`).
    ds.record_secondary_command(&std::env::args().collect::<Vec<_>>())?;
    let rt = runtime()?;
    let link_cfg = link_config(&ds, "secondary", "primary", Duration::from_secs(120))?;
    let hello = hello(Role::Secondary, 0, 0);
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
    let mut sec = replay::Secondary::new(mem);
    let disk = cfg.disk.as_deref().map(open_disk).transpose()?;
    let mut disk_sized = false;
    // Attached only at takeover (the standby must not take the tap's frames, and a new
    // secondary may start on the host where the primary holds the same tap); a name that can
    // never work is refused now.
    if let Some(name) = &cfg.tap {
        vmm::devices::tap::check(name).with_context(|| format!("cannot use --tap {name}"))?;
    }
    // Network-stream end offsets after the last committed epochs (for the resend).
    let mut net_ends: VecDeque<u64> = VecDeque::new();
    let status = Arc::new(Mutex::new(Status {
        role: "secondary",
        protected: false,
        note: "syncing from the primary".into(),
        ..Default::default()
    }));
    // The protection session this secondary belongs to: the primary starts it before it
    // sends epoch 0, so it is known once epoch 0 is committed.
    let mut session = None;
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
    let lost = Arc::new(AtomicBool::new(false));
    let synced = Arc::new(AtomicBool::new(false));
    spawn_heartbeats(&rt, hb_tx, hb_rx, lost.clone(), synced.clone(), cfg.detect);
    // Receive and commit epochs until the primary is gone or the guest ended.
    let outcome: Result<Received> = rt.block_on(async {
        loop {
            let rec = tokio::select! {
                r = log_rx.recv_record() => r,
                _ = wait_flag(&lost) => return Ok(Received::PrimaryLost),
            };
            match rec {
                Ok((_, Record::Shutdown { code })) => return Ok(Received::GuestEnded(code)),
                Ok((_, Record::Stop { .. })) => return Ok(Received::Stopped),
                Ok((e, r)) => match sec.on_record(e, r) {
                    Ok(actions) => {
                        for replay::Action::Ack(k) in actions {
                            if let Some(t) = backing.take() {
                                match t.join() {
                                    Ok(Ok(())) => {}
                                    Ok(Err(e)) => tracing::warn!("backing the standby: {e}"),
                                    Err(_) => tracing::warn!("backing the standby panicked"),
                                }
                            }
                            if let Err(e) =
                                apply_disk_writes(&mut sec, disk.as_ref(), &mut disk_sized)
                            {
                                eprintln!("ftvm secondary: {e:#}; leaving the FT link");
                                return Ok(Received::PrimaryLost);
                            }
                            if session.is_none() {
                                session = Some(ds.session()?);
                                synced.store(true, Ordering::SeqCst);
                            }
                            net_ends.push_back(sec.output().end(NET_STREAM));
                            if net_ends.len() > RESEND_EPOCHS + 1 {
                                net_ends.pop_front();
                            }
                            {
                                let mut st = status.lock().unwrap();
                                st.epoch = k;
                                st.events = sec.events_committed;
                                st.protected = true;
                                st.note.clear();
                            }
                            if log_tx.send_record(k, &Record::Ack).await.is_err() {
                                return Ok(Received::PrimaryLost);
                            }
                        }
                    }
                    // A bad epoch from an authenticated primary means the stream can no
                    // longer be trusted; the committed standby is intact. Leave the link:
                    // the primary notices and keeps the guest (it wins the arbitration).
                    Err(err) => {
                        eprintln!("ftvm secondary: {err}; leaving the FT link");
                        return Ok(Received::PrimaryLost);
                    }
                },
                Err(e) => {
                    tracing::info!("FT link lost: {e}");
                    return Ok(Received::PrimaryLost);
                }
            }
        }
    });
    match outcome? {
        Received::Stopped => {
            eprintln!(
                "ftvm secondary: the primary stopped replicating (suspend or FT off); exiting"
            );
            return Ok(0);
        }
        Received::GuestEnded(code) => {
            eprintln!("ftvm secondary: the guest ended on the primary (exit {code})");
            return Ok(code);
        }
        Received::PrimaryLost => {
            // Whatever ended the stream, end the link too, so a primary that is still alive
            // learns it now rather than after its heartbeat timeout.
            control.close("secondary left");
        }
    }
    // The primary is lost on the link. Give a primary that is still alive (its datastore
    // heartbeat is fresh) the chance to win the arbitration first.
    let detected_us = now_us();
    let t = Instant::now();
    let stale = cfg.detect.timeout;
    while ds.heartbeat_age("primary").is_some_and(|a| a < stale) && t.elapsed() < 4 * stale {
        std::thread::sleep(Duration::from_millis(20));
    }
    let Some(session) = session else {
        bail!("the primary was lost before the initial sync completed; nothing to take over");
    };
    if !ds.arbitrate(session, instance())? {
        eprintln!(
            "ftvm secondary: lost the primary on the link but it won the arbitration; halting"
        );
        return Ok(HALTED);
    }
    // Free the FT port (a new secondary may listen there) and the link before going live.
    drop((listener, log_tx, log_rx, control));
    drop(rt);
    let resend_from = match net_ends.front() {
        Some(&end) if net_ends.len() > RESEND_EPOCHS => end,
        _ => sec.output().base(NET_STREAM),
    };
    takeover(sec, &cfg, ds, resend_from, (detected_us, now_us()))
}

/// Applies the committed epochs' disk writes to this side's disk copy, before the epoch is
/// acknowledged. The first time (the sync's epoch 0, which carries the primary's disk size
/// and its non-zero chunks) the copy is first emptied and sized: all zeros.
fn apply_disk_writes(
    sec: &mut replay::Secondary,
    disk: Option<&std::fs::File>,
    sized: &mut bool,
) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let size = sec
        .state()
        .devices
        .get(&DEV_DISK)
        .and_then(|b| <[u8; 8]>::try_from(&b[..]).ok())
        .map(u64::from_le_bytes);
    let writes = sec.take_disk_writes();
    if writes.is_empty() && (size.is_none() || *sized) {
        return Ok(());
    }
    let disk = disk.ok_or_else(|| {
        anyhow!(
            "the primary's guest has a disk: start the secondary with --disk FILE (its own copy)"
        )
    })?;
    if let (Some(size), false) = (size, *sized) {
        disk.set_len(0)
            .and_then(|()| disk.set_len(size))
            .context("emptying and sizing the disk copy")?;
        *sized = true;
    }
    for (off, data) in writes {
        disk.write_all_at(&data, off)
            .context("writing the secondary's disk copy")?;
    }
    Ok(())
}

/// How the secondary's receive loop ended.
enum Received {
    PrimaryLost,
    GuestEnded(u8),
    Stopped,
}

async fn wait_flag(flag: &AtomicBool) {
    while !flag.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Goes live on the last committed epoch, as the primary: the guest runs on unprotected
/// until a new secondary connects (at the datastore's `peer` address if one is named, else
/// at this side's own listening address), which then syncs and protection returns.
fn takeover(
    sec: replay::Secondary,
    cfg: &SecondaryConfig,
    ds: Datastore,
    resend_from: u64,
    (detected_us, arbitrated_us): (u64, u64),
) -> Result<u8> {
    let serial_out = cfg.serial_out.as_deref();
    let epoch = sec.committed_epoch().ok_or_else(|| {
        anyhow!("the primary was lost before the initial sync completed; nothing to take over")
    })?;
    eprintln!("ftvm secondary: taking over at epoch {epoch}");
    let st = sec.state();
    let mut vcpus = Vec::new();
    for blob in st.vcpus.values() {
        vcpus.push(decode_part::<vmm::vstate::vcpu::VcpuState>(blob)?);
    }
    let part = |id| {
        st.devices
            .get(&id)
            .ok_or_else(|| anyhow!("committed state lacks device {id}"))
    };
    let vm = decode_part(part(DEV_KVM)?)?;
    let devices = decode_part(part(DEV_VMM)?)?;
    let exit = st.devices.get(&DEV_EXIT).and_then(|b| b.first().copied());
    // Release exactly the committed output the outside world has not seen.
    let mut out = crate::serial_sink(serial_out)?;
    let released = match serial_out {
        Some(p) => std::fs::metadata(p).map(|m| m.len()).unwrap_or(0),
        None => sec.output().end(0), // stdout: what it showed cannot be known; do not repeat
    };
    let missing = sec.output().unreleased(0, released).ok_or_else(|| {
        anyhow!(
            "--serial-out holds {released} bytes, more than the committed output ({})",
            sec.output().end(0)
        )
    })?;
    out.write_all(missing)?;
    out.flush()?;
    if let Some(code) = exit {
        return Ok(code);
    }
    let mem_mib = vmm::layout::mem_mib_of(&vmm::memory::host_regions(sec.memory()));
    let vcpu_count = vcpus.len() as u8;
    let state = VmState {
        mem_mib,
        vcpus,
        vm,
        devices,
    };
    let out_offset = sec.output().end(0);
    let net_offset = sec.output().end(NET_STREAM);
    let resend = sec
        .output()
        .unreleased(NET_STREAM, resend_from)
        .unwrap_or_default()
        .to_vec();
    drop(out);
    let held = HeldOutput::default();
    let mut vm = Vmm::from_state(
        sec.into_memory(),
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
    if let Some((tap, mac)) = vm.with_net(|n| (n.tap(), n.mac())) {
        announce(tap, mac, &resend);
    }
    // This process is the primary now: its control socket is the primary's.
    let _ = std::fs::remove_file(ctl::socket_path(ds.path(), "secondary"));
    let ds = Arc::new(ds);
    let link_cfg = link_config(&ds, "primary", "secondary", Duration::from_secs(5))?;
    let status = Arc::new(Mutex::new(Status {
        role: "primary",
        protected: false,
        note: format!("took over at epoch {epoch}; waiting for a new secondary"),
        epoch,
        ..Default::default()
    }));
    status.lock().unwrap().takeover_us = Some((detected_us, arbitrated_us, now_us()));
    let mut p = Primary::new(
        FtConfig::after_takeover(cfg),
        runtime()?,
        ds,
        vm,
        held,
        status,
        link_cfg,
        hello(Role::Primary, vcpu_count, mem_mib),
        out_offset,
    )?;
    p.net_offset = net_offset;
    p.run(false)
}
