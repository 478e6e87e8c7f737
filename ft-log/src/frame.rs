//! Framing: header · payload · crc32c (layout in the crate docs).
use crate::{corrupt, Error, VERSION};
use bytes::{Buf, BufMut, Bytes, BytesMut};

pub const MAGIC: [u8; 2] = *b"FT";
pub const HEADER_LEN: usize = 20;
pub const TRAILER_LEN: usize = 4;
/// Largest payload a frame may carry (page batches are split to fit).
pub const MAX_PAYLOAD: u32 = 4 << 20;

/// One decoded frame; `payload` shares the receive buffer (no copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub flags: u16,
    pub epoch: u64,
    pub payload: Bytes,
}

/// Appends one frame to `out`.
///
/// # Panics
/// If `payload` exceeds [`MAX_PAYLOAD`] — an encoder bug, never input-dependent.
pub fn encode(kind: u8, epoch: u64, payload: &[u8], out: &mut BytesMut) {
    assert!(
        payload.len() <= MAX_PAYLOAD as usize,
        "payload of {} bytes exceeds MAX_PAYLOAD",
        payload.len()
    );
    let start = out.len();
    out.reserve(HEADER_LEN + payload.len() + TRAILER_LEN);
    out.put_slice(&MAGIC);
    out.put_u8(VERSION);
    out.put_u8(kind);
    out.put_u16_le(0);
    out.put_u16_le(0);
    out.put_u32_le(payload.len() as u32);
    out.put_u64_le(epoch);
    out.put_slice(payload);
    let crc = crc32c::crc32c(&out[start..]);
    out.put_u32_le(crc);
}

/// Streaming frame decoder.
#[derive(Debug, Default)]
pub struct Decoder {
    /// Frames decoded so far (for stats and error messages).
    pub frames: u64,
}

impl Decoder {
    pub fn new() -> Self {
        Decoder::default()
    }

    /// Splits the next complete frame off `buf`. `Ok(None)`: more bytes needed (a torn tail).
    /// Errors leave `buf` as it was; the stream is unusable after a corruption error.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, Error> {
        if buf.len() < HEADER_LEN {
            // Reject a wrong magic as early as it is visible.
            if buf.len() >= 2 && buf[..2] != MAGIC {
                return Err(corrupt(format!(
                    "bad magic {:02x}{:02x} at frame {}",
                    buf[0], buf[1], self.frames
                )));
            }
            return Ok(None);
        }
        let mut h = &buf[..HEADER_LEN];
        let magic = [h.get_u8(), h.get_u8()];
        let version = h.get_u8();
        let kind = h.get_u8();
        let flags = h.get_u16_le();
        let reserved = h.get_u16_le();
        let len = h.get_u32_le();
        let epoch = h.get_u64_le();
        if magic != MAGIC {
            return Err(corrupt(format!(
                "bad magic {:02x}{:02x} at frame {}",
                magic[0], magic[1], self.frames
            )));
        }
        if len > MAX_PAYLOAD {
            return Err(corrupt(format!(
                "payload length {len} exceeds {MAX_PAYLOAD}"
            )));
        }
        let total = HEADER_LEN + len as usize + TRAILER_LEN;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        let body_end = HEADER_LEN + len as usize;
        let want = u32::from_le_bytes(buf[body_end..total].try_into().unwrap());
        let got = crc32c::crc32c(&buf[..body_end]);
        if want != got {
            return Err(corrupt(format!(
                "checksum mismatch in frame {} (kind {kind}, epoch {epoch})",
                self.frames
            )));
        }
        if version != VERSION {
            return Err(Error::Unsupported(format!("frame version {version}")));
        }
        if flags != 0 || reserved != 0 {
            return Err(Error::Unsupported(format!(
                "frame flags {flags:#x}/{reserved:#x}"
            )));
        }
        let mut frame = buf.split_to(total);
        frame.truncate(body_end);
        frame.advance(HEADER_LEN);
        self.frames += 1;
        Ok(Some(Frame {
            kind,
            flags,
            epoch,
            payload: frame.freeze(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(kind: u8, epoch: u64, payload: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        encode(kind, epoch, payload, &mut b);
        b
    }

    #[test]
    fn frame_round_trips_without_copying_payload() {
        let mut b = one(3, 77, b"hello");
        let f = Decoder::new().decode(&mut b).unwrap().unwrap();
        assert_eq!((f.kind, f.epoch, &f.payload[..]), (3, 77, &b"hello"[..]));
        assert!(b.is_empty());
    }

    #[test]
    fn torn_tail_needs_more_bytes_then_decodes() {
        let full = one(3, 1, &[9u8; 100]);
        let mut d = Decoder::new();
        for cut in [0, 1, 5, HEADER_LEN, HEADER_LEN + 50, full.len() - 1] {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(d.decode(&mut part), Ok(None), "cut at {cut}");
        }
        let mut all = full.clone();
        assert!(d.decode(&mut all).unwrap().is_some());
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut b = one(3, 1, b"x");
        b[8..12].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
        b.truncate(HEADER_LEN);
        assert!(matches!(
            Decoder::new().decode(&mut b),
            Err(Error::Corruption(_))
        ));
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let good = one(4, 9, &[0xa5; 64]);
        for byte in 0..good.len() {
            for bit in 0..8 {
                let mut b = good.clone();
                b[byte] ^= 1 << bit;
                match Decoder::new().decode(&mut b) {
                    Err(_) | Ok(None) => {}
                    Ok(Some(f)) => panic!("flip {byte}.{bit} accepted: {f:?}"),
                }
            }
        }
    }

    #[test]
    fn two_frames_back_to_back() {
        let mut b = one(1, 1, b"a");
        b.extend_from_slice(&one(2, 2, b"bb"));
        let mut d = Decoder::new();
        assert_eq!(d.decode(&mut b).unwrap().unwrap().kind, 1);
        assert_eq!(d.decode(&mut b).unwrap().unwrap().kind, 2);
        assert_eq!(d.decode(&mut b), Ok(None));
        assert_eq!(d.frames, 2);
    }
}
