//! The primary's page encoder: which pages of an epoch go on the link, and how.
//!
//! With XOR+LZ4 deltas the encoder keeps a **shadow** of every page as the secondary will
//! hold it once the epochs sent so far commit, and sends only pages that differ from it (as a
//! delta where that pays). Epochs commit in order and a discarded epoch ends the session, so
//! the shadow is exact; a new session starts from an all-zero shadow, as each session's
//! secondary starts from zeroed memory. With raw pages and chunk tracking (which copies
//! whole 2 MiB chunks, most of whose pages did not change) a keyed 128-bit hash per page
//! ([`SentHashes`]) tells the changed pages instead.
use bytes::Bytes;
use ft_log::page::{Delta, DeltaEncoder, PageData, PageEntry, PAGE_SIZE};
use ft_log::record::EpochHasher;

/// How dirty pages travel on the FT link (`ftvm primary --page-encoding`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum PageEncoding {
    /// Whole pages (all-zero pages as a marker).
    Raw,
    /// XOR against the page as the secondary holds it, LZ4-compressed, when that is at most
    /// half a page; pages the secondary holds unchanged are not sent. Costs the primary a
    /// shadow of guest memory (as much memory again), backed when a session starts.
    #[default]
    XorLz4,
}

/// Chooses each page's wire encoding (see the module docs).
pub struct PageEncoder {
    encoding: PageEncoding,
    /// Pages encoded so far (this process, all sessions).
    pub pages: u64,
    shadow: Shadow,
    delta: DeltaEncoder,
    sent: SentHashes,
}

impl PageEncoder {
    /// An encoder; `seed` keys the page hashes of [`SentHashes`] (random per process in
    /// production, so that a guest cannot aim a collision at it; fixed in a simulation).
    pub fn new(encoding: PageEncoding, seed: u64) -> Self {
        PageEncoder {
            encoding,
            pages: 0,
            shadow: Shadow::default(),
            delta: DeltaEncoder::default(),
            sent: SentHashes::new(seed),
        }
    }

    pub fn encoding(&self) -> PageEncoding {
        self.encoding
    }

    /// A new session: the secondary holds nothing sent before. `mem_end`: the end of guest
    /// memory.
    pub fn reset(&mut self, mem_end: u64) {
        if self.encoding == PageEncoding::XorLz4 {
            self.shadow.reset(mem_end as usize);
        }
        self.sent.clear();
    }

    /// One page's entry; None when the secondary already holds exactly this page (known
    /// with deltas, from the shadow). `delta_ok` is false when the page may already be in
    /// this epoch (the secondary applies a delta to its committed page, not to an earlier
    /// entry).
    fn entry(&mut self, gpa: u64, page: &Bytes, delta_ok: bool) -> Option<PageEntry> {
        if self.encoding == PageEncoding::Raw {
            let data = if vmm::memory::is_zero(page) {
                PageData::Zero
            } else {
                PageData::Raw(page.clone())
            };
            return Some(PageEntry { gpa, data });
        }
        let slot = self.shadow.page(gpa);
        let data = match self.delta.encode(page, slot, delta_ok) {
            Delta::Same => return None,
            Delta::Zero => PageData::Zero,
            Delta::XorLz4(b) => PageData::XorLz4(b),
            Delta::Raw => PageData::Raw(page.clone()),
        };
        slot.copy_from_slice(page);
        Some(PageEntry { gpa, data })
    }

    /// Entries for `pages` whose contents are `data` back to back, hashed into `hasher`.
    /// `changed_only`: only the pages that differ from what was sent (see [`SentHashes`];
    /// with deltas always so).
    pub fn entries(
        &mut self,
        pages: &[u64],
        data: &Bytes,
        hasher: &mut EpochHasher,
        delta_ok: bool,
        changed_only: bool,
    ) -> Vec<PageEntry> {
        assert!(
            data.len() >= pages.len() * PAGE_SIZE,
            "a page of data per page"
        );
        let mut entries = Vec::with_capacity(pages.len());
        for (i, &gpa) in pages.iter().enumerate() {
            let page = data.slice(i * PAGE_SIZE..(i + 1) * PAGE_SIZE);
            // With deltas the shadow tells a changed page (`entry`); else the hashes do.
            if changed_only && self.encoding == PageEncoding::Raw && !self.sent.changed(gpa, &page)
            {
                continue;
            }
            let Some(entry) = self.entry(gpa, &page, delta_ok) else {
                continue;
            };
            hasher.add(gpa, &page);
            entries.push(entry);
        }
        self.pages += entries.len() as u64;
        entries
    }
}

/// Every page as the secondary holds it, flat by page number (a page never sent is zeros, as
/// on the secondary). Allocated and backed at once, for all of guest memory, when a session
/// with deltas starts: filled page by page instead, its first-touch faults were measured the
/// largest CPU cost of a primary with deltas on this project's host.
#[derive(Default)]
struct Shadow(Vec<u8>);

impl Shadow {
    /// All zeros, `bytes` long, backed.
    fn reset(&mut self, bytes: usize) {
        if self.0.len() == bytes {
            self.0.fill(0);
        } else {
            // calloc: fresh zeroed memory, not written here.
            self.0 = vec![0; bytes];
        }
        if let Err(e) = vmm::memory::populate_buf(&mut self.0) {
            tracing::warn!("cannot back the shadow of guest memory in advance: {e}");
        }
    }

    fn page(&mut self, gpa: u64) -> &mut [u8] {
        let at = (gpa / PAGE_SIZE as u64) as usize * PAGE_SIZE;
        if at + PAGE_SIZE > self.0.len() {
            // Not met: the shadow covers all of guest memory.
            self.0.resize(at + PAGE_SIZE, 0);
        }
        &mut self.0[at..at + PAGE_SIZE]
    }
}

/// A keyed 128-bit hash (xxh3-128) of every page as the secondary will hold it once the
/// epochs sent so far commit, by page number; 0 for a page not sent this session, which the
/// secondary holds as zeros (each session's secondary starts from zeroed memory, and the sync
/// sends only non-zero pages). 16 bytes per guest page (0.4 %).
struct SentHashes {
    seed: u64,
    /// The hash of a zero page.
    zero: u128,
    by_page: Vec<u128>,
}

impl SentHashes {
    fn new(seed: u64) -> Self {
        SentHashes {
            seed,
            zero: Self::hash(seed, &[0; PAGE_SIZE]),
            by_page: Vec::new(),
        }
    }

    fn hash(seed: u64, page: &[u8]) -> u128 {
        xxhash_rust::xxh3::xxh3_128_with_seed(page, seed).max(1)
    }

    /// Whether `page` differs from what the secondary holds at `gpa`; records it as sent.
    fn changed(&mut self, gpa: u64, page: &[u8]) -> bool {
        let h = Self::hash(self.seed, page);
        let n = (gpa / PAGE_SIZE as u64) as usize;
        if n >= self.by_page.len() {
            self.by_page.resize(n + 1, 0);
        }
        let old = std::mem::replace(&mut self.by_page[n], h);
        h != if old == 0 { self.zero } else { old }
    }

    fn clear(&mut self) {
        self.by_page.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Vec<u8> {
        vec![b; PAGE_SIZE]
    }

    fn data(pages: &[Vec<u8>]) -> Bytes {
        Bytes::from(pages.concat())
    }

    #[test]
    fn deltas_skip_unchanged_pages_and_a_new_session_sends_them_again() {
        let mut e = PageEncoder::new(PageEncoding::XorLz4, 7);
        e.reset(16 * PAGE_SIZE as u64);
        let mut h = EpochHasher::new();
        let d = data(&[page(1), page(0), page(2)]);
        let got = e.entries(&[0, 4096, 8192], &d, &mut h, true, true);
        // The zero page equals the (zero) shadow: not sent.
        assert_eq!(got.iter().map(|x| x.gpa).collect::<Vec<_>>(), [0, 8192]);
        let again = e.entries(&[0, 8192], &data(&[page(1), page(3)]), &mut h, true, true);
        assert_eq!(again.len(), 1, "only the changed page");
        assert!(matches!(
            again[0].data,
            PageData::XorLz4(_) | PageData::Raw(_)
        ));
        e.reset(16 * PAGE_SIZE as u64);
        let fresh = e.entries(&[0], &data(&[page(1)]), &mut h, true, true);
        assert_eq!(fresh.len(), 1, "a new session's secondary holds nothing");
    }

    #[test]
    fn raw_pages_with_changed_only_skip_pages_whose_hash_is_unchanged() {
        let mut e = PageEncoder::new(PageEncoding::Raw, 9);
        e.reset(16 * PAGE_SIZE as u64);
        let mut h = EpochHasher::new();
        let d = data(&[page(5), page(0)]);
        let first = e.entries(&[0, 4096], &d, &mut h, false, true);
        assert_eq!(
            first.len(),
            1,
            "a zero page the secondary holds as zeros is skipped"
        );
        assert!(e.entries(&[0, 4096], &d, &mut h, false, true).is_empty());
        assert_eq!(
            e.entries(&[0, 4096], &d, &mut h, false, false).len(),
            2,
            "without changed_only every page goes"
        );
    }
}
