//! The FT log: the ordered stream a primary sends its secondary.
//!
//! **Not implemented yet** (issue "Fault tolerance core"). This crate will own the record types
//! (epoch begin/end with page hash, nondeterministic events, dirty-page batches with zero-page
//! and XOR-delta+LZ4 encodings, vCPU/device state, output offsets, ack, heartbeat), their
//! framing (`header = { len | type | flags } · payload · crc32c`), versioning, and a decoder
//! that never panics or allocates unboundedly on hostile bytes.
