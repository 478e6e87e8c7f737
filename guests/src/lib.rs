//! ftvm's test guests, embedded in the binary so `ftvm run --guest NAME` works anywhere.
//!
//! Each is a bare-metal PVH ELF image (sources in `guests/bare/`): a minimal CPL0 stub enters
//! long mode and drops to CPL3, where the workload runs (see `../shared/DESIGN.md` for why: on
//! the PVM KVM used for development, kernel-mode guest code is emulated, user mode is native).
//! The same files are copied to `target/<profile>/guests/NAME.elf` for other VMMs.
//!
//! | guest     | command line                              | does |
//! |-----------|-------------------------------------------|------|
//! | `counter` | `count=N rate=R`                          | prints 1..N, one per line, R lines/s (0 = flat out); exits 0 |
//! | `dirtier` | `mib=W pages_per_sec=R secs=S`            | dirties R pages/s over W MiB; prints a checksum; exits 0 |
//! | `dirtier` | `preset=compile-profile [jobs=J] [mib=W]` | **stand-in for a kernel compile** (see its source); exits 0 |
//! | `smp`     | —                                         | every vCPU prints `vcpu I ok`; exits 0 when all reported |
//! | `pages`   | `base=MIB count=N stride=S`               | writes a known page set after a host handshake (dirty-tracking tests) |
//! | `journal` | `count=K rate=R`                          | appends numbered, checksummed records to its virtio-blk disk (`--disk`) |
//! | `netserve`| `ip=A.B.C.D/P port=N conns=N`             | TCP echo server on its virtio-net device (`--tap`), smoltcp at CPL3 |

/// A built-in guest image.
#[derive(Debug, Clone, Copy)]
pub struct Guest {
    pub name: &'static str,
    pub summary: &'static str,
    pub elf: &'static [u8],
}

macro_rules! guest {
    ($name:literal, $summary:literal) => {
        Guest {
            name: $name,
            summary: $summary,
            elf: include_bytes!(concat!(env!("OUT_DIR"), "/", $name)),
        }
    };
}

/// All built-in guests.
pub const ALL: &[Guest] = &[
    guest!("counter", "prints 1..N (count=N rate=R)"),
    guest!(
        "dirtier",
        "dirties memory, prints a checksum (mib=W pages_per_sec=R secs=S | preset=compile-profile)"
    ),
    guest!("smp", "every vCPU reports `vcpu I ok`"),
    guest!("pages", "writes a known page set (dirty-tracking tests)"),
    guest!(
        "journal",
        "appends checksummed records to its virtio-blk disk, acks each on the console (count=K rate=R; needs --disk)"
    ),
    guest!(
        "netserve",
        "TCP echo server on its virtio-net device, smoltcp at CPL3 (ip=A.B.C.D/P port=N conns=N; needs --tap)"
    ),
];

/// Looks a guest up by name.
pub fn by_name(name: &str) -> Option<&'static Guest> {
    ALL.iter().find(|g| g.name == name)
}

/// Names of all guests, for error messages and `--help`.
pub fn names() -> Vec<&'static str> {
    ALL.iter().map(|g| g.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_is_an_elf_with_a_pvh_note() {
        for g in ALL {
            assert_eq!(&g.elf[..4], b"\x7fELF", "{} is not an ELF", g.name);
            // XEN_ELFNOTE_PHYS32_ENTRY note: namesz 4, descsz 4, type 18, "Xen\0"
            let note = [4u8, 0, 0, 0, 4, 0, 0, 0, 18, 0, 0, 0, b'X', b'e', b'n', 0];
            assert!(
                g.elf.windows(16).any(|w| w == note),
                "{} lacks the PVH note",
                g.name
            );
        }
    }

    #[test]
    fn unknown_guest_is_none() {
        assert!(by_name("nope").is_none());
        assert!(by_name("counter").is_some());
    }
}
