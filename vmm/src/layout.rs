//! Guest physical memory layout (x86_64).
//!
//! ```text
//! 0x0000_0500  boot GDT (PVH entry)
//! 0x0000_6000  PVH hvm_start_info, memory map right after it
//! 0x0000_7000  Linux boot_params ("zero page")
//! 0x0000_8000  (free: the test guests copy their AP trampoline here)
//! 0x0000_9000  Linux boot page tables: PML4, PDPT, PD (identity map of the first 1 GiB)
//! 0x0002_0000  kernel command line (up to 64 KiB)
//! 0x0009_fc00  MP table (EBDA), up to the end of conventional memory
//! 0x0010_0000  kernel / guest image (1 MiB)
//! 0xc000_0000  32-bit MMIO gap (IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000) up to 4 GiB
//! 4 GiB        RAM above the gap when the guest has more than 3 GiB
//! ```

pub const PAGE_SIZE: u64 = 4096;
pub const BOOT_GDT_START: u64 = 0x500;
pub const PVH_INFO_START: u64 = 0x6000;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
pub const EBDA_START: u64 = 0x9fc00;
pub const HIMEM_START: u64 = 0x10_0000;
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 1 << 32;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Smallest guest ftvm accepts: the boot structures plus the largest test guest image.
pub const MIN_MEM_MIB: u64 = 16;
/// Largest guest ftvm accepts.
pub const MAX_MEM_MIB: u64 = 1 << 20;

/// Guest RAM ranges for a guest of `mem_bytes`: below the 32-bit MMIO gap, then above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// Guest RAM size in MiB given its regions `(gpa, host, len)`.
pub fn mem_mib_of<T>(regions: &[(u64, T, usize)]) -> u64 {
    regions.iter().map(|r| r.2 as u64).sum::<u64>() >> 20
}

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// The e820 map for a guest of `mem_bytes`: `(addr, size, type)`.
pub fn e820(mem_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, len) in ram_ranges(mem_bytes) {
        let start = start.max(HIMEM_START);
        let end = if start == HIMEM_START {
            len
        } else {
            start + len
        };
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_range_and_reserved_bios_hole() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        let map = e820(128 << 20);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(map[2], (HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM));
    }

    #[test]
    fn large_guest_is_split_around_the_mmio_gap() {
        let mem = 4u64 << 30;
        assert_eq!(
            ram_ranges(mem),
            vec![(0, MMIO_GAP_START), (MMIO_GAP_END, 1 << 30)]
        );
        let map = e820(mem);
        assert_eq!(map.last().unwrap(), &(MMIO_GAP_END, 1 << 30, E820_RAM));
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, mem - (HIMEM_START - EBDA_START));
    }
}
