//! The cluster as the coordinator keeps it: hosts, VMs, where each VM's primary and secondary
//! run, and FT state. Serialized as JSON into the [`crate::store`].
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A host running `ftvm host-agent`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    /// Address other hosts reach this one at (FT links).
    pub ip: String,
    /// Coordinator clock (ms since the Unix epoch) of the last heartbeat.
    pub last_seen_ms: u64,
    /// Reachable: a network heartbeat within the host timeout.
    pub alive: bool,
    /// The host's datastore heartbeat changed within the host timeout: it is running, whatever
    /// the network says. With `alive` false it is isolated or partitioned, not failed.
    #[serde(default)]
    pub ds_alive: bool,
}

impl Host {
    /// vSphere HA's distinction: `up`, `UNREACHABLE` (no network heartbeat, datastore
    /// heartbeat fresh: isolated or partitioned, still running), `DOWN` (neither: failed).
    pub fn state(&self) -> &'static str {
        match (self.alive, self.ds_alive) {
            (true, _) => "up",
            (false, true) => "UNREACHABLE",
            (false, false) => "DOWN",
        }
    }

    /// Failed: no network and no datastore heartbeat.
    pub fn down(&self) -> bool {
        !self.alive && !self.ds_alive
    }
}

/// FT state of a VM, as `ftvm status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum FtState {
    /// FT is off (or never was on).
    Off,
    /// A secondary is being placed, started or synced.
    Starting,
    Protected,
    /// FT is on but there is no synced secondary; `why` says what is missing.
    NotProtected {
        why: String,
    },
    /// Suspend FT: the secondary's configuration is kept, replication is stopped.
    Suspended,
}

/// Where one of a VM's processes runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub host: String,
    /// Unique per process the coordinator asked for (host agents key processes by it).
    pub id: u64,
    /// The secondary's FT port on its host (unused for a primary).
    pub port: u16,
}

/// The last failover of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failover {
    pub from: String,
    pub to: String,
    /// Coordinator clock when the old primary was seen gone (or asked to fail).
    pub at_ms: u64,
    /// From then until the new primary reported itself live.
    pub live_after_ms: u64,
    /// From then until protection was back (if it is).
    pub protected_after_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub name: String,
    /// A built-in test guest (`ftvm guests`) …
    pub guest: Option<String>,
    /// … or a kernel image path on the hosts …
    pub kernel: Option<String>,
    /// … with this initial ramdisk (a path on the hosts).
    #[serde(default)]
    pub initrd: Option<String>,
    /// A virtio-blk disk of this many MiB (each process keeps its own copy in the VM's
    /// datastore directory; the secondary's is filled by the sync).
    #[serde(default)]
    pub disk_mib: Option<u64>,
    /// The disk file the primary uses (in the VM's datastore directory).
    #[serde(default)]
    pub disk_file: Option<String>,
    /// A virtio-net device on the tap of this name, which every host provides (bridged to
    /// the VM network), with this MAC (`aa:bb:cc:dd:ee:ff`).
    #[serde(default)]
    pub tap: Option<String>,
    #[serde(default)]
    pub mac: Option<String>,
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// Asked to run (`vm start`) and not stopped since.
    pub running: bool,
    pub ft: FtState,
    pub primary: Option<Placement>,
    pub secondary: Option<Placement>,
    pub last_failover: Option<Failover>,
    /// The guest ended (exit code), if it did.
    pub ended: Option<i32>,
    /// ftvm itself failed running the VM (its error), as opposed to the guest ending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

impl Vm {
    pub fn ft_on(&self) -> bool {
        !matches!(self.ft, FtState::Off)
    }
}

/// Everything the coordinator knows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    pub hosts: BTreeMap<String, Host>,
    pub vms: BTreeMap<String, Vm>,
    /// Next [`Placement::id`].
    pub next_id: u64,
}

impl Cluster {
    pub fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Secondaries placed on `host`.
    pub fn secondaries_on(&self, host: &str) -> usize {
        self.vms
            .values()
            .filter(|v| v.secondary.as_ref().is_some_and(|p| p.host == host))
            .count()
    }

    /// vCPUs of FT VMs with a primary or a secondary on `host` (vSphere reports this
    /// against its default of 8 FT vCPUs per host).
    pub fn ft_vcpus_on(&self, host: &str) -> u32 {
        self.vms
            .values()
            .filter(|v| v.ft_on())
            .map(|v| {
                let here = [&v.primary, &v.secondary]
                    .iter()
                    .filter(|p| p.as_ref().is_some_and(|p| p.host == host))
                    .count() as u32;
                here * u32::from(v.vcpus)
            })
            .sum()
    }
}
