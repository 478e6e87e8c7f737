//! Committed guest output, for the exactly-once release at takeover.
//!
//! Each output stream (0 = serial console) is a byte sequence; records carry the cumulative
//! offset of their first byte. The secondary keeps the committed bytes from `base` to `end`.
//! At takeover the new primary looks at how much of the stream the outside world already
//! has (the length of the append-only file on the datastore) and releases exactly the rest.
use bytes::Bytes;
use std::collections::BTreeMap;

/// Most bytes kept per stream; older committed output is dropped (it was released long ago).
pub const RETAIN_BYTES: usize = 64 << 20;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Stream {
    base: u64,
    bytes: Vec<u8>,
}

impl Stream {
    fn end(&self) -> u64 {
        self.base + self.bytes.len() as u64
    }
}

/// Committed output of every stream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OutputLog {
    streams: BTreeMap<u8, Stream>,
}

impl OutputLog {
    /// Offset of the oldest committed byte of `stream` still kept.
    pub fn base(&self, stream: u8) -> u64 {
        self.streams.get(&stream).map_or(0, |s| s.base)
    }

    /// Cumulative committed end offset of `stream`.
    pub fn end(&self, stream: u8) -> u64 {
        self.streams.get(&stream).map_or(0, Stream::end)
    }

    /// Where `stream` continues: its committed end, or — for a stream this secondary has not
    /// seen yet (it joined a VM that already produced output) — where the epoch says it starts.
    fn start(&self, stream: u8, records: &[(u8, u64, Bytes)], announced: &[(u8, u64)]) -> u64 {
        if let Some(st) = self.streams.get(&stream) {
            return st.end();
        }
        records
            .iter()
            .find(|r| r.0 == stream)
            .map(|r| r.1)
            .or_else(|| announced.iter().find(|a| a.0 == stream).map(|a| a.1))
            .unwrap_or(0)
    }

    /// Checks an epoch's output records: contiguous from the committed end, and matching the
    /// epoch's announced end offsets.
    pub fn check(
        &self,
        records: &[(u8, u64, Bytes)],
        announced: &[(u8, u64)],
    ) -> Result<(), String> {
        let mut ends: BTreeMap<u8, u64> = BTreeMap::new();
        for (s, off, data) in records {
            let at = *ends
                .entry(*s)
                .or_insert_with(|| self.start(*s, records, announced));
            if *off != at {
                return Err(format!(
                    "output stream {s}: record at offset {off}, expected {at}"
                ));
            }
            ends.insert(*s, off + data.len() as u64);
        }
        for (s, end) in announced {
            let got = ends
                .get(s)
                .copied()
                .unwrap_or_else(|| self.start(*s, records, announced));
            if got != *end {
                return Err(format!(
                    "output stream {s}: ends at {got}, EpochEnd says {end}"
                ));
            }
        }
        Ok(())
    }

    /// Appends checked records (the first epoch a secondary sees also sets where each stream
    /// starts).
    pub fn commit(&mut self, records: &[(u8, u64, Bytes)], announced: &[(u8, u64)]) {
        for &(s, _) in announced {
            if !self.streams.contains_key(&s) {
                let base = self.start(s, records, announced);
                self.streams.insert(
                    s,
                    Stream {
                        base,
                        bytes: Vec::new(),
                    },
                );
            }
        }
        for (s, _, data) in records {
            if !self.streams.contains_key(s) {
                let base = self.start(*s, records, announced);
                self.streams.insert(
                    *s,
                    Stream {
                        base,
                        bytes: Vec::new(),
                    },
                );
            }
            let st = self.streams.get_mut(s).expect("inserted above");
            st.bytes.extend_from_slice(data);
            if st.bytes.len() > RETAIN_BYTES {
                let cut = st.bytes.len() - RETAIN_BYTES;
                st.bytes.drain(..cut);
                st.base += cut as u64;
            }
        }
    }

    /// The committed bytes of `stream` the outside world does not have yet, given that it has
    /// the first `released` bytes. `None` if `released` is before what is retained or beyond
    /// the committed end (the sink holds output the secondary never committed).
    pub fn unreleased(&self, stream: u8, released: u64) -> Option<&[u8]> {
        let st = self.streams.get(&stream);
        let (base, end) = st.map_or((0, 0), |s| (s.base, s.end()));
        if released < base || released > end {
            return None;
        }
        Some(st.map_or(&[][..], |s| &s.bytes[(released - base) as usize..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(off: u64, s: &str) -> (u8, u64, Bytes) {
        (0, off, Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn unreleased_is_exactly_the_missing_suffix() {
        let mut o = OutputLog::default();
        let r = [rec(0, "1\n2\n"), rec(4, "3\n")];
        o.check(&r, &[(0, 6)]).unwrap();
        o.commit(&r, &[(0, 6)]);
        assert_eq!(o.unreleased(0, 0), Some(&b"1\n2\n3\n"[..]));
        assert_eq!(o.unreleased(0, 4), Some(&b"3\n"[..]));
        assert_eq!(o.unreleased(0, 6), Some(&b""[..]));
        assert_eq!(o.unreleased(0, 7), None, "sink has bytes never committed");
    }

    #[test]
    fn gaps_and_wrong_ends_are_refused() {
        let mut o = OutputLog::default();
        o.commit(&[], &[(0, 0)]);
        assert!(o.check(&[rec(1, "x")], &[]).is_err());
        assert!(o.check(&[rec(0, "x")], &[(0, 5)]).is_err());
        assert!(o.check(&[], &[(0, 0)]).is_ok());
    }

    #[test]
    fn a_secondary_joining_late_starts_the_stream_where_the_primary_is() {
        let mut o = OutputLog::default();
        // The console already holds 100 bytes when this secondary's first epoch arrives.
        o.check(&[], &[(0, 100)]).unwrap();
        o.commit(&[], &[(0, 100)]);
        assert_eq!(o.end(0), 100);
        assert_eq!(o.unreleased(0, 100), Some(&b""[..]));
        assert_eq!(
            o.unreleased(0, 50),
            None,
            "bytes before the join are not held"
        );
        let r = [rec(100, "7\n")];
        o.check(&r, &[(0, 102)]).unwrap();
        o.commit(&r, &[(0, 102)]);
        assert_eq!(o.unreleased(0, 100), Some(&b"7\n"[..]));
        assert!(
            o.check(&[rec(90, "x")], &[]).is_err(),
            "once started, the stream must be contiguous"
        );
    }
}
