//! The FT log: the ordered stream a primary sends its secondary, and the few records that flow
//! back.
//!
//! # Stream
//!
//! ```text
//!  primary                                   secondary
//!     │── Hello {versions, role, vm} ───────────▶│   version negotiation, first frame each way
//!     │◀─────────────────────────── Hello ───────│
//!     │                                          │
//!     │── EpochBegin(k) ────────────────────────▶│   per epoch k:
//!     │── Session (epoch 0 only) ───────────────▶│     the protection session
//!     │── Event* (port/MMIO reads, interrupts,   │     nondeterministic inputs, in order
//!     │          device input, clock, entropy) ─▶│
//!     │── Pages* (zero | raw | xor+lz4 | hash) ─▶│     the pages dirtied in epoch k
//!     │── VcpuState* / DeviceState* ────────────▶│     state at the end of epoch k
//!     │── Output* (stream, cumulative offset) ──▶│     output produced in epoch k (held!)
//!     │── DiskWrite* ───────────────────────────▶│     the guest's disk writes in epoch k
//!     │── EpochEnd(k) {pages, hash, offsets} ───▶│     secondary stages, verifies, commits
//!     │◀──────────────────────────── Ack(k) ─────│     primary releases epoch k's output
//!     │◀──── Heartbeat ────▶ (both ways, on their own stream so pages never starve them)
//!     │── Shutdown{code} | Stop{off} ───────────▶│   the guest ended / replication stops:
//!     │                                          │     the secondary exits, no takeover
//! ```
//!
//! The secondary applies an epoch only when its `EpochEnd` arrives intact and matches what was
//! received (page count, page hash); anything torn or corrupt is discarded whole, so the
//! committed standby image is never touched by a bad epoch. Where an epoch is deterministic
//! (one vCPU, no asynchronous injection) the events alone suffice and pages may be sent as
//! `Hash` entries to verify instead of copy — the record/replay path, kept possible by the
//! format from version 1.
//!
//! # Frame
//!
//! Every record travels in one frame (all integers little-endian):
//!
//! ```text
//! offset size field
//! 0      2    magic "FT"
//! 2      1    version (`VERSION`, 3; a frame of another version is refused)
//! 3      1    kind (RecordKind; 0 = Invalid is never sent)
//! 4      2    flags (0; unknown bits are refused)
//! 6      2    reserved (0)
//! 8      4    payload length (≤ MAX_PAYLOAD)
//! 12     8    epoch
//! 20     len  payload (per kind, see `record.rs`)
//! 20+len 4    crc32c of bytes 0 .. 20+len
//! ```
//!
//! The decoder ([`frame::Decoder`]) is streaming and zero-copy: it splits frames off a
//! `BytesMut` receive buffer, never allocates more than one frame's payload (bounded by
//! [`frame::MAX_PAYLOAD`], checked before any payload is buffered), and reports corruption
//! as [`Error::Corruption`], never a panic. A torn tail is simply "need more bytes".
pub mod frame;
pub mod frames;
pub mod page;
pub mod record;

pub use frame::{Decoder, Frame, MAX_PAYLOAD};
pub use page::{PageData, PageEntry, PAGE_SIZE};
pub use record::{Event, EventKind, Hello, Record, RecordKind, Role, NO_VCPU};

/// Protocol version this build speaks (2: `DiskWrite` records; 3: the `Session` record).
pub const VERSION: u8 = 3;
/// Oldest protocol version this build still speaks (a version-2 primary does not name its
/// protection session, which the secondary needs to arbitrate).
pub const MIN_VERSION: u8 = 3;

/// The ids of `DeviceState` records: what each blob is.
pub mod device {
    /// The VM's KVM-level state (interrupt controllers, clocks), `vmm::persist` encoding.
    pub const KVM: u16 = 0;
    /// The VMM's device models (serial, virtio devices, …), `vmm::persist` encoding.
    pub const VMM: u16 = 1;
    /// Present in the epoch in which the guest ended; 1 byte: its exit code.
    pub const EXIT: u16 = 2;
    /// The primary's disk size in bytes (u64 little-endian), sent with the full disk copy of
    /// a sync (epoch 0): the secondary empties its copy and sizes it to this.
    pub const DISK_SIZE: u16 = 3;
}

/// Errors of the FT log codec.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The bytes cannot be a valid FT log (bad magic, checksum, length, field).
    #[error("corrupt FT log: {0}")]
    Corruption(String),
    /// A valid frame of a version or kind this build does not know.
    #[error("unsupported FT log {0}")]
    Unsupported(String),
    /// Version negotiation found no common version.
    #[error("no common FT log version: ours {ours_min}..={ours_max}, peer's {theirs_min}..={theirs_max}")]
    NoCommonVersion {
        ours_min: u8,
        ours_max: u8,
        theirs_min: u8,
        theirs_max: u8,
    },
    /// A page could not be applied (bad delta, hash mismatch).
    #[error("page at {gpa:#x}: {what}")]
    Page { gpa: u64, what: String },
}

pub(crate) fn corrupt(msg: impl Into<String>) -> Error {
    Error::Corruption(msg.into())
}

/// Picks the protocol version both sides speak: the highest in both ranges.
pub fn negotiate(theirs_min: u8, theirs_max: u8) -> Result<u8, Error> {
    let v = VERSION.min(theirs_max);
    if v < MIN_VERSION.max(theirs_min) || theirs_min > theirs_max {
        return Err(Error::NoCommonVersion {
            ours_min: MIN_VERSION,
            ours_max: VERSION,
            theirs_min,
            theirs_max,
        });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_picks_highest_common_or_refuses() {
        assert_eq!(negotiate(VERSION, VERSION), Ok(VERSION));
        assert_eq!(negotiate(MIN_VERSION, 9), Ok(VERSION));
        assert!(matches!(
            negotiate(VERSION + 1, VERSION + 2),
            Err(Error::NoCommonVersion { .. })
        ));
        assert!(matches!(
            negotiate(0, MIN_VERSION - 1),
            Err(Error::NoCommonVersion { .. })
        ));
        assert!(matches!(
            negotiate(3, 1),
            Err(Error::NoCommonVersion { .. })
        ));
    }
}
