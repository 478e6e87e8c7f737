//! Intel MultiProcessor Specification 1.4 tables, so guests can find every vCPU and the IOAPIC.
//!
//! Layout written at [`crate::layout::EBDA_START`]: floating pointer (16 bytes), configuration
//! table header (44 bytes), one processor entry per vCPU, an ISA bus, the IOAPIC, 16 I/O
//! interrupt assignments (ISA IRQ i → IOAPIC pin i), ExtINT on LINT0 and NMI on LINT1.
use crate::layout::{EBDA_START, IOAPIC_ADDR, LAPIC_ADDR};

pub const MAX_CPUS: u8 = 254;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_SIGNATURE: u32 = (6 << 8) | (1 << 4); // family 6, model 1
const CPU_FEATURES: u32 = 0x201; // FPU | APIC

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// The MP tables for `cpus` vCPUs, to be written at `EBDA_START`.
pub fn build(cpus: u8) -> Vec<u8> {
    assert!((1..=MAX_CPUS).contains(&cpus));
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        entries.extend_from_slice(&[0, id, APIC_VERSION, 1 | if id == 0 { 2 } else { 0 }]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..16u8 {
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0, 0]); // ExtINT → LINT0 of APIC 0
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]); // NMI → LINT1 of all
    count += 2;

    let table_addr = EBDA_START as u32 + 16;
    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    header.extend_from_slice(&[4, 0]); // spec rev 1.4, checksum (later)
    header.extend_from_slice(b"FTVM    ");
    header.extend_from_slice(b"000000000000");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&table_addr.to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    fp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn tables_checksum_to_zero_and_list_every_cpu() {
        for cpus in [1u8, 2, 8] {
            let t = build(cpus);
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
            let n = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(n as usize, cpus as usize + 1 + 1 + 16 + 2);
            let procs = (0..cpus as usize)
                .filter(|i| table[44 + i * 20] == 0)
                .count();
            assert_eq!(procs, cpus as usize);
            assert_eq!(table[44 + 3] & 2, 2, "vCPU 0 is the BSP");
            assert!(t.len() <= 1024, "fits in the EBDA");
        }
    }
}
