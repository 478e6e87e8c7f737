//! The secondary side of a protected pair.
//!
//! **Not implemented yet** (issue "Fault tolerance core"). This crate will stage each received
//! epoch, commit it atomically into the standby image (a torn or corrupt epoch is discarded and
//! never touches the last committed image), replay recorded device inputs into the standby's
//! device models, acknowledge epochs, and take over when the primary is lost.
