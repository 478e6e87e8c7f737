//! `pages`: writes a known set of pages, for dirty-tracking tests.
//!
//! Command line `base=MIB count=N stride=S` (defaults 32, 64, 3). Prints `ready`, then spins
//! until the host writes a non-zero word at the flag page (`base` MiB − 4 KiB), then writes one
//! word into each page `base + i·S·4096`, i < N, and exits 0. Everything after `ready` runs in
//! registers only, so those pages are the only guest writes the host can observe.
#![no_std]
#![no_main]

use rt::{cmdline, io};

#[no_mangle]
extern "C" fn guest_main(_cpu: usize, _si: u64) -> ! {
    let base = cmdline::get_u64("base", 32) << 20;
    let count = cmdline::get_u64("count", 64);
    let stride = cmdline::get_u64("stride", 3) * 4096;
    let flag = base - 4096;
    // Unlocked raw output: nothing is written to memory after the last byte leaves.
    for b in b"ready\n" {
        io::outb(io::COM1, *b);
    }
    // SAFETY: identity-mapped guest RAM; the test sizes the VM so the set fits. The block never
    // returns, so clobbering its input registers and eax is harmless.
    unsafe {
        core::arch::asm!(
            "2:",
            "pause",
            "cmp qword ptr [{flag}], 0",
            "je 2b",
            "test {count}, {count}",
            "jz 4f",
            "3:",
            "mov qword ptr [{base} + 8], {count}",
            "add {base}, {stride}",
            "dec {count}",
            "jnz 3b",
            "4:",
            "xor eax, eax",
            "out dx, al",
            "5:",
            "jmp 5b",
            flag = in(reg) flag,
            base = in(reg) base,
            stride = in(reg) stride,
            count = in(reg) count,
            in("dx") io::EXIT_PORT,
            options(noreturn, nostack),
        );
    }
}
