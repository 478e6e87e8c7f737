//! PVH `hvm_start_info` parsing: command line and memory map.
use core::sync::atomic::{AtomicU64, Ordering};

const PVH_MAGIC: u32 = 0x336e_c578;
static CMDLINE: AtomicU64 = AtomicU64::new(0);
static START_INFO: AtomicU64 = AtomicU64::new(0);

pub(crate) fn init(start_info: u64) {
    START_INFO.store(start_info, Ordering::Relaxed);
    if start_info == 0 {
        return;
    }
    // SAFETY: PVH guarantees EBX points at a valid hvm_start_info; memory is identity-mapped.
    let magic = unsafe { core::ptr::read_volatile(start_info as *const u32) };
    if magic == PVH_MAGIC {
        // SAFETY: cmdline_paddr is at offset 24 of hvm_start_info.
        let p = unsafe { core::ptr::read_volatile((start_info + 24) as *const u64) };
        CMDLINE.store(p, Ordering::Relaxed);
    }
}

/// The kernel command line ("" if none).
pub fn cmdline() -> &'static str {
    let p = CMDLINE.load(Ordering::Relaxed);
    if p == 0 {
        return "";
    }
    let mut n = 0;
    // SAFETY: the cmdline is a NUL-terminated string in guest RAM; bounded to 4 KiB.
    while n < 4096 && unsafe { core::ptr::read_volatile((p as *const u8).add(n)) } != 0 {
        n += 1;
    }
    // SAFETY: the range was just scanned.
    let bytes = unsafe { core::slice::from_raw_parts(p as *const u8, n) };
    core::str::from_utf8(bytes).unwrap_or("")
}

/// Value of `key=...` on the command line.
pub fn get(key: &str) -> Option<&'static str> {
    cmdline().split_ascii_whitespace().find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then_some(v)
    })
}

/// Integer `key=N` (decimal), `default` when absent; panics (guest exit 101) on garbage.
pub fn get_u64(key: &str, default: u64) -> u64 {
    match get(key) {
        None => default,
        Some(v) => v.parse().unwrap_or_else(|_| panic!("bad value for {key}: {v:?}")),
    }
}

/// Highest end address of usable RAM below 4 GiB from the PVH memory map.
pub fn ram_end_below_4g() -> u64 {
    let si = START_INFO.load(Ordering::Relaxed);
    if si == 0 {
        return 0;
    }
    // SAFETY: version >= 1 start_info has memmap_paddr at 40 and memmap_entries at 48.
    let (version, map, entries) = unsafe {
        (
            core::ptr::read_volatile((si + 4) as *const u32),
            core::ptr::read_volatile((si + 40) as *const u64),
            core::ptr::read_volatile((si + 48) as *const u32),
        )
    };
    if version < 1 || map == 0 {
        return 0;
    }
    let mut end = 0;
    for i in 0..entries.min(128) as u64 {
        let e = map + i * 24;
        // SAFETY: each hvm_memmap_table_entry is {addr u64, size u64, type u32, reserved u32}.
        let (addr, size, ty) = unsafe {
            (
                core::ptr::read_volatile(e as *const u64),
                core::ptr::read_volatile((e + 8) as *const u64),
                core::ptr::read_volatile((e + 16) as *const u32),
            )
        };
        if ty == 1 && addr < (1 << 32) {
            end = end.max((addr + size).min(1 << 32));
        }
    }
    end
}
