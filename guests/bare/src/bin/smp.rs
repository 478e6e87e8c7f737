//! `smp`: every vCPU (counted from the MP table) does some work and prints `vcpu I ok`;
//! the guest exits 0 once all have reported (exit 3 if an AP never shows up).
//! Command line: `work=N` xorshift rounds per vCPU (default 1 000 000).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicUsize, Ordering};
use rt::{cmdline, println, smp, time};

static REPORTED: AtomicUsize = AtomicUsize::new(0);

fn work(cpu: usize) -> u64 {
    // A little integer work per CPU so every vCPU really executes user code.
    let mut x = cpu as u64 + 1;
    for _ in 0..cmdline::get_u64("work", 1_000_000) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    x
}

#[no_mangle]
extern "C" fn guest_main(cpu: usize, _si: u64) -> ! {
    if cpu == 0 {
        let n = smp::cpu_count();
        println!("smp: {n} cpus");
        if n > 1 {
            smp::start_aps();
        }
        let x = work(cpu);
        println!("vcpu {cpu} ok ({:x})", x & 0xffff);
        REPORTED.fetch_add(1, Ordering::AcqRel);
        let deadline = time::rdtsc() + 60 * time::tsc_hz();
        while REPORTED.load(Ordering::Acquire) < n {
            if time::rdtsc() > deadline {
                println!("smp: only {} of {n} cpus reported", REPORTED.load(Ordering::Acquire));
                rt::exit(3);
            }
            core::hint::spin_loop();
        }
        println!("smp: all {n} cpus ok");
        rt::exit(0)
    }
    let x = work(cpu);
    println!("vcpu {cpu} ok ({:x})", x & 0xffff);
    REPORTED.fetch_add(1, Ordering::AcqRel);
    loop {
        core::hint::spin_loop();
    }
}
