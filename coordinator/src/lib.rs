//! The failover coordinator.
//!
//! **Not implemented yet** (issue "Failover coordinator"). This crate will hold cluster state
//! behind a store interface (embedded file store, etcd), place secondaries under the limits
//! (8 vCPUs per FT VM, 4 secondaries per host, never on the primary's host), respawn them after
//! failures, and arbitrate so that only one copy of a VM is ever live.
