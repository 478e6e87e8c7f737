//! The VM state file: everything needed to continue a VM in another process.
//!
//! ```text
//! offset  size  field
//! 0       8     magic "FTVMSNAP"
//! 8       2     major version (a reader refuses a newer major)
//! 10      2     minor version (additions a older reader may ignore)
//! 12      4     flags (0)
//! 16      8     meta_len
//! 24      …     meta: bincode(VmState), fixed-int encoding, meta_len bytes
//! …       …     memory records, each { gpa u64 | pages u32 | reserved u32 } + pages × 4096 bytes;
//!               only non-zero pages are stored; a record with pages = 0 ends the list
//! end-8   4     crc32c of every byte before it
//! end-4   4     "FTVE"
//! ```
//!
//! Readers verify the checksum over the whole file before trusting any field, then check
//! every length and address against the guest they describe. A corrupt, truncated or
//! oversized file is an error value, never a panic.
use crate::devices::DevicesState;
use crate::layout::{self, PAGE_SIZE};
use crate::memory::{is_zero, GuestMemory};
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmKvmState;
use bincode::Options;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;
use vm_memory::{Bytes, GuestAddress};

pub const MAGIC: [u8; 8] = *b"FTVMSNAP";
pub const TRAILER_MAGIC: [u8; 4] = *b"FTVE";
/// 2: device state gained the virtio-blk disk device.
pub const VERSION_MAJOR: u16 = 3;
pub const VERSION_MINOR: u16 = 0;
const HEADER_LEN: u64 = 24;
const TRAILER_LEN: u64 = 8;
const MAX_META_LEN: u64 = 16 << 20;
const MAX_RUN_PAGES: u32 = 1024;

/// Everything about a VM but its memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub mem_mib: u64,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmKvmState,
    pub devices: DevicesState,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open state file {0}")]
    Open(String, #[source] std::io::Error),
    #[error("writing state file")]
    Write(#[source] std::io::Error),
    #[error("reading state file")]
    Read(#[source] std::io::Error),
    #[error("not an ftvm state file (bad magic)")]
    Magic,
    #[error("state file version {found_major}.{found_minor} is newer than this ftvm understands ({VERSION_MAJOR}.x)")]
    NewerVersion { found_major: u16, found_minor: u16 },
    #[error("state file version {found_major}.{found_minor} was written by an older ftvm; this one reads {VERSION_MAJOR}.x only")]
    OlderVersion { found_major: u16, found_minor: u16 },
    #[error("state file is corrupt: {0}")]
    Corrupt(String),
    #[error("encoding VM state")]
    Encode(#[source] bincode::Error),
    #[error("reading guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

fn corrupt(msg: impl Into<String>) -> Error {
    Error::Corrupt(msg.into())
}

struct CrcWriter<W: Write> {
    inner: W,
    crc: u32,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc = crc32c::crc32c_append(self.crc, &buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn codec() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(MAX_META_LEN)
}

/// Encodes one part of the VM state (a vCPU, the devices, …) for the FT log.
pub fn encode_part<T: Serialize>(part: &T) -> Result<Vec<u8>, Error> {
    codec().serialize(part).map_err(Error::Encode)
}

/// Decodes a part encoded by [`encode_part`]; bounded, never panics on hostile bytes.
pub fn decode_part<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    codec()
        .deserialize(bytes)
        .map_err(|e| corrupt(format!("state part: {e}")))
}

/// Writes `state` and the contents of `mem` to `path` (atomically: a temp file renamed).
/// The VM must be paused: guest memory is read in place.
pub fn save(path: &Path, state: &VmState, mem: &GuestMemory) -> Result<(), Error> {
    let tmp = path.with_extension("partial");
    let file = File::create(&tmp).map_err(|e| Error::Open(tmp.display().to_string(), e))?;
    let mut w = CrcWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        crc: 0,
    };
    let meta = codec().serialize(state).map_err(Error::Encode)?;
    w.write_all(&MAGIC).map_err(Error::Write)?;
    w.write_all(&VERSION_MAJOR.to_le_bytes())
        .map_err(Error::Write)?;
    w.write_all(&VERSION_MINOR.to_le_bytes())
        .map_err(Error::Write)?;
    w.write_all(&0u32.to_le_bytes()).map_err(Error::Write)?;
    w.write_all(&(meta.len() as u64).to_le_bytes())
        .map_err(Error::Write)?;
    w.write_all(&meta).map_err(Error::Write)?;
    let page_len = PAGE_SIZE as usize;
    let backed = crate::memory::backed_pages(mem);
    for ((base, host, len), backed) in crate::memory::host_regions(mem).into_iter().zip(backed) {
        // SAFETY: `host..host+len` is a live mapping owned by `mem`. The caller has paused the
        // VM and the VMM writes nothing into guest memory while saving, so nothing mutates it
        // during this shared borrow. Reading in place avoids copying every page out first.
        let ram = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        let page = |i: usize| &ram[i * page_len..(i + 1) * page_len];
        let pages = len / page_len;
        // Pages the host never backed are zero: not even read (see `backed_pages`).
        let data = |p: usize| backed[p] && !is_zero(page(p));
        let mut p = 0;
        while p < pages {
            if !data(p) {
                p += 1;
                continue;
            }
            let start = p;
            while p < pages && p - start < MAX_RUN_PAGES as usize && data(p) {
                p += 1;
            }
            let gpa = base + (start * page_len) as u64;
            w.write_all(&gpa.to_le_bytes()).map_err(Error::Write)?;
            w.write_all(&((p - start) as u32).to_le_bytes())
                .map_err(Error::Write)?;
            w.write_all(&0u32.to_le_bytes()).map_err(Error::Write)?;
            w.write_all(&ram[start * page_len..p * page_len])
                .map_err(Error::Write)?;
        }
    }
    w.write_all(&u64::MAX.to_le_bytes()).map_err(Error::Write)?;
    w.write_all(&[0u8; 8]).map_err(Error::Write)?;
    let crc = w.crc;
    let mut inner = w.inner;
    inner.write_all(&crc.to_le_bytes()).map_err(Error::Write)?;
    inner.write_all(&TRAILER_MAGIC).map_err(Error::Write)?;
    let file = inner
        .into_inner()
        .map_err(|e| Error::Write(e.into_error()))?;
    file.sync_all().map_err(Error::Write)?;
    std::fs::rename(&tmp, path).map_err(Error::Write)?;
    Ok(())
}

/// A verified state file, ready to fill guest memory.
pub struct StateFile {
    reader: BufReader<File>,
    pub state: VmState,
    meta_len: u64,
    mem_end: u64,
}

/// Opens and verifies `path`: magic, version, checksum, metadata.
pub fn open(path: &Path) -> Result<StateFile, Error> {
    let mut file = File::open(path).map_err(|e| Error::Open(path.display().to_string(), e))?;
    let len = file.metadata().map_err(Error::Read)?.len();
    if len < HEADER_LEN + TRAILER_LEN {
        let mut head = vec![0u8; len as usize];
        file.read_exact(&mut head).map_err(Error::Read)?;
        if !head.starts_with(&MAGIC[..head.len().min(8)]) || head.is_empty() {
            return Err(Error::Magic);
        }
        return Err(corrupt(format!("truncated: {len} bytes")));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    file.read_exact(&mut header).map_err(Error::Read)?;
    if header[..8] != MAGIC {
        return Err(Error::Magic);
    }
    let major = u16::from_le_bytes([header[8], header[9]]);
    let minor = u16::from_le_bytes([header[10], header[11]]);
    if major != VERSION_MAJOR {
        return Err(if major > VERSION_MAJOR {
            Error::NewerVersion {
                found_major: major,
                found_minor: minor,
            }
        } else {
            Error::OlderVersion {
                found_major: major,
                found_minor: minor,
            }
        });
    }
    // Whole-file checksum before any field is trusted.
    file.seek(SeekFrom::Start(0)).map_err(Error::Read)?;
    let mut crc = 0u32;
    let mut remaining = len - TRAILER_LEN;
    let mut buf = vec![0u8; 1 << 20];
    while remaining > 0 {
        let n = remaining.min(buf.len() as u64) as usize;
        file.read_exact(&mut buf[..n]).map_err(Error::Read)?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        remaining -= n as u64;
    }
    let mut trailer = [0u8; TRAILER_LEN as usize];
    file.read_exact(&mut trailer).map_err(Error::Read)?;
    if trailer[4..] != TRAILER_MAGIC {
        return Err(corrupt("missing end marker (truncated?)"));
    }
    if u32::from_le_bytes(trailer[..4].try_into().unwrap()) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    let meta_len = u64::from_le_bytes(header[16..24].try_into().unwrap());
    if meta_len > MAX_META_LEN || meta_len > len - HEADER_LEN - TRAILER_LEN {
        return Err(corrupt(format!("metadata length {meta_len} out of range")));
    }
    file.seek(SeekFrom::Start(HEADER_LEN))
        .map_err(Error::Read)?;
    let mut meta = vec![0u8; meta_len as usize];
    file.read_exact(&mut meta).map_err(Error::Read)?;
    let state: VmState = codec()
        .deserialize(&meta)
        .map_err(|e| corrupt(format!("metadata: {e}")))?;
    if state.mem_mib < layout::MIN_MEM_MIB || state.mem_mib > layout::MAX_MEM_MIB {
        return Err(corrupt(format!(
            "guest memory size {} MiB out of range",
            state.mem_mib
        )));
    }
    if state.vcpus.is_empty() || state.vcpus.len() > crate::MAX_VCPUS as usize {
        return Err(corrupt(format!("{} vCPUs", state.vcpus.len())));
    }
    for (i, v) in state.vcpus.iter().enumerate() {
        if v.id as usize != i {
            return Err(corrupt("vCPU ids out of order"));
        }
    }
    Ok(StateFile {
        reader: BufReader::with_capacity(1 << 20, file),
        state,
        meta_len,
        mem_end: len - TRAILER_LEN,
    })
}

impl StateFile {
    /// Fills `mem` (fresh, zeroed, laid out for `state.mem_mib`) from the memory records.
    pub fn load_memory(mut self, mem: &GuestMemory) -> Result<VmState, Error> {
        let mut pos = HEADER_LEN + self.meta_len;
        self.reader
            .seek(SeekFrom::Start(pos))
            .map_err(Error::Read)?;
        let mut buf = vec![0u8; (MAX_RUN_PAGES as u64 * PAGE_SIZE) as usize];
        loop {
            if pos + 16 > self.mem_end {
                return Err(corrupt("memory records run past the end"));
            }
            let mut rec = [0u8; 16];
            self.reader.read_exact(&mut rec).map_err(Error::Read)?;
            pos += 16;
            let gpa = u64::from_le_bytes(rec[..8].try_into().unwrap());
            let pages = u32::from_le_bytes(rec[8..12].try_into().unwrap());
            if pages == 0 {
                if gpa != u64::MAX {
                    return Err(corrupt("bad end-of-memory record"));
                }
                break;
            }
            if pages > MAX_RUN_PAGES || gpa % PAGE_SIZE != 0 {
                return Err(corrupt(format!(
                    "bad memory record at {gpa:#x} ({pages} pages)"
                )));
            }
            let bytes = u64::from(pages) * PAGE_SIZE;
            let end = gpa
                .checked_add(bytes)
                .ok_or_else(|| corrupt("memory record overflows"))?;
            let in_ram = layout::ram_ranges(self.state.mem_mib << 20)
                .iter()
                .any(|&(s, l)| gpa >= s && end <= s + l);
            if !in_ram || pos + bytes > self.mem_end {
                return Err(corrupt(format!(
                    "memory record {gpa:#x}+{bytes:#x} outside guest RAM or file"
                )));
            }
            self.reader
                .read_exact(&mut buf[..bytes as usize])
                .map_err(Error::Read)?;
            mem.write_slice(&buf[..bytes as usize], GuestAddress(gpa))
                .map_err(Error::Memory)?;
            pos += bytes;
        }
        if pos != self.mem_end {
            return Err(corrupt("trailing bytes after the memory records"));
        }
        Ok(self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::serial::SerialDeviceState;
    use crate::devices::DevicesState;
    use kvm_bindings::{
        kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2,
        kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    };
    use proptest::prelude::*;

    fn sample_state() -> VmState {
        let vcpu = VcpuState {
            id: 0,
            cpuid: vec![Default::default()],
            mp_state: kvm_mp_state::default(),
            regs: kvm_regs {
                rip: 0x1234,
                ..Default::default()
            },
            sregs: kvm_sregs::default(),
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            debugregs: kvm_debugregs::default(),
            lapic: kvm_lapic_state::default(),
            msrs: vec![kvm_bindings::kvm_msr_entry {
                index: 0x10,
                data: 99,
                ..Default::default()
            }],
            vcpu_events: kvm_vcpu_events::default(),
            tsc_khz: 1_000_000,
        };
        VmState {
            mem_mib: 16,
            vcpus: vec![vcpu],
            vm: VmKvmState {
                pic_master: kvm_irqchip::default(),
                pic_slave: kvm_irqchip::default(),
                ioapic: kvm_irqchip::default(),
                pit: kvm_pit_state2::default(),
                clock: kvm_clock_data::default(),
            },
            devices: DevicesState {
                serial: SerialDeviceState::default(),
                blk: None,
                net: None,
            },
        }
    }

    /// A valid 16 MiB state file with a few non-zero pages.
    fn sample_file() -> Vec<u8> {
        static FILE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        FILE.get_or_init(|| {
            let mem = crate::memory::create(16).unwrap();
            for (i, gpa) in [0x1000u64, 0x2000, 0x10_0000, 0xff_f000].iter().enumerate() {
                mem.write_slice(&[i as u8 + 1; 4096], GuestAddress(*gpa))
                    .unwrap();
            }
            let dir = std::env::temp_dir().join(format!("ftvm-persist-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let p = dir.join("sample.state");
            save(&p, &sample_state(), &mem).unwrap();
            let bytes = std::fs::read(&p).unwrap();
            let _ = std::fs::remove_dir_all(&dir);
            bytes
        })
        .clone()
    }

    fn fix_crc(bytes: &mut [u8]) {
        if bytes.len() >= 8 {
            let n = bytes.len() - 8;
            let crc = crc32c::crc32c(&bytes[..n]);
            bytes[n..n + 4].copy_from_slice(&crc.to_le_bytes());
            bytes[n + 4..].copy_from_slice(&TRAILER_MAGIC);
        }
    }

    /// Parses `bytes` as a state file into a fresh guest; any outcome but a panic is fine.
    fn parse(bytes: &[u8]) -> Result<VmState, Error> {
        let dir = std::env::temp_dir().join(format!("ftvm-persist-prop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("{:?}.state", std::thread::current().id()));
        std::fs::write(&p, bytes).unwrap();
        let res = open(&p).and_then(|f| {
            let mem = crate::memory::create(f.state.mem_mib.min(64)).unwrap();
            f.load_memory(&mem)
        });
        let _ = std::fs::remove_file(&p);
        res
    }

    #[test]
    fn saved_file_round_trips() {
        let mem = crate::memory::create(16).unwrap();
        let f = sample_file();
        let dir = std::env::temp_dir().join(format!("ftvm-persist-rt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("rt.state");
        std::fs::write(&p, &f).unwrap();
        let state = open(&p).unwrap().load_memory(&mem).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(state.vcpus[0].regs.rip, 0x1234);
        assert_eq!(state.vcpus[0].msrs[0].data, 99);
        let mut page = [0u8; 4096];
        mem.read_slice(&mut page, GuestAddress(0xff_f000)).unwrap();
        assert_eq!(page, [4u8; 4096]);
        mem.read_slice(&mut page, GuestAddress(0x3000)).unwrap();
        assert_eq!(page, [0u8; 4096], "zero pages are not stored and stay zero");
    }

    #[test]
    fn newer_major_version_is_refused() {
        let mut f = sample_file();
        f[8..10].copy_from_slice(&(VERSION_MAJOR + 1).to_le_bytes());
        fix_crc(&mut f);
        assert!(matches!(parse(&f), Err(Error::NewerVersion { .. })));
    }

    #[test]
    fn record_outside_guest_ram_is_refused_even_with_a_valid_checksum() {
        let mut f = sample_file();
        // first memory record's gpa, right after header + meta
        let meta_len = u64::from_le_bytes(f[16..24].try_into().unwrap()) as usize;
        let at = HEADER_LEN as usize + meta_len;
        f[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        fix_crc(&mut f);
        let err = parse(&f).expect_err("must fail");
        assert!(err.to_string().contains("outside guest RAM"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn mutated_files_are_refused_or_parsed_without_panic(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in proptest::option::of(any::<prop::sample::Index>()),
            recompute_crc in any::<bool>(),
        ) {
            let mut f = sample_file();
            for (i, v) in &flips {
                let i = i.index(f.len());
                f[i] ^= v | 1;
            }
            if let Some(c) = cut {
                let n = c.index(f.len());
                f.truncate(n);
            }
            if recompute_crc {
                fix_crc(&mut f);
            } else {
                // Without a fixed checksum every mutation must be caught.
                prop_assert!(parse(&f).is_err());
            }
            let _ = parse(&f);
        }
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        let mut p = [0u8; 4096];
        p[4095] = 1;
        assert!(!is_zero(&p));
    }
}
