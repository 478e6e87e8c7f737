//! Port I/O, console and exit device.
use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

pub const COM1: u16 = 0x3f8;
pub const EXIT_PORT: u16 = 0x501;

#[inline(always)]
pub fn outb(port: u16, v: u8) {
    // SAFETY: IOPL=3 lets CPL3 code use port I/O; the ports are emulated devices.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags)) }
}

#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Ends the VM with `code`.
pub fn exit(code: u8) -> ! {
    outb(EXIT_PORT, code);
    loop {
        core::hint::spin_loop();
    }
}

/// Unlocked console writer (one byte per port write).
pub struct Console;

impl core::fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            outb(COM1, b);
        }
        Ok(())
    }
}

static CONSOLE_LOCK: AtomicBool = AtomicBool::new(false);

/// Prints with a lock so lines from several CPUs never interleave.
pub fn print(args: core::fmt::Arguments) {
    while CONSOLE_LOCK
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    wait_transmitter_ready();
    let _ = core::fmt::Write::write_fmt(&mut Console, args);
    CONSOLE_LOCK.store(false, Ordering::Release);
}

#[macro_export]
macro_rules! println {
    ($($t:tt)*) => { $crate::io::print(format_args!("{}\n", format_args!($($t)*))) };
}

/// Writes `n` and a newline with no formatting machinery (fast path for `counter`).
pub fn print_u64_line(mut n: u64) {
    let mut buf = [0u8; 21];
    let mut i = buf.len() - 1;
    buf[i] = b'\n';
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    wait_transmitter_ready();
    for &b in &buf[i..] {
        outb(COM1, b);
    }
}

/// Polls the UART's line status until its transmitter holding register is empty, as a 16550
/// driver does before filling the FIFO. Once per line, not per byte: every port access is an
/// exit, and ftvm's UART drains at once. (Under FT each read is a recorded device input.)
pub fn wait_transmitter_ready() {
    const LSR: u16 = COM1 + 5;
    const THRE: u8 = 0x20;
    for _ in 0..1000 {
        if inb(LSR) & THRE != 0 {
            return;
        }
        core::hint::spin_loop();
    }
}
