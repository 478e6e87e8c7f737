//! The coordinator's requests and replies, as the API ([`super::api`]) carries them in its
//! JSON bodies and hands them to the coordinator.
use serde::{Deserialize, Serialize};

/// The version of a host agent's report ([`Request::Heartbeat`]).
pub const REPORT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// A host agent's heartbeat: who it is and what its processes are doing.
    Heartbeat {
        /// The report's format ([`REPORT_VERSION`]); the coordinator refuses others.
        version: u32,
        host: String,
        ip: String,
        report: Vec<ProcReport>,
    },
    VmCreate {
        name: String,
        guest: Option<String>,
        kernel: Option<String>,
        #[serde(default)]
        initrd: Option<String>,
        #[serde(default)]
        disk_mib: Option<u64>,
        #[serde(default)]
        tap: Option<String>,
        #[serde(default)]
        mac: Option<String>,
        cmdline: String,
        vcpus: u8,
        mem_mib: u64,
        ft: bool,
    },
    VmStart {
        name: String,
    },
    VmStop {
        name: String,
    },
    VmList,
    Ft {
        name: String,
        action: FtAction,
    },
    Status {
        name: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FtAction {
    On,
    Off,
    Suspend,
    Resume,
    TestFailover,
    TestRestartSecondary,
    MigrateSecondary { to: String },
}

impl FtAction {
    /// The operation's name as the CLI and the API spell it.
    pub fn word(&self) -> &'static str {
        match self {
            FtAction::On => "on",
            FtAction::Off => "off",
            FtAction::Suspend => "suspend",
            FtAction::Resume => "resume",
            FtAction::TestFailover => "test-failover",
            FtAction::TestRestartSecondary => "test-restart-secondary",
            FtAction::MigrateSecondary { .. } => "migrate-secondary",
        }
    }
}

/// One process a host agent runs, as it reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProcReport {
    pub id: u64,
    pub vm: String,
    pub running: bool,
    /// Exit code; `None` while running or if a signal ended it.
    pub exit: Option<i32>,
    /// ftvm itself failed (its error), as opposed to the guest ending with a code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
    /// The process's status from its control socket, if it answered.
    pub status: Option<crate::ctl::Status>,
}

/// A process the coordinator wants on a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Assignment {
    pub id: u64,
    pub vm: String,
    /// Arguments to the `ftvm` binary.
    pub argv: Vec<String>,
    /// The VM's datastore directory (control sockets, logs).
    pub datastore: String,
    /// Start it (the coordinator has never seen it reported). A process once reported and
    /// then lost is never started again under the same id.
    pub start: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    Ok {
        text: String,
    },
    Error {
        text: String,
    },
    Assignments {
        procs: Vec<Assignment>,
        /// Where the agent writes its datastore heartbeat (a counter, every interval).
        #[serde(default)]
        heartbeat_file: Option<String>,
    },
    Status {
        #[schema(value_type = Object)]
        json: serde_json::Value,
        text: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_garbage_is_an_error_not_a_panic() {
        let r = Request::Ft {
            name: "web".into(),
            action: FtAction::MigrateSecondary { to: "h3".into() },
        };
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Request>(&j).unwrap(), r);
        for bytes in crate::pseudo_random_inputs(0x243f_6a88_85a3_08d3, 20_000, 200) {
            let _ = serde_json::from_slice::<Request>(&bytes);
        }
        assert!(serde_json::from_str::<Request>(r#"{"op":"vm-create","name":1}"#).is_err());
    }
}
