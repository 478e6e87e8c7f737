//! Time from the TSC, calibrated once against PIT channel 2.
use crate::io::{inb, outb};
use core::sync::atomic::{AtomicU64, Ordering};

static TSC_HZ: AtomicU64 = AtomicU64::new(0);

#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is allowed at CPL3 (CR4.TSD is clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC ticks per second, measured on first use over 10 ms of PIT channel 2.
pub fn tsc_hz() -> u64 {
    let hz = TSC_HZ.load(Ordering::Relaxed);
    if hz != 0 {
        return hz;
    }
    const PIT_HZ: u64 = 1_193_182;
    const TICKS: u64 = PIT_HZ / 100;
    outb(0x61, (inb(0x61) & !0x02) | 0x01); // gate on, speaker off
    outb(0x43, 0xb0); // channel 2, lo/hi byte, mode 0
    outb(0x42, TICKS as u8);
    outb(0x42, (TICKS >> 8) as u8);
    let t0 = rdtsc();
    while inb(0x61) & 0x20 == 0 {}
    let t1 = rdtsc();
    let hz = ((t1 - t0) * PIT_HZ / TICKS).max(1);
    TSC_HZ.store(hz, Ordering::Relaxed);
    hz
}

/// Nanoseconds from a TSC delta.
pub fn ticks_to_ns(ticks: u64) -> u64 {
    (ticks as u128 * 1_000_000_000 / tsc_hz() as u128) as u64
}
