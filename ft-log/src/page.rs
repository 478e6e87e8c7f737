//! Page encodings for dirty-page batches.
//!
//! | encoding | id | data | meaning |
//! |----------|----|------|---------|
//! | `Zero`   | 1  | none | the page is all zeros |
//! | `Raw`    | 2  | 4096 bytes | the page |
//! | `XorLz4` | 3  | LZ4 block of `new ⊕ old` (≤ [`MAX_LZ4_LEN`]) | delta against the receiver's copy |
//! | `Hash`   | 4  | 8 bytes: xxh3-64 of the page | verify, do not copy (record/replay epochs) |
use crate::{corrupt, Error};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use xxhash_rust::xxh3::xxh3_64;

pub const PAGE_SIZE: usize = 4096;
/// Largest LZ4 block a 4096-byte page can compress to (LZ4's worst case bound).
pub const MAX_LZ4_LEN: usize = PAGE_SIZE + PAGE_SIZE / 255 + 16;
/// A delta is only sent when it is at most this big; otherwise the raw page is.
const XOR_WORTH_IT: usize = PAGE_SIZE / 2;

const ENC_ZERO: u8 = 1;
const ENC_RAW: u8 = 2;
const ENC_XOR_LZ4: u8 = 3;
const ENC_HASH: u8 = 4;
/// Fixed part of an entry: gpa u64 | encoding u8 | reserved u8 | len u16.
pub const ENTRY_HEADER: usize = 12;

/// How one page travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageData {
    Zero,
    Raw(Bytes),
    XorLz4(Bytes),
    Hash(u64),
}

/// One page of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageEntry {
    pub gpa: u64,
    pub data: PageData,
}

/// xxh3-64 of a page (for `Hash` entries and epoch hashes).
pub fn page_hash(page: &[u8]) -> u64 {
    xxh3_64(page)
}

fn is_zero(p: &[u8]) -> bool {
    let words = p.chunks_exact(8);
    let tail = words.remainder().iter().fold(0, |a, b| a | b);
    words.fold(0, |a, w| a | u64::from_ne_bytes(w.try_into().unwrap())) == 0 && tail == 0
}

/// How a page changed against the receiver's copy (see [`DeltaEncoder`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delta {
    /// Identical: nothing to send.
    Same,
    /// Now all zeros.
    Zero,
    /// An LZ4 block of `new ⊕ old`, at most half a page.
    XorLz4(Bytes),
    /// The delta does not pay (or is not allowed): send the page itself.
    Raw,
}

/// Encodes pages against the receiver's copies with one pass over each pair (XOR, and the
/// test for a change, at once) and work areas kept from page to page.
pub struct DeltaEncoder {
    x: Box<[u8; PAGE_SIZE]>,
    c: Box<[u8; XOR_WORTH_IT]>,
}

impl Default for DeltaEncoder {
    fn default() -> Self {
        DeltaEncoder {
            x: Box::new([0; PAGE_SIZE]),
            c: Box::new([0; XOR_WORTH_IT]),
        }
    }
}

impl DeltaEncoder {
    /// `new` against the receiver's `old` (both one page). `delta_ok`: whether the receiver
    /// may get a delta (else a changed non-zero page is `Raw`).
    pub fn encode(&mut self, new: &[u8], old: &[u8], delta_ok: bool) -> Delta {
        assert!(
            new.len() == PAGE_SIZE && old.len() == PAGE_SIZE,
            "one page each"
        );
        let mut any = 0u64;
        for ((x, n), o) in self
            .x
            .chunks_exact_mut(8)
            .zip(new.chunks_exact(8))
            .zip(old.chunks_exact(8))
        {
            let d = u64::from_ne_bytes(n.try_into().unwrap())
                ^ u64::from_ne_bytes(o.try_into().unwrap());
            any |= d;
            x.copy_from_slice(&d.to_ne_bytes());
        }
        if any == 0 {
            return Delta::Same;
        }
        if is_zero(new) {
            return Delta::Zero;
        }
        if delta_ok {
            // Output capped at what is worth sending: LZ4 gives up (an error) past it.
            if let Ok(n) = lz4::block::compress_to_buffer(&self.x[..], None, false, &mut self.c[..])
            {
                return Delta::XorLz4(Bytes::copy_from_slice(&self.c[..n]));
            }
        }
        Delta::Raw
    }
}

/// Chooses the smallest encoding of `new` given the receiver's copy `old` (if it has one).
pub fn encode_page(gpa: u64, new: &[u8], old: Option<&[u8]>) -> PageEntry {
    debug_assert_eq!(new.len(), PAGE_SIZE);
    if is_zero(new) {
        return PageEntry {
            gpa,
            data: PageData::Zero,
        };
    }
    if let Some(old) = old {
        match DeltaEncoder::default().encode(new, old, true) {
            Delta::XorLz4(b) => {
                return PageEntry {
                    gpa,
                    data: PageData::XorLz4(b),
                }
            }
            // The receiver's copy is right: an empty delta (a delta of zeros) says so.
            Delta::Same => {
                return PageEntry {
                    gpa,
                    data: PageData::XorLz4(Bytes::from(
                        lz4::block::compress(&[0; PAGE_SIZE], None, false)
                            .expect("a page compresses"),
                    )),
                }
            }
            Delta::Zero | Delta::Raw => {}
        }
    }
    PageEntry {
        gpa,
        data: PageData::Raw(Bytes::copy_from_slice(new)),
    }
}

impl PageEntry {
    /// Appends the entry's wire form.
    pub fn encode(&self, out: &mut BytesMut) {
        let (enc, data): (u8, &[u8]) = match &self.data {
            PageData::Zero => (ENC_ZERO, &[]),
            PageData::Raw(b) => (ENC_RAW, b),
            PageData::XorLz4(b) => (ENC_XOR_LZ4, b),
            PageData::Hash(_) => (ENC_HASH, &[]),
        };
        out.put_u64_le(self.gpa);
        out.put_u8(enc);
        out.put_u8(0);
        if let PageData::Hash(h) = self.data {
            out.put_u16_le(8);
            out.put_u64_le(h);
        } else {
            out.put_u16_le(data.len() as u16);
            out.put_slice(data);
        }
    }

    /// Wire size of the entry.
    pub fn encoded_len(&self) -> usize {
        ENTRY_HEADER
            + match &self.data {
                PageData::Zero => 0,
                PageData::Raw(b) | PageData::XorLz4(b) => b.len(),
                PageData::Hash(_) => 8,
            }
    }

    /// Parses one entry from `buf` (zero-copy for page data).
    pub fn decode(buf: &mut Bytes) -> Result<Self, Error> {
        if buf.remaining() < ENTRY_HEADER {
            return Err(corrupt("page entry truncated"));
        }
        let gpa = buf.get_u64_le();
        let enc = buf.get_u8();
        let reserved = buf.get_u8();
        let len = buf.get_u16_le() as usize;
        if !gpa.is_multiple_of(PAGE_SIZE as u64) {
            return Err(corrupt(format!("page address {gpa:#x} not page-aligned")));
        }
        if reserved != 0 {
            return Err(corrupt("page entry reserved byte set"));
        }
        if buf.remaining() < len {
            return Err(corrupt(format!(
                "page {gpa:#x} data truncated ({len} bytes announced)"
            )));
        }
        let data = match (enc, len) {
            (ENC_ZERO, 0) => PageData::Zero,
            (ENC_RAW, PAGE_SIZE) => PageData::Raw(buf.split_to(len)),
            (ENC_XOR_LZ4, 1..=MAX_LZ4_LEN) => PageData::XorLz4(buf.split_to(len)),
            (ENC_HASH, 8) => PageData::Hash(buf.get_u64_le()),
            _ => {
                return Err(corrupt(format!(
                    "page {gpa:#x}: encoding {enc} with {len} bytes"
                )))
            }
        };
        Ok(PageEntry { gpa, data })
    }

    /// Applies the entry to `page` (the receiver's copy of that page, 4096 bytes). Nothing is
    /// modified when an error is returned.
    pub fn apply(&self, page: &mut [u8]) -> Result<(), Error> {
        let err = |what: &str| Error::Page {
            gpa: self.gpa,
            what: what.to_string(),
        };
        if page.len() != PAGE_SIZE {
            return Err(err("target is not one page"));
        }
        match &self.data {
            PageData::Zero => page.fill(0),
            PageData::Raw(b) if b.len() == PAGE_SIZE => page.copy_from_slice(b),
            PageData::Raw(_) => return Err(err("raw data is not one page")),
            PageData::XorLz4(b) => {
                let mut x = [0u8; PAGE_SIZE];
                match lz4::block::decompress_to_buffer(b, Some(PAGE_SIZE as i32), &mut x) {
                    Ok(PAGE_SIZE) => {}
                    Ok(_) | Err(_) => return Err(err("delta does not decompress to one page")),
                }
                for (p, d) in page.iter_mut().zip(x.iter()) {
                    *p ^= d;
                }
            }
            PageData::Hash(h) => {
                if page_hash(page) != *h {
                    return Err(err("content differs from the primary's (hash mismatch)"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u8) -> Vec<u8> {
        (0..PAGE_SIZE)
            .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed))
            .collect()
    }

    fn round_trip(e: &PageEntry) -> PageEntry {
        let mut b = BytesMut::new();
        e.encode(&mut b);
        assert_eq!(b.len(), e.encoded_len());
        let mut bytes = b.freeze();
        let d = PageEntry::decode(&mut bytes).unwrap();
        assert!(bytes.is_empty());
        d
    }

    #[test]
    fn zero_raw_and_delta_pages_reproduce_the_source() {
        let old = page(3);
        let mut new = old.clone();
        new[100..140].fill(0xee); // small change → delta
        for (src, base, want_enc) in [
            (vec![0u8; PAGE_SIZE], Some(&old), "zero"),
            (page(7), None, "raw"),
            (new.clone(), Some(&old), "xor"),
        ] {
            let e = encode_page(0x5000, &src, base.map(|v| v.as_slice()));
            let kind = match e.data {
                PageData::Zero => "zero",
                PageData::Raw(_) => "raw",
                PageData::XorLz4(_) => "xor",
                PageData::Hash(_) => "hash",
            };
            assert_eq!(kind, want_enc);
            let d = round_trip(&e);
            let mut target = old.clone();
            d.apply(&mut target).unwrap();
            assert_eq!(target, src);
        }
    }

    #[test]
    fn delta_encoder_tells_same_zero_delta_and_raw_and_its_deltas_apply() {
        let mut enc = DeltaEncoder::default();
        let old = page(7);
        assert_eq!(enc.encode(&old, &old, true), Delta::Same);
        assert_eq!(enc.encode(&[0; PAGE_SIZE], &old, true), Delta::Zero);
        let mut new = old.clone();
        new[100] ^= 0x5a;
        new[4000] = 1;
        let Delta::XorLz4(b) = enc.encode(&new, &old, true) else {
            panic!("a two-byte change is a delta");
        };
        let mut target = old.clone();
        PageEntry {
            gpa: 0,
            data: PageData::XorLz4(b),
        }
        .apply(&mut target)
        .unwrap();
        assert_eq!(target, new);
        // Deltas not allowed, or not worth it (an unrelated page): the page itself.
        assert_eq!(enc.encode(&new, &old, false), Delta::Raw);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..PAGE_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert_eq!(enc.encode(&noise, &old, true), Delta::Raw);
        // The work areas carry nothing from one page to the next.
        assert_eq!(enc.encode(&old, &old, true), Delta::Same);
    }

    #[test]
    fn hash_entries_verify_instead_of_copy() {
        let p = page(9);
        let e = PageEntry {
            gpa: 0,
            data: PageData::Hash(page_hash(&p)),
        };
        let d = round_trip(&e);
        let mut same = p.clone();
        d.apply(&mut same).unwrap();
        let mut other = page(10);
        assert!(matches!(d.apply(&mut other), Err(Error::Page { .. })));
        assert_eq!(other, page(10), "a failed apply leaves the page untouched");
    }

    #[test]
    fn bad_delta_is_refused_and_leaves_page_untouched() {
        let e = PageEntry {
            gpa: 0x1000,
            data: PageData::XorLz4(Bytes::from_static(&[0xff, 0x00, 0x01])),
        };
        let mut p = page(1);
        assert!(e.apply(&mut p).is_err());
        assert_eq!(p, page(1));
    }

    #[test]
    fn malformed_entries_are_corruption() {
        let mut b = BytesMut::new();
        PageEntry {
            gpa: 0x1001,
            data: PageData::Zero,
        }
        .encode(&mut b);
        assert!(PageEntry::decode(&mut b.freeze()).is_err(), "unaligned");
        let mut b = BytesMut::new();
        b.put_u64_le(0x1000);
        b.put_u8(ENC_RAW);
        b.put_u8(0);
        b.put_u16_le(100); // raw must be 4096
        b.put_slice(&[0; 100]);
        assert!(PageEntry::decode(&mut b.freeze()).is_err());
    }
}
