//! Multiprocessor start-up from CPL3: count CPUs from the MP table, copy the real-mode
//! trampoline below 1 MiB and wake the APs with INIT + SIPI through the (user-mapped) LAPIC.
use core::ptr::{read_volatile, write_volatile};

/// Where the AP trampoline is copied (SIPI vector 0x08).
pub const TRAMPOLINE: u64 = 0x8000;
const LAPIC: u64 = 0xfee0_0000;

extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
}

fn find_mp_floating(lo: u64, len: u64) -> Option<u64> {
    let mut p = lo;
    while p + 16 <= lo + len {
        // SAFETY: low memory is identity-mapped RAM/ROM in every VMM this runs under.
        if unsafe { read_volatile(p as *const [u8; 4]) } == *b"_MP_" {
            return Some(p);
        }
        p += 16;
    }
    None
}

/// Number of enabled processors listed in the MP table (1 when there is none).
pub fn cpu_count() -> usize {
    // SAFETY: the BDA word at 0x40e holds the EBDA segment (0 when absent).
    let ebda = (unsafe { read_volatile(0x40e as *const u16) } as u64) << 4;
    let fp = (if ebda != 0 { find_mp_floating(ebda, 1024) } else { None })
        .or_else(|| find_mp_floating(0x9fc00, 1024))
        .or_else(|| find_mp_floating(0xf0000, 0x10000));
    let Some(fp) = fp else { return 1 };
    // SAFETY: the floating pointer's PHYSADDR field (offset 4) locates the configuration table.
    let table = unsafe { read_volatile((fp + 4) as *const u32) } as u64;
    if table == 0 || unsafe { read_volatile(table as *const [u8; 4]) } != *b"PCMP" {
        return 1;
    }
    // SAFETY: header fields of the MP configuration table.
    let entries = unsafe { read_volatile((table + 34) as *const u16) };
    let mut p = table + 44;
    let mut cpus = 0;
    for _ in 0..entries.min(512) {
        // SAFETY: entries follow the 44-byte header; processor entries are 20 bytes, others 8.
        let ty = unsafe { read_volatile(p as *const u8) };
        if ty == 0 {
            if unsafe { read_volatile((p + 3) as *const u8) } & 1 != 0 {
                cpus += 1;
            }
            p += 20;
        } else {
            p += 8;
        }
    }
    cpus.clamp(1, crate::boot::MAX_CPUS)
}

fn lapic_write(reg: u64, v: u32) {
    // SAFETY: the LAPIC page is identity-mapped user-accessible; MMIO is emulated by KVM.
    unsafe { write_volatile((LAPIC + reg) as *mut u32, v) }
}

fn lapic_read(reg: u64) -> u32 {
    // SAFETY: as for `lapic_write`.
    unsafe { read_volatile((LAPIC + reg) as *const u32) }
}

fn send_ipi_all_but_self(low: u32) {
    lapic_write(0x310, 0);
    lapic_write(0x300, low);
    while lapic_read(0x300) & (1 << 12) != 0 {
        core::hint::spin_loop();
    }
}

/// Starts every AP; each enters `guest_main` with its CPU index (1..).
pub fn start_aps() {
    // SAFETY: the trampoline is position-independent within its page; 0x8000 is free RAM.
    unsafe {
        let start = &ap_tramp_start as *const u8;
        let len = &ap_tramp_end as *const u8 as usize - start as usize;
        core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len);
    }
    lapic_write(0xf0, 0x1ff); // spurious vector register: APIC software-enabled
    send_ipi_all_but_self(0x000c_4500); // INIT
    for _ in 0..2 {
        send_ipi_all_but_self(0x000c_4600 | (TRAMPOLINE >> 12) as u32); // STARTUP
    }
}
