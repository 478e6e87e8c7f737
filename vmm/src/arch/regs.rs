//! Boot-time registers for the two entry protocols ftvm supports.
//!
//! - **PVH** (x86/HVM direct boot ABI): 32-bit protected mode, paging off, flat CS/DS,
//!   `EBX` = physical address of `hvm_start_info`.
//! - **Linux 64-bit boot protocol**: long mode with an identity map of the first 1 GiB,
//!   `RSI` = physical address of `boot_params`, entry at the 64-bit entry point.
use crate::layout::{BOOT_GDT_START, PDE_START, PDPTE_START, PML4_START};
use crate::memory::GuestMemory;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Boot stack for the Linux 64-bit entry (below the page tables).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot write boot GDT or page tables into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Packs a GDT entry from flags, base and limit (the "segment descriptor" encoding).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The `kvm_segment` (hidden descriptor cache) matching GDT entry `entry` at `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

fn load_gdt(mem: &GuestMemory, sregs: &mut kvm_sregs, gdt: &[u64]) -> Result<(), Error> {
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(Error::Write)?;
    }
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    Ok(())
}

/// Registers for a PVH entry at `entry` with `hvm_start_info` at `start_info`.
pub fn pvh(
    mem: &GuestMemory,
    mut sregs: kvm_sregs,
    entry: u64,
    start_info: u64,
) -> Result<(kvm_regs, kvm_sregs), Error> {
    let gdt = [
        0,
        gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x008b, 0, 0x67),    // TSS
    ];
    load_gdt(mem, &mut sregs, &gdt)?;
    sregs.cr0 = CR0_PE | CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rbx: start_info,
        ..Default::default()
    };
    Ok((regs, sregs))
}

/// Registers for a Linux 64-bit entry at `entry` with `boot_params` at `zero_page`; writes an
/// identity map of the first 1 GiB (2 MiB pages) for the kernel's early code.
pub fn linux64(
    mem: &GuestMemory,
    mut sregs: kvm_sregs,
    entry: u64,
    zero_page: u64,
) -> Result<(kvm_regs, kvm_sregs), Error> {
    let gdt = [
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x008b, 0, 0x67),    // TSS
    ];
    load_gdt(mem, &mut sregs, &gdt)?;
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(Error::Write)?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
        .map_err(Error::Write)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
            .map_err(Error::Write)?;
    }
    sregs.cr3 = PML4_START;
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PE | CR0_PG | CR0_ET;
    sregs.efer |= EFER_LME | EFER_LMA;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: zero_page,
        ..Default::default()
    };
    Ok((regs, sregs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_encode_as_documented() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x008b, 0, 0x67), 0x0000_8b00_0000_0067);
    }

    #[test]
    fn segments_decode_their_descriptor() {
        let code64 = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (code64.selector, code64.l, code64.db, code64.g),
            (8, 1, 0, 1)
        );
        assert_eq!(code64.limit, 0xffff_ffff);
        let tss = segment_from_gdt(gdt_entry(0x008b, 0, 0x67), 3);
        assert_eq!(
            (tss.type_, tss.s, tss.limit, tss.present),
            (0xb, 0, 0x67, 1)
        );
    }

    #[test]
    fn linux64_builds_identity_map_and_long_mode() {
        let mem = crate::memory::create(16).unwrap();
        let (regs, sregs) = linux64(&mem, kvm_sregs::default(), 0x100200, 0x7000).unwrap();
        assert_eq!((regs.rip, regs.rsi), (0x100200, 0x7000));
        assert_ne!(sregs.efer & EFER_LMA, 0);
        assert_eq!(sregs.cr3, PML4_START);
        let pde: u64 = mem.read_obj(GuestAddress(PDE_START + 8)).unwrap();
        assert_eq!(pde, (1 << 21) | 0x83);
    }
}
