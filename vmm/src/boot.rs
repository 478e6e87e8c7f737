//! Loading a guest and writing its boot structures.
//!
//! Two kinds of image:
//! - an ELF with a PVH note (`XEN_ELFNOTE_PHYS32_ENTRY`): ftvm's test guests, and any kernel
//!   built with PVH support. ftvm writes `hvm_start_info` with the command line and the e820
//!   memory map and enters at the PVH entry in 32-bit protected mode.
//! - a Linux bzImage, per the Linux/x86 boot protocol (`Documentation/arch/x86/boot.rst`):
//!   ftvm loads the protected-mode kernel at 1 MiB, fills `boot_params` (setup header, command
//!   line, initrd, e820) and enters at the 64-bit entry point (`load address + 0x200`).
//!
//! Both also get an MP table ([`crate::arch::mptable`]) so SMP guests find their vCPUs.
use crate::arch::mptable;
use crate::layout::*;
use crate::memory::GuestMemory;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use std::io::{Read, Seek, SeekFrom};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::volatile_memory::{Error as VolatileError, VolatileSlice};
use vm_memory::{Bytes, GuestAddress, ReadVolatile};

const PVH_MAGIC: u32 = 0x336e_c578;
const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
const BOOT_FLAG: u16 = 0xaa55;
const LOADER_UNDEFINED: u8 = 0xff;
const XLF_KERNEL_64: u16 = 1;
const MIN_BOOT_PROTOCOL_64: u16 = 0x020c;
const E820_MAX_ENTRIES_ZEROPAGE: usize = 128;

/// What to boot.
#[derive(Debug, Clone)]
pub enum BootSource {
    /// An image to inspect: PVH ELF or bzImage.
    Kernel {
        image: Vec<u8>,
        initrd: Option<Vec<u8>>,
        cmdline: String,
    },
}

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// 32-bit PVH entry, `EBX` = `start_info`.
    Pvh { entry: u64, start_info: u64 },
    /// Linux 64-bit entry, `RSI` = `zero_page`.
    Linux64 { entry: u64, zero_page: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kernel image is empty")]
    Empty,
    #[error("kernel image is neither an ELF nor a Linux bzImage (no ELF magic, no \"HdrS\" setup header)")]
    UnknownFormat,
    #[error("ELF image has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); only PVH ELF images can be booted")]
    NoPvhEntry,
    #[error("cannot load the ELF image")]
    Elf(#[source] linux_loader::loader::Error),
    #[error("cannot load the bzImage")]
    BzImage(#[source] linux_loader::loader::Error),
    #[error("bzImage boot protocol {0:#x} is too old or lacks a 64-bit entry (need >= 2.12 with XLF_KERNEL_64)")]
    Protocol(u16),
    #[error("command line is {0} bytes; the maximum is {max}", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    #[error("command line contains a NUL byte")]
    CmdlineNul,
    #[error("initrd of {size} bytes does not fit below {limit:#x} after the kernel (ends at {kernel_end:#x})")]
    InitrdTooBig {
        size: usize,
        limit: u64,
        kernel_end: u64,
    },
    #[error("writing boot structures into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// `Read + Seek + ReadVolatile` over a byte slice, as linux-loader's loaders need.
pub struct ImageReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> ImageReader<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        ImageReader { data, pos: 0 }
    }
}

impl Read for ImageReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let rest = self.data.get(self.pos..).unwrap_or(&[]);
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos += n;
        Ok(n)
    }
}

impl Seek for ImageReader<'_> {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => p as i128,
            SeekFrom::End(d) => self.data.len() as i128 + d as i128,
            SeekFrom::Current(d) => self.pos as i128 + d as i128,
        };
        if new < 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before start",
            ));
        }
        self.pos = new.min(usize::MAX as i128) as usize;
        Ok(self.pos as u64)
    }
}

impl ReadVolatile for ImageReader<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileError> {
        let mut rest = self.data.get(self.pos..).unwrap_or(&[]);
        let n = rest.read_volatile(buf)?;
        self.pos += n;
        Ok(n)
    }
}

fn write_cmdline(mem: &GuestMemory, cmdline: &str) -> Result<(), Error> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(Error::CmdlineTooLong(cmdline.len()));
    }
    if cmdline.contains('\0') {
        return Err(Error::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(Error::Write)
}

/// Loads `src` into `mem` (a guest of `mem_bytes` with `vcpus` vCPUs) and writes its boot
/// structures. Returns where the boot vCPU starts.
pub fn load(
    mem: &GuestMemory,
    src: &BootSource,
    mem_bytes: u64,
    vcpus: u8,
) -> Result<BootEntry, Error> {
    let BootSource::Kernel {
        image,
        initrd,
        cmdline,
    } = src;
    if image.is_empty() {
        return Err(Error::Empty);
    }
    write_cmdline(mem, cmdline)?;
    mem.write_slice(&mptable::build(vcpus), GuestAddress(EBDA_START))
        .map_err(Error::Write)?;
    // BIOS data area: EBDA segment, so MP-table scanners find it.
    mem.write_obj((EBDA_START >> 4) as u16, GuestAddress(0x40e))
        .map_err(Error::Write)?;
    if image.starts_with(b"\x7fELF") {
        load_pvh(mem, image, initrd.as_deref(), mem_bytes)
    } else if image.len() > 0x206
        && u32::from_le_bytes(image[0x202..0x206].try_into().unwrap()) == HDRS_MAGIC
    {
        load_linux(mem, image, initrd.as_deref(), cmdline, mem_bytes)
    } else {
        Err(Error::UnknownFormat)
    }
}

/// Puts `rd` as high as it fits below `limit`, page-aligned, above `kernel_end`.
fn place_initrd(mem: &GuestMemory, rd: &[u8], kernel_end: u64, limit: u64) -> Result<u64, Error> {
    match limit
        .checked_sub(rd.len() as u64)
        .map(|a| a & !(PAGE_SIZE - 1))
    {
        Some(a) if a >= kernel_end => {
            mem.write_slice(rd, GuestAddress(a)).map_err(Error::Write)?;
            Ok(a)
        }
        _ => Err(Error::InitrdTooBig {
            size: rd.len(),
            limit,
            kernel_end,
        }),
    }
}

/// A PVH kernel gets its initrd as the first module of `hvm_start_info` (as Linux's PVH entry
/// and QEMU's `-initrd` with PVH do).
fn load_pvh(
    mem: &GuestMemory,
    image: &[u8],
    initrd: Option<&[u8]>,
    mem_bytes: u64,
) -> Result<BootEntry, Error> {
    let res = Elf::load(
        mem,
        None,
        &mut ImageReader::new(image),
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(Error::Elf)?;
    let PvhBootCapability::PvhEntryPresent(entry) = res.pvh_boot_cap else {
        return Err(Error::NoPvhEntry);
    };
    let map = e820(mem_bytes);
    let memmap_addr = PVH_INFO_START + std::mem::size_of::<hvm_start_info>() as u64;
    for (i, (addr, size, ty)) in map.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *ty,
            reserved: 0,
        };
        let at = memmap_addr + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(e, GuestAddress(at)).map_err(Error::Write)?;
    }
    let mut info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: memmap_addr,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some(rd) = initrd {
        let paddr = place_initrd(mem, rd, res.kernel_end, mem_bytes.min(MMIO_GAP_START))?;
        let modlist =
            memmap_addr + (map.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        let m = hvm_modlist_entry {
            paddr,
            size: rd.len() as u64,
            cmdline_paddr: 0,
            reserved: 0,
        };
        mem.write_obj(m, GuestAddress(modlist))
            .map_err(Error::Write)?;
        info.nr_modules = 1;
        info.modlist_paddr = modlist;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(Error::Write)?;
    Ok(BootEntry::Pvh {
        entry: entry.0,
        start_info: PVH_INFO_START,
    })
}

fn load_linux(
    mem: &GuestMemory,
    image: &[u8],
    initrd: Option<&[u8]>,
    cmdline: &str,
    mem_bytes: u64,
) -> Result<BootEntry, Error> {
    let res = BzImage::load(
        mem,
        None,
        &mut ImageReader::new(image),
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(Error::BzImage)?;
    let mut hdr = res.setup_header.ok_or(Error::UnknownFormat)?;
    let version = hdr.version;
    if version < MIN_BOOT_PROTOCOL_64 || hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::Protocol(version));
    }
    hdr.type_of_loader = LOADER_UNDEFINED;
    hdr.boot_flag = BOOT_FLAG;
    hdr.header = HDRS_MAGIC;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = cmdline.len() as u32 + 1;
    if let Some(rd) = initrd {
        let low_end = mem_bytes.min(MMIO_GAP_START);
        let limit = if hdr.initrd_addr_max != 0 {
            low_end.min(u64::from(hdr.initrd_addr_max) + 1)
        } else {
            low_end
        };
        hdr.ramdisk_image = place_initrd(mem, rd, res.kernel_end, limit)? as u32;
        hdr.ramdisk_size = rd.len() as u32;
    }
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    let map = e820(mem_bytes);
    for (i, (addr, size, ty)) in map.iter().take(E820_MAX_ENTRIES_ZEROPAGE).enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *ty,
        };
    }
    params.e820_entries = map.len().min(E820_MAX_ENTRIES_ZEROPAGE) as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(Error::Write)?;
    Ok(BootEntry::Linux64 {
        entry: res.kernel_load.0 + 0x200,
        zero_page: ZERO_PAGE_START,
    })
}

/// Test support: a minimal bzImage whose protected-mode part is `code`, placed so that the
/// 64-bit entry (`load address + 0x200`) runs it. Not a Linux kernel; it exercises the boot
/// protocol path (setup header parsing, `boot_params`, long-mode entry) without one.
pub fn synthetic_bzimage(code: &[u8]) -> Vec<u8> {
    let setup_sects = 1u8;
    let mut img = vec![0u8; 512 * (1 + setup_sects as usize)];
    img[0x1f1] = setup_sects;
    img[0x1fe..0x200].copy_from_slice(&BOOT_FLAG.to_le_bytes());
    img[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
    img[0x211] = 1; // loadflags: LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&(HIMEM_START as u32).to_le_bytes()); // code32_start
    img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
    img[0x236..0x238].copy_from_slice(&XLF_KERNEL_64.to_le_bytes());
    img[0x238..0x23c].copy_from_slice(&(CMDLINE_MAX_SIZE as u32 - 1).to_le_bytes());
    let mut pm = vec![0xf4u8; 0x200]; // hlt padding up to the 64-bit entry
    pm.extend_from_slice(code);
    img.extend_from_slice(&pm);
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemory {
        crate::memory::create(32).unwrap()
    }

    fn kernel(image: Vec<u8>, cmdline: &str) -> BootSource {
        BootSource::Kernel {
            image,
            initrd: None,
            cmdline: cmdline.into(),
        }
    }

    #[test]
    fn garbage_image_is_refused() {
        let m = mem();
        assert!(matches!(
            load(&m, &kernel(vec![], ""), 32 << 20, 1),
            Err(Error::Empty)
        ));
        assert!(matches!(
            load(&m, &kernel(vec![0x55; 4096], ""), 32 << 20, 1),
            Err(Error::UnknownFormat)
        ));
        let mut elf = b"\x7fELF".to_vec();
        elf.resize(100, 0);
        assert!(matches!(
            load(&m, &kernel(elf, ""), 32 << 20, 1),
            Err(Error::Elf(_))
        ));
    }

    #[test]
    fn pvh_guest_gets_start_info_with_cmdline_and_memmap() {
        let m = mem();
        let g = guests::by_name("counter").unwrap();
        let entry = load(&m, &kernel(g.elf.to_vec(), "count=3"), 32 << 20, 1).unwrap();
        let BootEntry::Pvh { entry, start_info } = entry else {
            panic!("not PVH")
        };
        assert!(entry >= HIMEM_START);
        let info: hvm_start_info = m.read_obj(GuestAddress(start_info)).unwrap();
        assert_eq!(info.magic, PVH_MAGIC);
        let mut cmd = [0u8; 8];
        m.read_slice(&mut cmd, GuestAddress(info.cmdline_paddr))
            .unwrap();
        assert_eq!(&cmd, b"count=3\0");
        assert_eq!(info.memmap_entries as usize, e820(32 << 20).len());
        assert_eq!(info.nr_modules, 0);
    }

    #[test]
    fn pvh_guest_gets_its_initrd_as_the_first_module() {
        let m = mem();
        let g = guests::by_name("counter").unwrap();
        let src = BootSource::Kernel {
            image: g.elf.to_vec(),
            initrd: Some(vec![0x5a; 10_000]),
            cmdline: String::new(),
        };
        let BootEntry::Pvh { start_info, .. } = load(&m, &src, 32 << 20, 1).unwrap() else {
            panic!("not PVH")
        };
        let info: hvm_start_info = m.read_obj(GuestAddress(start_info)).unwrap();
        assert_eq!(info.nr_modules, 1);
        let e: hvm_modlist_entry = m.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!(e.size, 10_000);
        assert_eq!(e.paddr % PAGE_SIZE, 0);
        assert!(e.paddr + e.size <= 32 << 20);
        let mut rd = vec![0u8; 10_000];
        m.read_slice(&mut rd, GuestAddress(e.paddr)).unwrap();
        assert!(rd.iter().all(|b| *b == 0x5a));
        // The module list does not overlap the memory map.
        assert!(
            info.modlist_paddr
                >= info.memmap_paddr
                    + u64::from(info.memmap_entries)
                        * std::mem::size_of::<hvm_memmap_table_entry>() as u64
        );
        // Too big for the guest: a clear error.
        let big = BootSource::Kernel {
            image: g.elf.to_vec(),
            initrd: Some(vec![0; 40 << 20]),
            cmdline: String::new(),
        };
        assert!(matches!(
            load(&mem(), &big, 32 << 20, 1),
            Err(Error::InitrdTooBig { .. })
        ));
    }

    #[test]
    fn bzimage_gets_boot_params_initrd_and_64bit_entry() {
        let m = mem();
        let img = synthetic_bzimage(&[0xf4]);
        let src = BootSource::Kernel {
            image: img,
            initrd: Some(vec![7u8; 10000]),
            cmdline: "console=ttyS0".into(),
        };
        let BootEntry::Linux64 { entry, zero_page } = load(&m, &src, 32 << 20, 2).unwrap() else {
            panic!("not Linux")
        };
        assert_eq!(entry, HIMEM_START + 0x200);
        let p: boot_params = m.read_obj(GuestAddress(zero_page)).unwrap();
        let (magic, flag, ptr, rd, rdsize) = (
            p.hdr.header,
            p.hdr.boot_flag,
            p.hdr.cmd_line_ptr,
            p.hdr.ramdisk_image,
            p.hdr.ramdisk_size,
        );
        assert_eq!(
            (magic, flag, ptr),
            (HDRS_MAGIC, BOOT_FLAG, CMDLINE_START as u32)
        );
        assert_eq!(rdsize, 10000);
        assert_eq!(rd as u64 % PAGE_SIZE, 0);
        assert!(rd as u64 + 10000 <= 32 << 20);
        let mut b = [0u8; 1];
        m.read_slice(&mut b, GuestAddress(rd as u64)).unwrap();
        assert_eq!(b[0], 7);
        assert_eq!(p.e820_entries as usize, e820(32 << 20).len());
    }

    #[test]
    fn old_boot_protocol_is_refused() {
        let m = mem();
        let mut img = synthetic_bzimage(&[0xf4]);
        img[0x206..0x208].copy_from_slice(&0x0204u16.to_le_bytes());
        assert!(matches!(
            load(&m, &kernel(img, ""), 32 << 20, 1),
            Err(Error::Protocol(0x0204))
        ));
    }

    #[test]
    fn initrd_too_big_is_refused() {
        let m = mem();
        let src = BootSource::Kernel {
            image: synthetic_bzimage(&[0xf4]),
            initrd: Some(vec![0; 40 << 20]),
            cmdline: String::new(),
        };
        assert!(matches!(
            load(&m, &src, 32 << 20, 1),
            Err(Error::InitrdTooBig { .. })
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 300, ..Default::default() })]

        #[test]
        fn arbitrary_images_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..8192)) {
            let m = mem();
            let _ = load(&m, &kernel(bytes, ""), 32 << 20, 1);
        }

        #[test]
        fn mutated_images_never_panic(
            bz in proptest::prelude::any::<bool>(),
            flips in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()), 1..16),
        ) {
            let m = mem();
            let mut img = if bz { synthetic_bzimage(&[0xf4; 64]) } else { guests::by_name("counter").unwrap().elf.to_vec() };
            // Bias the flips towards the headers, where the parsing happens.
            for (i, v) in &flips {
                let i = i.index(img.len().min(1024));
                img[i] ^= v | 1;
            }
            let _ = load(&m, &kernel(img, "x=1"), 32 << 20, 2);
        }
    }

    #[test]
    fn overlong_cmdline_is_refused() {
        let m = mem();
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        let g = guests::by_name("counter").unwrap();
        assert!(matches!(
            load(&m, &kernel(g.elf.to_vec(), &long), 32 << 20, 1),
            Err(Error::CmdlineTooLong(_))
        ));
    }
}
