//! `counter`: prints `1`..`N`, one decimal per line, at about R lines/s (0 = flat out), exits 0.
//! Command line: `count=N rate=R` (defaults: count=100 rate=0).
#![no_std]
#![no_main]

use rt::{cmdline, io, time};

#[no_mangle]
extern "C" fn guest_main(_cpu: usize, _si: u64) -> ! {
    let count = cmdline::get_u64("count", 100);
    let rate = cmdline::get_u64("rate", 0);
    let (start, step) = if rate > 0 { (time::rdtsc(), time::tsc_hz() / rate) } else { (0, 0) };
    for i in 1..=count {
        if rate > 0 {
            let due = start + (i - 1) * step;
            while time::rdtsc() < due {
                core::hint::spin_loop();
            }
        }
        io::print_u64_line(i);
    }
    io::exit(0)
}
