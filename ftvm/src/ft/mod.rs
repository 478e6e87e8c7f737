//! `ftvm primary` and `ftvm secondary`: the IO drivers of a protected pair.
//!
//! Every protocol decision is taken by [`ft_core`] (the primary's and the secondary's state
//! machines, the page encoder, epoch assembly, failure detection, the datastore contract);
//! the modules here only do what it says, with the real things:
//!
//! | module | drives |
//! |---|---|
//! | [`primary`] | the VM (pause, capture, copy, resume), the epoch loop, the sync, arbitration |
//! | [`capture`] | reading and copying guest pages, write tracking, one epoch's snapshot |
//! | [`secondary`] | the standby's link, disk copy, confirmation and takeover |
//! | [`link`] | the QUIC link: connect/accept, heartbeats into the core's detector, acks |
//! | [`sinks`] | the console file and the tap, written only through the datastore's fence |
//! | [`datastore`] | the shared directory as a [`ft_core::datastore::Store`] |
//! | [`stats`] | per-epoch statistics, `--epoch-stats`, the summary line |
//!
//! The primary runs the guest in epochs. At each boundary it pauses the vCPUs, takes the
//! pages written (2 MiB chunk tracking, or KVM's dirty log), captures vCPU and device state
//! and the epoch's output, resumes the guest and streams the epoch; the output is held until
//! the secondary acknowledges the epoch (the output rule). The secondary commits each epoch
//! all-or-nothing and acknowledges it. If the secondary loses the primary it confirms with the
//! primary's datastore heartbeat, must win the datastore's arbitration, releases exactly the
//! committed output the console lacks, and runs the VM on from its last committed epoch. A
//! primary that loses its secondary must win the same arbitration to go on unprotected.
//!
//! # Why each sink is safe against a paused process
//!
//! A process can stop (SIGSTOP, a stalled host, a hung disk) anywhere and resume after
//! someone else took over; a check it made before the pause proves nothing after it.
//!
//! - **Console file** (`--serial-out`, append-only, on the datastore): every append happens
//!   inside [`ft_core::datastore::fenced`] — the ownership check and the `write(2)` under the
//!   datastore's lock ([`sinks::Sinks::write`]). A secondary goes live only through
//!   [`ft_core::datastore::take_over`], which arbitrates, measures the file and writes the
//!   committed rest under the same lock: it waits for an old owner's in-flight append and
//!   counts it; an old owner that resumes after that finds it owns nothing and halts without
//!   writing. (Before this fence a primary paused between its acknowledgement and its append
//!   wrote lines twice: the simulation and the `chaos_freeze_*` tests reproduce it.)
//! - **Network frames** (the tap): the FT primary always holds transmitted frames in the
//!   device and writes them through the same fence, protected or not. The new primary sends
//!   the last committed epochs' frames again (at least once: TCP drops duplicates).
//! - **Disk**: each side writes only its own copy. A secondary's sync replaces its copy with
//!   a new file ([`ft_core::secondary::Action::ResetDisk`]), so a thawed earlier process that
//!   still holds an old copy open writes to a file nobody reads.
//! - **Datastore records**: the arbitration record changes only under the lock; sessions only
//!   grow, so a process of an older session can never win or write. The heartbeat file is
//!   evidence for the secondary's confirmation, never a permission.
//! - **A secondary paused while taking over** has either not won yet (a live primary wins and
//!   the secondary halts when it resumes) or holds the lock (the primary's writes wait).
//! - **A primary paused during the pre-copy sync** leaves a secondary with nothing committed:
//!   it cannot take over and exits; the primary resumes, finds its secondary gone, wins the
//!   arbitration and runs on unprotected.
pub mod capture;
pub mod datastore;
pub mod link;
pub mod primary;
pub mod secondary;
pub mod sinks;
pub mod stats;

pub use ft_core::detect::DetectConfig as Detect;
pub use ft_core::encoder::PageEncoding;
pub use ft_core::primary::DEFAULT_EPOCH_MS;
pub use primary::primary;
pub use secondary::secondary;

use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use vmm::{VmConfig, Vmm};

/// Exit status of a side that lost arbitration (or was fenced off) and halted.
pub const HALTED: u8 = 3;

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
    /// sent (told by the shadow with deltas, else by a 128-bit hash per page). Guest memory
    /// stays mapped in huge pages, and is fully backed while protected. Falls back to
    /// `dirty-log` where the kernel does not allow.
    #[default]
    Chunks,
    /// KVM's dirty log (4 KiB exact; KVM maps guest memory in 4 KiB pages while it logs,
    /// which is most of FT's overhead on this project's host).
    DirtyLog,
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
        let core = ft_core::primary::Config::default();
        FtConfig {
            peer: Some(cfg.listen),
            datastore: cfg.datastore.clone(),
            serial_out: cfg.serial_out.clone(),
            epoch: core.epoch,
            min_epoch: core.min_epoch,
            detect: cfg.detect,
            page_encoding: PageEncoding::default(),
            epoch_copy: EpochCopy::default(),
            tracking: Tracking::default(),
            epoch_stats: None,
        }
    }

    /// The protocol core's settings.
    fn core(&self) -> ft_core::primary::Config {
        ft_core::primary::Config {
            epoch: self.epoch,
            min_epoch: self.min_epoch,
            ..Default::default()
        }
    }
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

/// This process's name in the datastore's arbitration record.
fn instance() -> &'static ft_core::datastore::Name {
    static ID: std::sync::OnceLock<ft_core::datastore::Name> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        ft_core::datastore::Name::new(format!("{}-{}", std::process::id(), crate::now_us()))
            .expect("digits and a dash make a valid name")
    })
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

/// Opens a disk image for a guest (read-write).
fn open_disk(p: &std::path::Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .with_context(|| format!("cannot open --disk {}", p.display()))
}
