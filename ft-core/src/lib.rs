//! The FT protocol as a sans-IO core (quinn-proto is the model): both sides of a protected
//! pair as state machines that are fed records, acknowledgements, heartbeats, arbitration
//! verdicts and `now`, and answer with what to send, what to write and what to decide. No
//! sockets, files, threads or clocks in here: the `ftvm` binary's drivers (VMM, QUIC link,
//! datastore directory, console file, tap) and the deterministic simulator
//! (`tests/simulation.rs`) drive the same code.
//!
//! | module | what it decides |
//! |---|---|
//! | [`primary`] | epoch close rule, ack window and backpressure, output release, pre-copy convergence, the session's life (sync, stop, shutdown, arbitration, halting) |
//! | [`encoder`] | which pages go on the link and how (XOR+LZ4 against a shadow, or changed hashes) |
//! | [`assemble`] | an epoch's records, in order, with the epoch hash |
//! | [`secondary`] | the secondary's session: commit and acknowledge, Stop/Shutdown, when a lost primary is taken over, what a takeover writes again |
//! | [`standby`] | the standby image: staging an epoch, all-or-nothing commit |
//! | [`output`] | committed output, for the exactly-once release at takeover |
//! | [`detect`] | when a silent peer counts as lost, with the evidence |
//! | [`datastore`] | the datastore's typed records, arbitration, and the fence every output write passes |
//!
//! # Why output leaves exactly once
//!
//! Output of epoch *k* leaves the primary only after the secondary committed *k* (the
//! output rule, [`primary`]), and only while the primary owns the VM *at the moment of the
//! write* ([`datastore::fenced`]: the ownership check and the write are one step under the
//! datastore's lock). A secondary goes live only by winning the arbitration under that same
//! lock and, in the same step, measures what the console already holds and writes exactly
//! the committed rest ([`datastore::take_over`], [`secondary::Secondary::takeover`]). So:
//! - a primary paused anywhere — before its check, or while holding the lock — either writes
//!   before the taker measures (the taker waits for the lock, then counts it) or finds it no
//!   longer owns the VM and writes nothing;
//! - a secondary paused while taking over either has not won yet (the primary, if alive,
//!   wins and the secondary halts) or holds the lock (the primary's writes wait for it);
//! - a process of an older protection session owns nothing: sessions only grow.
//!
//! Network frames pass the same fence, but cannot be measured at a takeover: the new primary
//! sends the last committed epochs' frames again (at least once; TCP drops duplicates).
//! Disk writes reach only each side's own copy; a secondary's sync replaces its copy with a
//! new file ([`secondary::Action::ResetDisk`]), so a thawed process that still holds an old
//! copy open writes to a file nobody reads.
pub mod assemble;
pub mod datastore;
pub mod detect;
pub mod encoder;
pub mod output;
pub mod primary;
pub mod secondary;
pub mod standby;

pub use output::OutputLog;
pub use standby::Standby;
