//! The cluster: `ftvm coordinator`, `ftvm host-agent`, the operations CLI (`ftvm vm …`,
//! `ftvm ft …`, `ftvm status`) and `ftvm demo`.
//!
//! ```text
//!   ftvm vm/ft/status ──HTTPS+token──▶ coordinator ◀──mTLS heartbeat + reports── host-agent ×N
//!                                   │  cluster state in a Store          │ starts/stops
//!                                   │  (placement, limits, respawn)      ▼ ftvm primary/secondary
//!                                   └──── ctl sockets + `peer` file in each VM's datastore
//! ```
//!
//! The coordinator never runs a VM itself. It decides where each VM's primary and secondary
//! run and tells the host agents in its reply to their heartbeats; the agents start and kill
//! `ftvm primary` / `ftvm secondary` processes and report them (alive, exit status, and the
//! typed status of the process's control socket). FT itself (replication, failure detection,
//! arbitration, takeover) stays between the pair, so the coordinator being down never stops a
//! failover; it only delays the respawn of a secondary.
//!
//! Everything reaches the coordinator through its HTTPS API ([`api`]; [`client`] is the
//! client side): operators with API tokens, agents with host certificates of the cluster CA
//! ([`pki`]). `ftvm coordinator init` creates the CA and the first admin token. Every state
//! change and operation is an event in the store (`ftvm events`); Prometheus scrapes
//! [`metrics`] at `/metrics`.
pub mod agent;
pub mod api;
pub mod client;
pub mod coordinator;
pub mod demo;
pub mod metrics;
pub mod ops;
pub mod pki;
pub mod proto;

/// Where the CLI and the agents find the coordinator unless told otherwise.
pub const DEFAULT_COORDINATOR: &str = "127.0.0.1:7700";

pub fn now_ms() -> u64 {
    crate::now_us() / 1000
}
