//! The FT link between primary and secondary.
//!
//! **Not implemented yet** (issue "Fault tolerance core"). This crate will carry the FT log
//! over QUIC (quinn + rustls/ring) with pinned self-signed certificates on both ends,
//! heartbeats that page traffic cannot starve, and link statistics (bytes, pages, epochs, RTT).
