//! `ftvm`: the one binary: `ftvm run` (a VM without FT), `ftvm primary` / `ftvm secondary`
//! (a protected pair, see [`ft`]) and `ftvm guests`.
//!
//! Exit status: a guest run exits with the guest's own exit code; an ftvm error prints one
//! `ftvm: error: …` line (with its causes) and exits 1; a usage error exits 2.
mod cluster;
mod ctl;
mod ft;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmm::devices::serial::SerialOut;
use vmm::{BootSource, VmConfig, VmEvent, Vmm};

#[derive(Parser)]
#[command(
    name = "ftvm",
    version,
    about = "ftvm: a fault-tolerant virtual machine monitor on KVM"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a VM without FT (boot a guest, or continue one from a state file).
    ///
    /// The serial console goes to stdout, or is appended to --serial-out. When the guest
    /// writes the exit device, ftvm exits with the guest's code.
    #[command(
        after_help = "Exit status: the guest's own exit code; 1 on an ftvm error (one \
        `ftvm: error: ...` line); 2 on a usage error.\n\nExamples:\n  ftvm run --guest counter \
        --cmdline \"count=20 rate=10\"\n  ftvm run --guest smp --vcpus 4\n  ftvm run --guest counter \
        --cmdline \"count=300 rate=100\" --serial-out out.txt --save-after-ms 1000 --save vm.state\n  \
        ftvm run --restore vm.state --serial-out out.txt"
    )]
    Run(RunArgs),
    /// Run a protected VM as the primary of an FT pair (start the secondary first).
    ///
    /// The guest runs in epochs; each epoch's dirty pages and state stream to the secondary
    /// at --peer, and the guest's console output is released only once the secondary has
    /// acknowledged the epoch that produced it.
    #[command(
        after_help = "Exit status: the guest's exit code; 3 if this side lost the arbitration \
        after losing its secondary and halted; 1 on an ftvm error."
    )]
    Primary(PrimaryArgs),
    /// Run the standby of an FT pair; it takes over if the primary is lost.
    #[command(
        after_help = "Exit status: the guest's exit code (after a takeover, or when the \
        guest ended on the primary); 3 if it lost the arbitration and halted; 1 on an ftvm error."
    )]
    Secondary(SecondaryArgs),
    /// Drive a running pair: `status` (epoch, lag, bytes/s, protected or not) or
    /// `test-failover` (fail the primary as a dying host would; the secondary takes over).
    /// `test-restart-secondary` (fail the secondary; start a new one, which syncs and restores
    /// protection), `suspend` (stop replicating; the secondary exits, the VM runs
    /// unprotected), `resume` (start the secondary again; it syncs), `ft-off` (as suspend, and
    /// forget the secondary's configuration).
    Ctl(CtlArgs),
    /// List the built-in test guests.
    Guests,
    /// Run the failover coordinator: cluster state, placement under the FT limits, respawn.
    /// Settings may come from a TOML file (--config; the options given override it).
    #[command(args_override_self = true)]
    Coordinator(CoordinatorArgs),
    /// Run a host agent: starts and stops this host's VMM processes for the coordinator.
    #[command(args_override_self = true)]
    HostAgent(HostAgentArgs),
    /// Create, start, stop and list VMs (through the coordinator).
    #[command(subcommand)]
    Vm(VmCmd),
    /// API tokens for operators and scripts (admin only).
    #[command(subcommand)]
    Token(TokenCmd),
    /// Hosts: join tokens and forgetting a host's certificate (admin only).
    #[command(subcommand)]
    Host(HostCmd),
    /// vSphere's FT operations on a VM (through the coordinator).
    Ft(FtArgs),
    /// Protection state, hosts, epoch, lag, last failover (through the coordinator).
    Status(StatusArgs),
    /// The cluster's history: failovers with their evidence, host state changes, protection
    /// lost and restored, and every operation with who asked for it (through the
    /// coordinator; read-only tokens may read it).
    Events(EventsArgs),
    /// The embedded default: a coordinator and three host agents on this machine, an
    /// FT-protected counter VM, Test Failover and Test Restart Secondary with timelines.
    Demo(DemoArgs),
}

#[derive(Args)]
struct CoordinatorOpt {
    /// The coordinator's address; several (comma-separated) for a coordinator with standbys:
    /// the one that answers is used. Default: the config file's, else 127.0.0.1:7700.
    #[arg(long, value_name = "ADDR[,ADDR…]", env = "FTVM_COORDINATOR")]
    coordinator: Option<String>,
    /// The CLI's config file (TOML: coordinator, ca, token), as `ftvm coordinator init` writes
    /// it. Default: ~/.config/ftvm/config.toml if it exists. FTVM_TOKEN and FTVM_CA override
    /// its token and CA.
    #[arg(long, value_name = "FILE", env = "FTVM_CONFIG")]
    config: Option<PathBuf>,
}

impl CoordinatorOpt {
    fn client(&self) -> Result<cluster::client::Client> {
        cluster::client::Client::operator(self.coordinator.as_deref(), self.config.as_deref())
    }
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct CoordinatorArgs {
    #[command(subcommand)]
    init: Option<CoordinatorInit>,
    #[command(flatten)]
    run: CoordinatorRunArgs,
}

#[derive(Subcommand)]
enum CoordinatorInit {
    /// Create the cluster: its CA (certificates for the coordinator and the hosts) and the
    /// first admin API token, written with the CA to PKI/admin.toml for the CLI.
    Init {
        /// As for the coordinator: where the cluster state and datastores live.
        #[arg(long, value_name = "DIR", default_value = "ftvm-cluster")]
        dir: PathBuf,
        /// Where the CA goes (default DIR/pki). ca.key signs host certificates: keep it off
        /// the datastore the hosts share in production.
        #[arg(long = "pki-dir", value_name = "DIR")]
        pki_dir: Option<PathBuf>,
        /// The coordinator address admin.toml names.
        #[arg(long, value_name = "ADDR[,ADDR…]", default_value = cluster::DEFAULT_COORDINATOR)]
        coordinator: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Args)]
struct StoreArgs {
    /// Keep the cluster state in etcd at these endpoints (comma-separated, e.g.
    /// http://10.0.0.5:2379) instead of the embedded file store in DIR/store. Needs a build
    /// with `--features etcd`.
    #[arg(long, value_name = "URLS", value_delimiter = ',')]
    etcd: Vec<String>,
    /// Keys under this etcd prefix (one per cluster).
    #[arg(long = "etcd-prefix", value_name = "PREFIX", default_value = "/ftvm/")]
    etcd_prefix: String,
    /// etcd over TLS (https:// endpoints): the CA certificate (PEM) that signed etcd's.
    #[arg(long = "etcd-ca", value_name = "PEM", requires = "etcd")]
    etcd_ca: Option<PathBuf>,
    /// A client certificate (PEM) for an etcd that requires one (--client-cert-auth).
    #[arg(long = "etcd-cert", value_name = "PEM", requires_all = ["etcd_ca", "etcd_key"])]
    etcd_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long = "etcd-key", value_name = "PEM", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
}

impl StoreArgs {
    fn choice(self) -> cluster::coordinator::StoreChoice {
        if self.etcd.is_empty() {
            cluster::coordinator::StoreChoice::File
        } else {
            cluster::coordinator::StoreChoice::Etcd {
                endpoints: self.etcd,
                prefix: self.etcd_prefix,
                tls: self
                    .etcd_ca
                    .map(|ca| (ca, self.etcd_cert.zip(self.etcd_key))),
            }
        }
    }
}

#[derive(Args)]
struct CoordinatorRunArgs {
    /// A TOML file of settings named as these options (`listen = "0.0.0.0:7700"`,
    /// `host-timeout-ms = 1000`, `tls-name = ["coord.example"]`, `etcd = "…"`); options on
    /// the command line override it. See contrib/coordinator.toml.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Cluster state and every VM's datastore (DIR/vms/NAME), shared with the hosts.
    #[arg(long, value_name = "DIR", default_value = "ftvm-cluster")]
    dir: PathBuf,
    /// Where the HTTPS API listens (IP:PORT); agents and the CLI connect here.
    #[arg(long, value_name = "ADDR", default_value = cluster::DEFAULT_COORDINATOR)]
    listen: std::net::SocketAddr,
    /// At most this many secondaries per host (vSphere's default is 4).
    #[arg(
        long = "max-secondaries-per-host",
        value_name = "N",
        default_value_t = 4
    )]
    max_secondaries: usize,
    /// A host with no heartbeat for this long is down.
    #[arg(long = "host-timeout-ms", value_name = "MS", default_value_t = 1000)]
    host_timeout_ms: u64,
    /// Secondaries' FT ports are taken from here up to 65535 (at most 20000 of them).
    #[arg(long = "ft-port-base", value_name = "PORT", default_value_t = 47000,
          value_parser = clap::value_parser!(u16).range(1024..))]
    ft_port_base: u16,
    /// The cluster CA made by `ftvm coordinator init` (default DIR/pki).
    #[arg(long = "pki-dir", value_name = "DIR")]
    pki_dir: Option<PathBuf>,
    /// Another name (IP address or DNS name) clients reach this coordinator by; its serving
    /// certificate covers these, the listen address, 127.0.0.1 and localhost. Repeatable.
    #[arg(long = "tls-name", value_name = "NAME")]
    tls_name: Vec<String>,
    /// How many events the cluster's history keeps (`ftvm events`); older ones are deleted
    /// from the store.
    #[arg(long = "event-retain", value_name = "N", default_value_t = coordinator::events::DEFAULT_RETAIN as u32,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    event_retain: u32,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args)]
struct HostAgentArgs {
    /// A TOML file of settings named as these options (`name = "h1"`, `ip = "10.0.0.11"`,
    /// `coordinator = "…"`, `state-dir = "…"`); options on the command line override it.
    /// See contrib/host-agent.toml.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// This host's name in the cluster.
    #[arg(long, value_name = "H")]
    name: String,
    /// This host's address for FT links.
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    ip: std::net::IpAddr,
    /// The coordinator's address (several, comma-separated, with standbys).
    #[arg(long, value_name = "ADDR[,ADDR…]", env = "FTVM_COORDINATOR", default_value = cluster::DEFAULT_COORDINATOR)]
    coordinator: String,
    /// Where the host's certificate and key are kept (default /var/lib/ftvm/agent-NAME).
    #[arg(long = "state-dir", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// First start only: a join token from `ftvm host join-token`.
    #[arg(long, value_name = "TOKEN", env = "FTVM_JOIN_TOKEN")]
    join: Option<String>,
    /// First start only: the cluster CA certificate (PKI/ca.pem of `ftvm coordinator init`).
    #[arg(long, value_name = "CA.pem")]
    ca: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create an API token (printed once; the coordinator keeps only its hash).
    Create {
        name: String,
        /// admin: everything; operator: VM and FT operations; read-only: status and lists.
        #[arg(long, value_name = "ROLE", value_parser = ["admin", "operator", "read-only"])]
        role: String,
        #[command(flatten)]
        coord: CoordinatorOpt,
    },
    /// List API tokens (names, roles, when created and revoked; never secrets).
    List {
        /// As JSON (an array of tokens) instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        coord: CoordinatorOpt,
    },
    /// Revoke an API token: it is refused from now on.
    Revoke {
        name: String,
        #[command(flatten)]
        coord: CoordinatorOpt,
    },
}

#[derive(Subcommand)]
enum HostCmd {
    /// Create a one-time token for a new host to join with (`ftvm host-agent --join`).
    JoinToken {
        /// How long it stays good, in seconds (at most 7 days).
        #[arg(long = "ttl-s", value_name = "S", default_value_t = 3600)]
        ttl_s: u64,
        #[command(flatten)]
        coord: CoordinatorOpt,
    },
    /// Forget a host's certificate: its agent is refused until it joins again.
    Forget {
        name: String,
        #[command(flatten)]
        coord: CoordinatorOpt,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// Define a VM (`--ft` to protect it from the start).
    Create {
        name: String,
        #[command(flatten)]
        guest: GuestArgs,
        /// Turn FT on (at most 8 vCPUs).
        #[arg(long)]
        ft: bool,
        /// Give the VM a virtio-blk disk of this many MiB (created zeroed; with FT each side
        /// keeps its own copy in the VM's datastore directory).
        #[arg(long = "disk-mib", value_name = "MIB",
              value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
        disk_mib: Option<u64>,
        // --tap: every host must provide a tap of that name (bridged to the VM network);
        // each process attaches its own host's.
        #[command(flatten)]
        net: NetArgs,
        #[command(flatten)]
        coord: CoordinatorOpt,
    },
    /// Run a defined VM: its primary is placed on a host (and its secondary, with FT).
    Start {
        name: String,
        #[command(flatten)]
        coord: CoordinatorOpt,
    },
    /// Stop a VM: its primary and secondary processes are stopped; the definition stays.
    Stop {
        name: String,
        #[command(flatten)]
        coord: CoordinatorOpt,
    },
    /// List the defined VMs with their state and placement.
    List {
        /// As JSON (`{"vms": […]}`, every VM's definition and state) instead of lines.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        coord: CoordinatorOpt,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FtOp {
    On,
    Off,
    Suspend,
    Resume,
    TestFailover,
    TestRestartSecondary,
    MigrateSecondary,
}

#[derive(Args)]
struct FtArgs {
    #[arg(value_enum)]
    op: FtOp,
    name: String,
    /// For migrate-secondary: the host to move the secondary to.
    #[arg(long, value_name = "HOST", required_if_eq("op", "migrate-secondary"))]
    to: Option<String>,
    #[command(flatten)]
    coord: CoordinatorOpt,
}

#[derive(Args)]
struct EventsArgs {
    /// Only events about this VM.
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// Only events about this host.
    #[arg(long, value_name = "NAME")]
    host: Option<String>,
    /// Only events since this time: an age ("10m", "2h 30m", "1day") or an RFC 3339 time
    /// ("2026-12-06T10:00:00Z").
    #[arg(long, value_name = "WHEN", value_parser = parse_since)]
    since: Option<u64>,
    /// At most this many (the newest).
    #[arg(long, value_name = "N", default_value_t = 100)]
    limit: usize,
    /// Keep printing events as they happen (until interrupted).
    #[arg(long, short)]
    follow: bool,
    /// One JSON object per event (JSON Lines) instead of aligned columns.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    coord: CoordinatorOpt,
}

/// `--since`: an age before now, or an RFC 3339 time; Unix ms.
fn parse_since(s: &str) -> Result<u64, String> {
    let t = match humantime::parse_duration(s) {
        Ok(age) => std::time::SystemTime::now()
            .checked_sub(age)
            .ok_or("that age reaches before 1970")?,
        Err(_) => humantime::parse_rfc3339_weak(s).map_err(|_| {
            format!("{s:?} is neither an age (\"10m\", \"2h\") nor an RFC 3339 time (\"2026-12-06T10:00:00Z\")")
        })?,
    };
    Ok(t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64))
}

#[derive(Args)]
struct StatusArgs {
    name: Option<String>,
    /// As JSON (`{"vms": […], "hosts": {…}}`: every VM with its primary's and secondary's
    /// typed status, every host) instead of lines.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    coord: CoordinatorOpt,
}

#[derive(Args)]
struct DemoArgs {
    /// Where the demo keeps its state and logs (default: a fresh temporary directory).
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

#[derive(Args)]
struct CtlArgs {
    /// The pair's shared datastore directory.
    #[arg(long, value_name = "DIR")]
    datastore: PathBuf,
    #[arg(value_enum)]
    command: CtlCommand,
    /// `status`: print each side's status as one JSON object (`{"primary": {…},
    /// "secondary": {…}}`, a side that does not answer absent) instead of `key=value` lines.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CtlCommand {
    Status,
    TestFailover,
    TestRestartSecondary,
    FtOff,
    Suspend,
    Resume,
}

#[derive(Args)]
struct PrimaryArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// The secondary's FT link address (UDP, QUIC). Without it the guest starts unprotected
    /// (no write tracking) and is protected once a `peer` file in the datastore names a
    /// secondary (how the coordinator turns FT on for a running VM).
    #[arg(long, value_name = "ADDR")]
    peer: Option<std::net::SocketAddr>,
    /// Shared datastore directory (keys, heartbeat, arbitration); the same for both sides.
    #[arg(long, value_name = "DIR")]
    datastore: PathBuf,
    /// Append the released console output to this file (put it on the datastore so a new
    /// primary can finish releasing exactly once); stdout if absent.
    #[arg(long = "serial-out", value_name = "FILE")]
    serial_out: Option<PathBuf>,
    /// Longest epoch, in milliseconds. An epoch closes sooner when guest output (console,
    /// network frames) is waiting (see --min-epoch-ms), so a longer epoch does not delay
    /// output; it is how much guest work a failover may redo, and fewer epochs cost less
    /// (the default was chosen by `ftvm-bench ft`: README, Performance).
    #[arg(long = "epoch-ms", value_name = "MS", default_value_t = ft::DEFAULT_EPOCH_MS)]
    epoch_ms: u64,
    /// Shortest epoch when guest output is waiting, in milliseconds.
    #[arg(long = "min-epoch-ms", value_name = "MS", default_value_t = 2)]
    min_epoch_ms: u64,
    /// How dirty pages travel: `xor-lz4` deltas against the secondary's copy (unchanged
    /// pages skipped; the primary keeps a shadow of guest memory: as much memory again), or
    /// `raw` pages (no shadow; far more bytes, and CPU, on the link). See the README's
    /// performance section for the measured costs of each.
    #[arg(long = "page-encoding", value_enum, default_value_t = ft::PageEncoding::XorLz4)]
    page_encoding: ft::PageEncoding,
    /// When each epoch's dirty pages are copied out: `background` write-protects them in the
    /// pause and copies them once the guest runs again (a guest write to a page not yet
    /// copied waits for it; needs userfaultfd, else falls back), `paused` copies them with the
    /// guest paused (a longer pause: ~0.5 µs per page measured here).
    #[arg(long = "epoch-copy", value_enum, default_value_t = ft::EpochCopy::Background)]
    epoch_copy: ft::EpochCopy,
    /// How the pages each epoch changed are found: `chunks` write-protects guest memory in
    /// 2 MiB chunks (userfaultfd), copies each epoch the chunks the guest wrote and sends the
    /// pages whose content changed (guest memory stays in huge pages and is fully backed
    /// while protected; needs Linux 6.4+, else falls back to `dirty-log`); `dirty-log` uses
    /// KVM's dirty log (exact 4 KiB pages, but KVM maps guest memory in 4 KiB pages while it
    /// logs: measured ~4x slower here for a memory-heavy guest).
    #[arg(long = "dirty-tracking", value_enum, default_value_t = ft::Tracking::Chunks)]
    tracking: ft::Tracking,
    /// When the guest ends, write one CSV line per epoch here: its pause and the pages taken
    /// at the pause (dirty pages; with chunk tracking every page of each written chunk), and
    /// where the pause went (stopping the vCPUs, dirty log, state capture together with the
    /// pages' protection or copy, which runs beside it, and that page part alone), then the
    /// copy after the pause and the guest writes that waited for it, the part of the pause
    /// spent waiting for a secondary that fell behind, and the pages sent (those whose
    /// content changed); times in µs.
    #[arg(long = "epoch-stats", value_name = "FILE")]
    epoch_stats: Option<PathBuf>,
    /// The guest's disk image (virtio-blk). The secondary keeps its own copy (its --disk),
    /// filled during the sync and updated with every committed epoch's writes.
    #[arg(long, value_name = "FILE")]
    disk: Option<PathBuf>,
    #[command(flatten)]
    net: NetArgs,
    #[command(flatten)]
    detect: DetectArgs,
}

#[derive(Args)]
struct NetArgs {
    /// Give the guest a virtio-net device (virtio-mmio at 0xd0001000, GSI 6) on this host tap
    /// device (an existing tap, e.g. `ip tuntap add NAME mode tap` bridged to the LAN, or a
    /// new one: creating it needs CAP_NET_ADMIN). Under FT, frames the guest sends leave only
    /// once their epoch is acknowledged; the secondary gives its own --tap on its host.
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,
    /// The guest's MAC address (unicast). With --restore the saved MAC is kept.
    #[arg(long, value_name = "MAC", requires = "tap", value_parser = parse_mac,
          default_value = "02:46:54:56:4d:01")]
    mac: [u8; 6],
}

impl NetArgs {
    fn config(&self) -> Option<ft::NetConfig> {
        self.tap
            .clone()
            .map(|tap| ft::NetConfig { tap, mac: self.mac })
    }
}

/// `aa:bb:cc:dd:ee:ff`, unicast.
fn parse_mac(s: &str) -> std::result::Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        *b = parts
            .next()
            .filter(|p| p.len() == 2)
            .and_then(|p| u8::from_str_radix(p, 16).ok())
            .ok_or_else(|| format!("{s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"))?;
    }
    if parts.next().is_some() {
        return Err(format!("{s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"));
    }
    if mac[0] & 1 != 0 {
        return Err(format!(
            "{s:?} is a multicast address; a NIC needs a unicast MAC"
        ));
    }
    Ok(mac)
}

#[derive(Args)]
struct DetectArgs {
    /// Failure detection: the peer is lost when its FT-link heartbeats are missing this long,
    /// and the primary's datastore heartbeat counts as stale at this age. Use the same value
    /// on both sides. Lower fails over faster; too low mistakes a busy host for a dead one
    /// (a false failover: safe, since output is held, but it costs a re-sync).
    #[arg(long = "detect-ms", value_name = "MS", default_value_t = ft::Detect::DEFAULT_MS,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    detect_ms: u64,
}

impl DetectArgs {
    fn get(&self) -> ft::Detect {
        ft::Detect {
            timeout: Duration::from_millis(self.detect_ms),
        }
    }
}

#[derive(Args)]
struct SecondaryArgs {
    /// FT link address to listen on (UDP, QUIC).
    #[arg(long, value_name = "ADDR")]
    listen: std::net::SocketAddr,
    /// Shared datastore directory; the same as the primary's.
    #[arg(long, value_name = "DIR")]
    datastore: PathBuf,
    /// The console file after a takeover (the same file as the primary's --serial-out).
    #[arg(long = "serial-out", value_name = "FILE")]
    serial_out: Option<PathBuf>,
    /// This side's copy of the guest's disk (required if the primary's guest has one; it is
    /// overwritten by the sync and sized to the primary's disk).
    #[arg(long, value_name = "FILE")]
    disk: Option<PathBuf>,
    /// The tap on this host the guest's network device uses after a takeover (required if
    /// the primary's guest has one). Attached only at takeover (the name is checked at start);
    /// the guest's MAC comes from its state.
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,
    #[command(flatten)]
    detect: DetectArgs,
}

#[derive(Args)]
struct GuestArgs {
    /// Built-in test guest to boot (see `ftvm guests`).
    #[arg(long, value_name = "NAME", conflicts_with = "kernel")]
    guest: Option<String>,
    /// Kernel image to boot: a PVH ELF, or a Linux bzImage (Linux/x86 boot protocol, 64-bit entry).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk: a bzImage's ramdisk, or a PVH kernel's first `hvm_start_info` module.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel / guest command line (e.g. "count=1000 rate=0" for the counter guest).
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// Number of vCPUs (1 to 8: the FT limit applies to every VM).
    #[arg(long, value_name = "N", default_value_t = 1)]
    vcpus: u32,
    /// Guest memory in MiB (at least 16).
    #[arg(long = "mem-mib", value_name = "M", default_value_t = 128)]
    mem_mib: u64,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// Append the serial console to this file instead of writing it to stdout.
    #[arg(long = "serial-out", value_name = "FILE")]
    serial_out: Option<PathBuf>,
    /// Pause the VM after this many milliseconds, write its full state to --save and exit 0.
    #[arg(long = "save-after-ms", value_name = "T", requires = "save")]
    save_after_ms: Option<u64>,
    /// Where --save-after-ms writes the VM state.
    #[arg(long, value_name = "STATE", requires = "save_after_ms")]
    save: Option<PathBuf>,
    /// Continue a VM from a state file written by --save (in this new process).
    #[arg(long, value_name = "STATE", conflicts_with_all = ["guest", "kernel", "cmdline", "vcpus", "mem_mib"])]
    restore: Option<PathBuf>,
    /// A raw disk image (size a multiple of 512) for the guest, as virtio-blk over virtio-mmio
    /// at 0xd0000000, GSI 5. With --restore: the same disk the VM was saved with.
    #[arg(long, value_name = "FILE")]
    disk: Option<PathBuf>,
    #[command(flatten)]
    net: NetArgs,
    /// Back all guest memory before the guest starts (as QEMU's -mem-prealloc): the guest
    /// then never waits for the host to zero a page it touches first. An FT-protected VM
    /// always has its memory backed in full (as vSphere FT reserves it), so this is the
    /// like-for-like unprotected baseline.
    #[arg(long = "mem-prealloc")]
    mem_prealloc: bool,
}

fn serial_sink(path: Option<&Path>) -> Result<SerialOut> {
    Ok(match path {
        None => Box::new(std::io::stdout()),
        Some(p) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("cannot open --serial-out {}", p.display()))?,
        ),
    })
}

/// A usage error (exit 2, as clap's own) when neither --guest nor --kernel is given.
fn need_boot_image(a: &GuestArgs, cmd: &str, or: &str) {
    if a.guest.is_none() && a.kernel.is_none() {
        use clap::CommandFactory;
        let mut c = Cli::command();
        let sub = c.find_subcommand_mut(cmd).expect("subcommand").clone();
        sub.bin_name(format!("ftvm {cmd}"))
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                format!("give --guest NAME or --kernel PATH{or}"),
            )
            .exit();
    }
}

fn boot_source(a: &GuestArgs) -> Result<BootSource> {
    let (image, initrd) = match (&a.guest, &a.kernel) {
        (Some(name), None) => {
            let g = guests::by_name(name).with_context(|| {
                format!(
                    "unknown guest {name:?}; built-in guests: {}",
                    guests::names().join(", ")
                )
            })?;
            (g.elf.to_vec(), None)
        }
        (None, Some(path)) => {
            let image = std::fs::read(path)
                .with_context(|| format!("cannot read kernel {}", path.display()))?;
            let initrd = match &a.initrd {
                Some(p) => Some(
                    std::fs::read(p)
                        .with_context(|| format!("cannot read initrd {}", p.display()))?,
                ),
                None => None,
            };
            (image, initrd)
        }
        _ => bail!("give --guest NAME or --kernel PATH (or, for `run`, --restore STATE)"),
    };
    Ok(BootSource::Kernel {
        image,
        initrd,
        cmdline: a.cmdline.clone(),
    })
}

fn run(a: RunArgs) -> Result<u8> {
    let serial = serial_sink(a.serial_out.as_deref())?;
    let mut vm = match &a.restore {
        Some(state) => Vmm::restore(state, serial, vmm::DirtyTracking::Off)
            .with_context(|| format!("cannot restore VM from {}", state.display()))?,
        None => {
            let vcpus = vmm::check_vcpus(a.guest.vcpus)?;
            let src = boot_source(&a.guest)?;
            let cfg = VmConfig {
                vcpus,
                mem_mib: a.guest.mem_mib,
                dirty: vmm::DirtyTracking::Off,
            };
            Vmm::boot(&cfg, &src, serial).context("cannot create the VM")?
        }
    };
    ft::attach_disk(
        &mut vm,
        a.disk.as_deref(),
        "the saved VM has a disk: give it again with --disk FILE",
    )?;
    ft::attach_net(
        &mut vm,
        a.net.tap.as_deref().map(ft::open_tap).transpose()?,
        a.net.mac,
        "the saved VM has a network device: give a tap with --tap NAME",
    )?;
    if a.mem_prealloc {
        vmm::memory::populate(vm.memory()).context("cannot back guest memory (--mem-prealloc)")?;
    }
    vm.resume()?;
    let ev = match (a.save_after_ms, &a.save) {
        (Some(ms), Some(path)) => match vm.wait_event(Some(Duration::from_millis(ms))) {
            Some(ev) => {
                eprintln!("ftvm: the guest ended before --save-after-ms {ms}; no state saved");
                ev
            }
            None => {
                vm.save(path)
                    .with_context(|| format!("cannot save VM state to {}", path.display()))?;
                vm.stop();
                eprintln!("ftvm: VM state saved to {} after {ms} ms", path.display());
                return Ok(0);
            }
        },
        _ => vm.wait_event(None).unwrap_or(VmEvent::Error {
            vcpu: 0,
            msg: "all vCPUs gone".into(),
        }),
    };
    Ok(vm.finish(ev)?)
}

fn run_vm(c: VmCmd) -> Result<u8> {
    use cluster::proto::Request;
    let (addr, req) = match c {
        VmCmd::Create {
            name,
            guest,
            ft,
            disk_mib,
            net,
            coord,
        } => {
            // The hosts' agents start the VMM elsewhere: relative paths mean this directory.
            let on_hosts = |p: PathBuf| -> Result<PathBuf> {
                std::path::absolute(&p).with_context(|| format!("path {}", p.display()))
            };
            let mut guest = guest;
            guest.kernel = guest.kernel.map(on_hosts).transpose()?;
            guest.initrd = guest.initrd.map(on_hosts).transpose()?;
            // Checked here, where it is given, not when a host first fails to boot it.
            let vcpus = vmm::check_vcpus(guest.vcpus)?;
            boot_source(&guest)?;
            let text = |p: Option<PathBuf>| p.map(|p| p.display().to_string());
            (
                coord,
                Request::VmCreate {
                    name,
                    guest: guest.guest,
                    kernel: text(guest.kernel),
                    initrd: text(guest.initrd),
                    disk_mib,
                    mac: net.tap.as_ref().map(|_| {
                        net.mac
                            .iter()
                            .map(|b| format!("{b:02x}"))
                            .collect::<Vec<_>>()
                            .join(":")
                    }),
                    tap: net.tap,
                    cmdline: guest.cmdline,
                    vcpus,
                    mem_mib: guest.mem_mib,
                    ft,
                },
            )
        }
        VmCmd::Start { name, coord } => (coord, Request::VmStart { name }),
        VmCmd::Stop { name, coord } => (coord, Request::VmStop { name }),
        VmCmd::List { coord, json: true } => {
            return print_json(&coord.client()?, &Request::VmList);
        }
        VmCmd::List { coord, .. } => (coord, Request::VmList),
    };
    println!("{}", cluster::ops::call(&addr.client()?, &req)?);
    Ok(0)
}

/// `--json`: the JSON of a status-like reply.
fn print_json(api: &cluster::client::Client, req: &cluster::proto::Request) -> Result<u8> {
    match cluster::ops::send(api, req)? {
        cluster::proto::Reply::Status { json, .. } => {
            println!("{}", serde_json::to_string_pretty(&json)?);
            Ok(0)
        }
        cluster::proto::Reply::Error { text } => bail!("{text}"),
        _ => bail!("the coordinator's reply has no JSON form"),
    }
}

fn run_token(c: TokenCmd) -> Result<u8> {
    use cluster::api::{NewToken, Secret, TokenInfo};
    match c {
        TokenCmd::Create { name, role, coord } => {
            let role = role.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            let s: Secret = coord.client()?.call(
                "POST",
                "/api/v1/tokens",
                Some(&NewToken {
                    name: name.clone(),
                    role,
                }),
            )?;
            eprintln!("created API token {name}; it is shown only now:");
            println!("{}", s.token);
        }
        TokenCmd::List { coord, json } => {
            let list: Vec<TokenInfo> =
                coord.client()?.call("GET", "/api/v1/tokens", None::<&()>)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(0);
            }
            println!("{:<20} {:<10} {:<24} STATE", "NAME", "ROLE", "CREATED BY");
            for t in list {
                println!(
                    "{:<20} {:<10} {:<24} {}",
                    t.name,
                    t.role.name(),
                    t.created_by,
                    if t.revoked_ms.is_some() {
                        "revoked"
                    } else {
                        "live"
                    }
                );
            }
        }
        TokenCmd::Revoke { name, coord } => delete(
            &coord,
            &format!("/api/v1/tokens/{}", cluster::ops::seg(&name)),
        )?,
    }
    Ok(0)
}

fn run_host(c: HostCmd) -> Result<u8> {
    use cluster::api::{NewJoin, Secret};
    match c {
        HostCmd::JoinToken { ttl_s, coord } => {
            let s: Secret =
                coord
                    .client()?
                    .call("POST", "/api/v1/join-tokens", Some(&NewJoin { ttl_s }))?;
            eprintln!(
                "one-time join token, good for {ttl_s} s; on the new host run:\n  ftvm host-agent \
                 --name NAME --coordinator ADDR --ca CA.pem --join TOKEN\n(the cluster CA's \
                 sha256 is {})",
                s.ca_sha256.unwrap_or_default()
            );
            println!("{}", s.token);
        }
        HostCmd::Forget { name, coord } => delete(
            &coord,
            &format!("/api/v1/hosts/{}/identity", cluster::ops::seg(&name)),
        )?,
    }
    Ok(0)
}

/// `DELETE path`; prints the coordinator's one-line answer.
fn delete(coord: &CoordinatorOpt, path: &str) -> Result<()> {
    let r: serde_json::Value = coord.client()?.call("DELETE", path, None::<&()>)?;
    println!("{}", r["text"].as_str().unwrap_or_default());
    Ok(())
}

fn run_ft(a: FtArgs) -> Result<u8> {
    use cluster::proto::{FtAction, Request};
    let addr = a.coord.client()?;
    let action = match a.op {
        FtOp::TestFailover => {
            println!("{}", cluster::ops::test_failover(&addr, &a.name)?);
            return Ok(0);
        }
        FtOp::TestRestartSecondary => {
            println!("{}", cluster::ops::test_restart_secondary(&addr, &a.name)?);
            return Ok(0);
        }
        FtOp::On => FtAction::On,
        FtOp::Off => FtAction::Off,
        FtOp::Suspend => FtAction::Suspend,
        FtOp::Resume => FtAction::Resume,
        FtOp::MigrateSecondary => FtAction::MigrateSecondary {
            to: a.to.unwrap_or_default(),
        },
    };
    println!(
        "{}",
        cluster::ops::call(
            &addr,
            &Request::Ft {
                name: a.name,
                action
            }
        )?
    );
    Ok(0)
}

fn run_ctl(a: CtlArgs) -> Result<u8> {
    // Never creates anything: a typo is an error, not a new empty datastore.
    if !a.datastore.is_dir() {
        bail!(
            "no datastore at {} (not a directory): give the --datastore of a running pair",
            a.datastore.display()
        );
    }
    match a.command {
        CtlCommand::Status => {
            let mut sides = serde_json::Map::new();
            for role in ["primary", "secondary"] {
                if let Ok(st) = ctl::status(&a.datastore, role, Duration::from_secs(5)) {
                    if !a.json {
                        println!("{role}: {}", st.line());
                    }
                    sides.insert(role.into(), serde_json::to_value(&st)?);
                }
            }
            if a.json && !sides.is_empty() {
                println!("{}", serde_json::Value::Object(sides.clone()));
            }
            if sides.is_empty() {
                bail!("neither side answers on {}/ctl-*.sock (is a pair running with this --datastore?)", a.datastore.display());
            }
            Ok(0)
        }
        CtlCommand::TestFailover => {
            // The secondary's command line, to start a new one once it has taken over.
            let argv = ft::datastore::Datastore::open(&a.datastore, false)?.secondary_command()?;
            let t0 = std::time::Instant::now();
            let reply = ctl::request(&a.datastore, "primary", ctl::Request::TestFailover)?;
            println!("primary: {reply}");
            // The secondary answers on the primary's socket once it has taken over.
            let live = loop {
                if let Ok(st) = ctl::status(&a.datastore, "primary", Duration::from_secs(5)) {
                    if st.takeover.is_some() {
                        break st.line();
                    }
                }
                if t0.elapsed() > Duration::from_secs(30) {
                    bail!("the secondary did not go live within 30 s");
                }
                std::thread::sleep(Duration::from_millis(2));
            };
            println!(
                "secondary is live after {} ms: {live}",
                t0.elapsed().as_millis()
            );
            // As vSphere's Test Failover does: a new secondary, synced, protection back.
            start_secondary_and_wait(&a.datastore, &argv, 0, t0)
        }
        CtlCommand::TestRestartSecondary => {
            let before = primary_sessions(&a.datastore)?;
            let argv = ft::datastore::Datastore::open(&a.datastore, false)?.secondary_command()?;
            let t0 = std::time::Instant::now();
            let reply = ctl::request(
                &a.datastore,
                "secondary",
                ctl::Request::TestRestartSecondary,
            )?;
            println!("secondary: {reply}");
            // Let the old one's control socket go away before the new one binds it.
            std::thread::sleep(Duration::from_millis(50));
            start_secondary_and_wait(&a.datastore, &argv, before, t0)
        }
        CtlCommand::Resume => {
            let before = primary_sessions(&a.datastore)?;
            let argv = ft::datastore::Datastore::open(&a.datastore, false)?.secondary_command()?;
            start_secondary_and_wait(&a.datastore, &argv, before, std::time::Instant::now())
        }
        CtlCommand::Suspend | CtlCommand::FtOff => {
            let req = if matches!(a.command, CtlCommand::Suspend) {
                ctl::Request::Suspend
            } else {
                ctl::Request::FtOff
            };
            println!("primary: {}", ctl::request(&a.datastore, "primary", req)?);
            Ok(0)
        }
    }
}

fn primary_sessions(datastore: &Path) -> Result<u64> {
    Ok(ctl::status(datastore, "primary", Duration::from_secs(5))?.sessions)
}

/// Starts a secondary with the recorded command line (detached, its output appended to
/// DIR/secondary.log) and waits until the primary has a new protection session.
fn start_secondary_and_wait(
    datastore: &Path,
    argv: &[String],
    before: u64,
    t0: std::time::Instant,
) -> Result<u8> {
    let log_path = datastore.join("secondary.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)?;
    let log_start = log.metadata()?.len();
    let mut child = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the new secondary")?;
    println!("new secondary started: {}", argv[1..].join(" "));
    while t0.elapsed() < Duration::from_secs(60) {
        if let Some(status) = child.try_wait()? {
            // It gave up (the primary stalled in the sync, a bad address…): say so now, not
            // after a minute of waiting.
            let said = std::fs::read(&log_path).unwrap_or_default();
            let said = String::from_utf8_lossy(said.get(log_start as usize..).unwrap_or_default());
            let last = said
                .lines()
                .rev()
                .find(|l| l.contains("error"))
                .or_else(|| said.lines().last())
                .unwrap_or("(it logged nothing)");
            bail!(
                "the new secondary exited ({status}) before protection came back: {}",
                last.trim_start_matches("ftvm: error: ")
            );
        }
        if let Ok(st) = ctl::status(datastore, "primary", Duration::from_secs(5)) {
            if st.sessions > before && st.protected {
                println!(
                    "protection restored after {} ms: {}",
                    t0.elapsed().as_millis(),
                    st.line()
                );
                return Ok(0);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!(
        "protection did not come back within 60 s (see {}/secondary.log)",
        datastore.display()
    )
}

/// Now, in microseconds since the Unix epoch (status lines and timelines compare these
/// across processes on one host).
pub(crate) fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// Deterministic pseudo-random byte strings for parser tests (no extra dependency in the
/// binary crate): `count` inputs of 0 to `max_len - 1` bytes from xorshift state `seed`.
#[cfg(test)]
pub(crate) fn pseudo_random_inputs(
    seed: u64,
    count: usize,
    max_len: u64,
) -> impl Iterator<Item = Vec<u8>> {
    let mut x = seed;
    (0..count).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = (x % max_len) as usize;
        (0..len).map(|i| (x >> (i % 8 * 8)) as u8).collect()
    })
}

/// `ftvm coordinator --config FILE` and `ftvm host-agent --config FILE`: the file's settings
/// (TOML, keys named as the long options, `_` or `-`) become options placed before those of
/// the command line, which override them (the two commands take a repeated option as the
/// last one given). An unknown key, or a value of the wrong kind, is an error naming the file.
fn with_config_file(argv: Vec<std::ffi::OsString>) -> Result<Vec<std::ffi::OsString>, String> {
    use clap::CommandFactory;
    let Some(sub) = argv.get(1).and_then(|a| a.to_str()).map(str::to_string) else {
        return Ok(argv);
    };
    if !["coordinator", "host-agent"].contains(&sub.as_str())
        || argv.get(2).is_some_and(|a| a == "init")
    {
        return Ok(argv);
    }
    let mut path = None;
    for (i, a) in argv.iter().enumerate().skip(2) {
        let a = a.to_string_lossy();
        if a == "--config" {
            path = argv.get(i + 1).map(std::path::PathBuf::from);
        } else if let Some(p) = a.strip_prefix("--config=") {
            path = Some(p.into());
        }
    }
    let Some(path) = path else { return Ok(argv) };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))?;
    let cmd = Cli::command();
    let known: Vec<String> = cmd
        .find_subcommand(&sub)
        .map(|c| {
            c.get_arguments()
                .filter_map(|a| a.get_long().map(str::to_string))
                .filter(|l| l != "config" && l != "help")
                .collect()
        })
        .unwrap_or_default();
    let mut extra: Vec<std::ffi::OsString> = Vec::new();
    for (k, v) in &table {
        let key = k.replace('_', "-");
        if !known.contains(&key) {
            return Err(format!(
                "config file {}: unknown setting {k:?} for ftvm {sub} (known: {})",
                path.display(),
                known.join(", ")
            ));
        }
        let scalar = |v: &toml::Value| -> Result<String, String> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                _ => Err(format!(
                    "config file {}: {k} must be a string or a number, not {}",
                    path.display(),
                    v.type_str()
                )),
            }
        };
        match v {
            toml::Value::Boolean(true) => extra.push(format!("--{key}").into()),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for it in items {
                    extra.push(format!("--{key}").into());
                    extra.push(scalar(it)?.into());
                }
            }
            v => {
                extra.push(format!("--{key}").into());
                extra.push(scalar(v)?.into());
            }
        }
    }
    let mut out = argv[..2].to_vec();
    out.extend(extra);
    out.extend_from_slice(&argv[2..]);
    Ok(out)
}

fn main() {
    let argv = match with_config_file(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ftvm: error: {e}");
            std::process::exit(2);
        }
    };
    let cli = Cli::parse_from(argv);
    // Daemons log what they do (info); one-shot commands only warnings, unless RUST_LOG says.
    let daemon = matches!(cli.cmd, Cmd::Coordinator(_) | Cmd::HostAgent(_));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| if daemon { "info" } else { "warn" }.into()),
        )
        .init();
    let res = match cli.cmd {
        Cmd::Run(a) => {
            if a.restore.is_none() {
                need_boot_image(&a.guest, "run", ", or --restore STATE");
            }
            run(a)
        }
        Cmd::Primary(a) => (|| {
            need_boot_image(&a.guest, "primary", "");
            let vcpus = vmm::check_vcpus(a.guest.vcpus)?;
            let cfg = ft::PrimaryConfig {
                vm: VmConfig {
                    vcpus,
                    mem_mib: a.guest.mem_mib,
                    ..Default::default()
                },
                boot: boot_source(&a.guest)?,
                ft: ft::FtConfig {
                    peer: a.peer,
                    datastore: a.datastore,
                    serial_out: a.serial_out,
                    epoch: Duration::from_millis(a.epoch_ms.max(1)),
                    min_epoch: Duration::from_millis(a.min_epoch_ms.min(a.epoch_ms)),
                    detect: a.detect.get(),
                    page_encoding: a.page_encoding,
                    epoch_copy: a.epoch_copy,
                    tracking: a.tracking,
                    epoch_stats: a.epoch_stats,
                },
                disk: a.disk,
                net: a.net.config(),
            };
            ft::primary(cfg)
        })(),
        Cmd::Secondary(a) => ft::secondary(ft::SecondaryConfig {
            listen: a.listen,
            datastore: a.datastore,
            serial_out: a.serial_out,
            detect: a.detect.get(),
            disk: a.disk,
            tap: a.tap,
        }),
        Cmd::Ctl(a) => run_ctl(a),
        Cmd::Coordinator(CoordinatorArgs {
            init:
                Some(CoordinatorInit::Init {
                    dir,
                    pki_dir,
                    coordinator,
                    store,
                }),
            ..
        }) => cluster::coordinator::init(cluster::coordinator::InitConfig {
            pki: pki_dir.unwrap_or_else(|| dir.join("pki")),
            dir,
            store: store.choice(),
            coordinator,
        }),
        Cmd::Coordinator(CoordinatorArgs { run: a, .. }) => {
            cluster::coordinator::run(cluster::coordinator::Config {
                pki: a.pki_dir.unwrap_or_else(|| a.dir.join("pki")),
                dir: a.dir,
                listen: a.listen,
                limits: coordinator::Limits {
                    max_secondaries_per_host: a.max_secondaries,
                    ..Default::default()
                },
                host_timeout: Duration::from_millis(a.host_timeout_ms),
                ft_port_base: a.ft_port_base,
                store: a.store.choice(),
                tls_names: a.tls_name,
                event_retain: a.event_retain as usize,
            })
        }
        Cmd::HostAgent(a) => cluster::agent::run(cluster::agent::Config {
            state_dir: a
                .state_dir
                .unwrap_or_else(|| PathBuf::from(format!("/var/lib/ftvm/agent-{}", a.name))),
            name: a.name,
            ip: a.ip.to_string(),
            coordinator: a.coordinator,
            interval: Duration::from_millis(100),
            join: a.join,
            ca: a.ca,
        }),
        Cmd::Vm(c) => run_vm(c),
        Cmd::Ft(a) => run_ft(a),
        Cmd::Token(c) => run_token(c),
        Cmd::Host(c) => run_host(c),
        Cmd::Status(a) if a.json => a
            .coord
            .client()
            .and_then(|api| print_json(&api, &cluster::proto::Request::Status { name: a.name })),
        Cmd::Status(a) => a
            .coord
            .client()
            .and_then(|api| {
                cluster::ops::call(&api, &cluster::proto::Request::Status { name: a.name })
            })
            .map(|text| {
                println!("{text}");
                0
            }),
        Cmd::Events(a) => a.coord.client().and_then(|api| {
            cluster::ops::events(
                &api,
                &coordinator::events::Filter {
                    vm: a.vm,
                    host: a.host,
                    since_ms: a.since,
                    after: None,
                    limit: Some(a.limit),
                },
                a.follow,
                a.json,
            )
        }),
        Cmd::Demo(a) => cluster::demo::run(a.dir),
        Cmd::Guests => {
            for g in guests::ALL {
                println!("{:<10} {}", g.name, g.summary);
            }
            Ok(0)
        }
    };
    // A VMM started by a host agent says how it ended in the file the agent named: the
    // guest's exit code, or ftvm's own failure (never confused with a guest's code 1).
    if let Some(f) = std::env::var_os(cluster::agent::EXIT_FILE_ENV) {
        let outcome = match &res {
            Ok(code) => cluster::agent::Outcome::Exit(*code),
            Err(e) => cluster::agent::Outcome::Failed(format!("{e:#}")),
        };
        let _ = coordinator::store::write_atomic(
            std::path::Path::new(&f),
            &serde_json::to_vec(&outcome).unwrap_or_default(),
        );
    }
    match res {
        Ok(code) => std::process::exit(code.into()),
        Err(e) => {
            eprintln!("ftvm: error: {e:#}");
            std::process::exit(1);
        }
    }
}
