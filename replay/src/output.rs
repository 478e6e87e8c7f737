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
    /// Cumulative committed end offset of `stream`.
    pub fn end(&self, stream: u8) -> u64 {
        self.streams.get(&stream).map_or(0, Stream::end)
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
            let at = *ends.entry(*s).or_insert_with(|| self.end(*s));
            if *off != at {
                return Err(format!(
                    "output stream {s}: record at offset {off}, expected {at}"
                ));
            }
            ends.insert(*s, off + data.len() as u64);
        }
        for (s, end) in announced {
            let got = ends.get(s).copied().unwrap_or_else(|| self.end(*s));
            if got != *end {
                return Err(format!(
                    "output stream {s}: ends at {got}, EpochEnd says {end}"
                ));
            }
        }
        Ok(())
    }

    /// Appends checked records.
    pub fn commit(&mut self, records: &[(u8, u64, Bytes)]) {
        for (s, _, data) in records {
            let st = self.streams.entry(*s).or_default();
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
        o.commit(&r);
        assert_eq!(o.unreleased(0, 0), Some(&b"1\n2\n3\n"[..]));
        assert_eq!(o.unreleased(0, 4), Some(&b"3\n"[..]));
        assert_eq!(o.unreleased(0, 6), Some(&b""[..]));
        assert_eq!(o.unreleased(0, 7), None, "sink has bytes never committed");
    }

    #[test]
    fn gaps_and_wrong_ends_are_refused() {
        let o = OutputLog::default();
        assert!(o.check(&[rec(1, "x")], &[]).is_err());
        assert!(o.check(&[rec(0, "x")], &[(0, 5)]).is_err());
        assert!(o.check(&[], &[(0, 0)]).is_ok());
    }
}
