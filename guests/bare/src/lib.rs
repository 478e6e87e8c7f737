//! `rt`: the tiny runtime every ftvm test guest links.
//!
//! The CPL0 stub in [`boot`] brings each CPU to user mode (CPL3, IOPL=3, interrupts masked) and
//! calls the program's `guest_main(cpu, start_info)`. Everything here runs at CPL3 unless noted.
//!
//! Devices used, all by port I/O (so each access is one VM exit):
//! - COM1 16550 at 0x3f8: console output (written without polling LSR: both ftvm's and QEMU's
//!   UART accept bytes at any time).
//! - Exit device at 0x501 (QEMU `isa-debug-exit` default port): writing byte `v` ends the VM;
//!   ftvm exits with `v` (QEMU with `(v << 1) | 1`).
//! - PIT channel 2 + port 0x61: TSC calibration.
//! - virtio-blk over virtio-mmio at 0xd0000000 ([`virtio_blk`], polled; the `journal` guest).
//! - virtio-net over virtio-mmio at 0xd0001000 ([`virtio_net`], polled; the `netserve` guest).
#![no_std]

pub mod boot;
pub mod cmdline;
pub mod io;
mod mem;
pub mod smp;
pub mod time;
pub mod virtio;
pub mod virtio_blk;
pub mod virtio_net;

pub use io::{exit, print, Console};

extern "C" {
    /// Provided by each guest program; called on every CPU that reaches user mode.
    fn guest_main(cpu: usize, start_info: u64) -> !;
}

/// First Rust code at CPL3 (see `boot.rs`).
#[no_mangle]
extern "C" fn rt_user_entry(start_info: u64, cpu: u64) -> ! {
    if cpu == 0 {
        cmdline::init(start_info);
    }
    // SAFETY: `guest_main` is defined by the program with this exact signature.
    unsafe { guest_main(cpu as usize, start_info) }
}

/// CPU exception (runs at CPL0): report and end the VM with code 125.
#[no_mangle]
extern "C" fn rt_guest_fault(vector: u64, frame: *const u64) -> ! {
    // SAFETY: `frame` points at [vector, error, rip, cs, rflags, rsp, ss] pushed by the stub.
    let (err, rip) = unsafe { (*frame.add(1), *frame.add(2)) };
    let mut c = Console;
    let _ = core::fmt::Write::write_fmt(
        &mut c,
        format_args!("\nguest exception {vector} error={err:#x} rip={rip:#x}\n"),
    );
    io::exit(125)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut c = Console;
    let _ = core::fmt::Write::write_fmt(&mut c, format_args!("\nguest panic: {info}\n"));
    io::exit(101)
}
