//! `dirtier`: dirties guest memory at a controlled rate, then prints a checksum of it.
//!
//! Command line:
//! - `mib=W pages_per_sec=R secs=S` (defaults 16, 1000, 2): writes `R·S` pages of a W MiB working
//!   set, paced at R pages/s, spinning on compute between writes. Which page the k-th write hits
//!   and what it writes depend only on k, so the final checksum is the same for every run with
//!   the same arguments — interrupted (saved/restored, failed over) or not.
//! - `preset=compile-profile [jobs=J] [mib=W]` (defaults 200 jobs, 64 MiB): **a stand-in for a
//!   kernel compile**, which cannot run on this project's development machine (a Linux guest
//!   kernel is emulated there). It models what matters to FT: 100 % CPU in user mode, and page
//!   dirtying shaped like `make -j` spawning compiler processes: each job "forks" (touches a
//!   fresh 1 MiB arena, 256 pages, as copy-on-write and exec would), then "compiles" (pure
//!   compute with writes to scattered heap pages of its arena). Work is fixed, not time-boxed, so
//!   its run time measures overhead. Prints the elapsed guest time too. With several vCPUs the
//!   jobs are shared out (`make -jN`): vCPU c runs jobs c, c+N, … in arenas of its own, so the
//!   final checksum does not depend on how the vCPUs interleave.
//!
//! The working set starts at 8 MiB (above the image and stacks).
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicUsize, Ordering};
use rt::{cmdline, println, smp, time};

/// vCPUs done with their compile-profile jobs.
static DONE: AtomicUsize = AtomicUsize::new(0);

const BASE: u64 = 8 << 20;
const PAGE: u64 = 4096;

fn mix(mut k: u64) -> u64 {
    k = k.wrapping_add(0x9e37_79b9_7f4a_7c15);
    k = (k ^ (k >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    k = (k ^ (k >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    k ^ (k >> 31)
}

fn write_word(page: u64, word: u64, v: u64) {
    // SAFETY: page < working-set pages, checked against the RAM size at start.
    unsafe { core::ptr::write_volatile((BASE + page * PAGE + (word % 512) * 8) as *mut u64, v) }
}

fn checksum(pages: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let words = pages * PAGE / 8;
    for i in 0..words {
        // SAFETY: inside the working set.
        let w = unsafe { core::ptr::read_volatile((BASE + i * 8) as *const u64) };
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn working_set(mib: u64) -> u64 {
    let end = cmdline::ram_end_below_4g();
    let want = BASE + (mib << 20);
    if mib == 0 || (end != 0 && want > end) {
        println!("dirtier: mib={mib} does not fit: guest RAM ends at {} MiB, working set starts at 8 MiB", end >> 20);
        rt::exit(2);
    }
    (mib << 20) / PAGE
}

fn paced(mib: u64, rate: u64, secs: u64) -> ! {
    let pages = working_set(mib);
    let total = rate * secs;
    let hz = time::tsc_hz();
    let start = time::rdtsc();
    let mut acc = 1u64;
    for k in 0..total {
        let due = start + (k as u128 * hz as u128 / rate.max(1) as u128) as u64;
        while time::rdtsc() < due {
            acc ^= acc << 13;
            acc ^= acc >> 7;
            acc ^= acc << 17;
        }
        let m = mix(k);
        write_word(m % pages, m >> 32, m);
    }
    core::hint::black_box(acc);
    println!("dirtier: writes={total} pages={pages} checksum={:016x}", checksum(pages));
    rt::exit(0)
}

fn compile_profile(cpu: usize, jobs: u64, mib: u64) -> ! {
    let pages = working_set(mib);
    const ARENA: u64 = 256;
    let n = smp::cpu_count();
    let arenas = (pages / ARENA).max(1);
    if arenas < n as u64 {
        println!("dirtier: mib={mib} gives {arenas} 1 MiB arenas, fewer than the {n} vCPUs");
        rt::exit(2);
    }
    let t0 = time::rdtsc();
    if cpu == 0 && n > 1 {
        smp::start_aps();
    }
    // This vCPU's arenas: cpu, cpu + n, … (one vCPU: all of them, as before).
    let own = arenas / n as u64;
    let mut acc = 0x1234_5678u64 ^ cpu as u64;
    for (k, job) in (cpu as u64..jobs).step_by(n).enumerate() {
        let arena = (cpu as u64 + n as u64 * (k as u64 % own)) * ARENA;
        // fork/exec: every page of the arena gets written
        for p in 0..ARENA {
            write_word(arena + p, job, mix(job * ARENA + p));
        }
        // compile: compute, with heap writes to scattered arena pages
        for step in 0..64u64 {
            for _ in 0..20_000 {
                acc ^= acc << 13;
                acc ^= acc >> 7;
                acc ^= acc << 17;
            }
            write_word(arena + mix(step ^ acc) % ARENA, step, acc);
        }
    }
    DONE.fetch_add(1, Ordering::AcqRel);
    if cpu != 0 {
        loop {
            core::hint::spin_loop();
        }
    }
    while DONE.load(Ordering::Acquire) < n {
        core::hint::spin_loop();
    }
    let ms = time::ticks_to_ns(time::rdtsc() - t0) / 1_000_000;
    println!(
        "dirtier: compile-profile (stand-in for a kernel compile) jobs={jobs} vcpus={n} pages={pages} checksum={:016x} elapsed_ms={ms}",
        checksum(pages)
    );
    rt::exit(0)
}

#[no_mangle]
extern "C" fn guest_main(cpu: usize, _si: u64) -> ! {
    match cmdline::get("preset") {
        Some("compile-profile") => compile_profile(
            cpu,
            cmdline::get_u64("jobs", 200),
            cmdline::get_u64("mib", 64),
        ),
        Some(other) => {
            println!("dirtier: unknown preset {other:?} (known: compile-profile)");
            rt::exit(2)
        }
        None => paced(
            cmdline::get_u64("mib", 16),
            cmdline::get_u64("pages_per_sec", 1000),
            cmdline::get_u64("secs", 2),
        ),
    }
}
