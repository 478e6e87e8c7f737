//! The guest's transmitted network frames as an output stream (stream [`NET_STREAM`]).
//!
//! An FT primary holds the frames its guest sends until their epoch is acknowledged, and also
//! ships them in the epoch as `Output` records of stream 1, so that a secondary taking over
//! can send again the frames of the last epochs it committed (the old primary may have died
//! before releasing them; a duplicate frame is harmless to TCP, a lost one costs a
//! retransmission). The stream is the frames back to back, each as
//!
//! ```text
//! 2 bytes  frame length n (little-endian, 1 ..= MAX_FRAME)
//! n bytes  the Ethernet frame
//! ```
//!
//! Every epoch's part of the stream holds whole frames, so an epoch's end offset is a frame
//! boundary.

/// Output stream number of network frames (0 is the serial console).
pub const NET_STREAM: u8 = 1;
/// Longest frame in the stream.
pub const MAX_FRAME: usize = 9216;

/// Appends `frames` to `out` in stream form. Frames longer than [`MAX_FRAME`] (or empty) are
/// left out: a device never produces them.
pub fn encode<'a>(frames: impl IntoIterator<Item = &'a [u8]>, out: &mut Vec<u8>) {
    for f in frames {
        if !f.is_empty() && f.len() <= MAX_FRAME {
            out.extend_from_slice(&(f.len() as u16).to_le_bytes());
            out.extend_from_slice(f);
        }
    }
}

/// The frames in `b`. Decoding stops at the first malformed entry (a zero or oversized
/// length, or a frame cut short): the frames before it are returned, and whether the whole
/// input was well-formed.
pub fn decode(b: &[u8]) -> (Vec<&[u8]>, bool) {
    let mut frames = Vec::new();
    let mut at = 0;
    while at < b.len() {
        let Some(len) = b
            .get(at..at + 2)
            .map(|l| u16::from_le_bytes([l[0], l[1]]) as usize)
        else {
            return (frames, false);
        };
        if len == 0 || len > MAX_FRAME {
            return (frames, false);
        }
        let Some(f) = b.get(at + 2..at + 2 + len) else {
            return (frames, false);
        };
        frames.push(f);
        at += 2 + len;
    }
    (frames, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_malformed_tails() {
        let a = [1u8; 60];
        let b = vec![2u8; 1514];
        let mut s = Vec::new();
        encode(
            [&a[..], &[][..], &b[..], &vec![0u8; MAX_FRAME + 1][..]],
            &mut s,
        );
        assert_eq!(s.len(), 2 + 60 + 2 + 1514);
        assert_eq!(decode(&s), (vec![&a[..], &b[..]], true));
        assert_eq!(decode(&s[..s.len() - 1]), (vec![&a[..]], false));
        assert_eq!(decode(&s[..63]), (vec![&a[..]], false));
        assert_eq!(decode(&[0, 0, 1]), (vec![], false));
        assert_eq!(decode(&[]), (vec![], true));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Any bytes: decoding never panics, and what it returns re-encodes to a prefix of
        /// the input.
        #[test]
        fn decoding_arbitrary_bytes_is_safe(b in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let (frames, ok) = decode(&b);
            let mut again = Vec::new();
            encode(frames.iter().copied(), &mut again);
            prop_assert!(b.starts_with(&again));
            prop_assert_eq!(ok, again.len() == b.len());
        }
    }
}
