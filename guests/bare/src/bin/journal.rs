//! `journal`: appends numbered, checksummed records to its disk and acknowledges each on the
//! console once the device has completed the write (`journal: record N committed`). At boot it
//! scans the disk for the last valid record and continues after it, so the disk is a log that
//! survives restarts (and, under FT, failovers). Ends with `journal: last=N` and exit 0.
//!
//! Command line: `count=K` records to append (default 100), `rate=R` per second (0 = flat out).
//!
//! Record N occupies sector N (512 bytes): magic `FTVMJRNL` | seq u64 | 480 payload bytes
//! derived from seq | FNV-1a-64 of the first 504 bytes. A record is valid if its magic,
//! sequence number and checksum all match; the scan stops at the first invalid sector.
#![no_std]
#![no_main]

use rt::virtio_blk::{Disk, SECTOR};
use rt::{cmdline, io, println, time};

const MAGIC: &[u8; 8] = b"FTVMJRNL";

fn fnv1a(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in b {
        h ^= u64::from(*x);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn record(seq: u64, out: &mut [u8; SECTOR]) {
    out[..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in out[16..496].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    out[496..504].fill(0);
    let h = fnv1a(&out[..504]);
    out[504..].copy_from_slice(&h.to_le_bytes());
}

fn valid(seq: u64, s: &[u8; SECTOR]) -> bool {
    &s[..8] == MAGIC
        && s[8..16] == seq.to_le_bytes()
        && s[504..] == fnv1a(&s[..504]).to_le_bytes()
}

#[repr(C, align(4096))]
struct Buf([u8; SECTOR]);
static mut BUF: Buf = Buf([0; SECTOR]);

#[no_mangle]
extern "C" fn guest_main(cpu: usize, _si: u64) -> ! {
    if cpu != 0 {
        loop {
            core::hint::spin_loop();
        }
    }
    let count = cmdline::get_u64("count", 100);
    let rate = cmdline::get_u64("rate", 0);
    let mut disk = match Disk::open() {
        Ok(d) => d,
        Err(e) => {
            println!("journal: no disk: {e:?}");
            io::exit(2)
        }
    };
    // SAFETY: the only user of BUF, on CPU 0.
    let buf = unsafe { &mut (*(&raw mut BUF)).0 };
    let mut last = 0u64;
    while last + 1 < disk.sectors {
        if disk.read(last + 1, buf).is_err() || !valid(last + 1, buf) {
            break;
        }
        last += 1;
    }
    println!("journal: found {last} records on a disk of {} sectors", disk.sectors);
    let (start, step) = if rate > 0 { (time::rdtsc(), time::tsc_hz() / rate) } else { (0, 0) };
    for i in 0..count {
        let seq = last + 1;
        if seq >= disk.sectors {
            println!("journal: disk full at record {last}");
            break;
        }
        if rate > 0 {
            let due = start + i * step;
            while time::rdtsc() < due {
                core::hint::spin_loop();
            }
        }
        record(seq, buf);
        if let Err(e) = disk.write(seq, buf) {
            println!("journal: write of record {seq} failed: {e:?}");
            io::exit(3)
        }
        last = seq;
        println!("journal: record {seq} committed");
    }
    println!("journal: last={last}");
    io::exit(0)
}
