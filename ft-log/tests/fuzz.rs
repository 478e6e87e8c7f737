//! Property tests of the FT log codec against hostile input.
//!
//! CI runs each property with proptest's default case count. For a longer fuzzing run:
//! `PROPTEST_CASES=200000 cargo test --release -p ft-log --test fuzz`.
use bytes::{Bytes, BytesMut};
use ft_log::page::{encode_page, PageData, PageEntry, PAGE_SIZE};
use ft_log::record::{encode_pages, EpochEnd};
use ft_log::{Decoder, Event, EventKind, Hello, Record, Role};
use proptest::prelude::*;

fn blob() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from)
}

fn page_entry() -> impl Strategy<Value = PageEntry> {
    let gpa = (0u64..1 << 30).prop_map(|p| p * PAGE_SIZE as u64);
    let data = prop_oneof![
        Just(PageData::Zero),
        any::<u8>().prop_map(|b| PageData::Raw(Bytes::from(vec![b; PAGE_SIZE]))),
        proptest::collection::vec(any::<u8>(), 1..200)
            .prop_map(|v| PageData::XorLz4(Bytes::from(v))),
        any::<u64>().prop_map(PageData::Hash),
    ];
    (gpa, data).prop_map(|(gpa, data)| PageEntry { gpa, data })
}

fn event_kind() -> impl Strategy<Value = EventKind> {
    prop_oneof![
        (any::<u16>(), any::<u8>(), any::<u32>())
            .prop_map(|(port, size, value)| EventKind::PioRead { port, size, value }),
        (any::<u64>(), any::<u8>(), any::<u64>())
            .prop_map(|(addr, size, value)| EventKind::MmioRead { addr, size, value }),
        (any::<u32>(), any::<bool>()).prop_map(|(gsi, level)| EventKind::Interrupt { gsi, level }),
        (any::<u16>(), blob()).prop_map(|(device, data)| EventKind::DeviceInput { device, data }),
        (any::<u8>(), any::<u64>()).prop_map(|(source, value)| EventKind::Clock { source, value }),
        blob().prop_map(|data| EventKind::Entropy { data }),
    ]
}

fn record() -> impl Strategy<Value = Record> {
    prop_oneof![
        (
            any::<u8>(),
            any::<u8>(),
            any::<bool>(),
            any::<u8>(),
            any::<u64>(),
            any::<[u8; 16]>()
        )
            .prop_map(
                |(min_version, max_version, p, vcpus, mem_mib, vm_id)| Record::Hello(Hello {
                    min_version,
                    max_version,
                    role: if p { Role::Primary } else { Role::Secondary },
                    vcpus,
                    mem_mib,
                    vm_id
                })
            ),
        any::<u8>().prop_map(|vcpus| Record::EpochBegin { vcpus }),
        (any::<u8>(), any::<u32>(), event_kind())
            .prop_map(|(vcpu, seq, kind)| Record::Event(Event { vcpu, seq, kind })),
        proptest::collection::vec(page_entry(), 0..8).prop_map(Record::Pages),
        (any::<u8>(), blob()).prop_map(|(vcpu, state)| Record::VcpuState { vcpu, state }),
        (any::<u16>(), blob()).prop_map(|(device, state)| Record::DeviceState { device, state }),
        (any::<u8>(), 0u64..1 << 62, blob()).prop_map(|(stream, offset, data)| Record::Output {
            stream,
            offset,
            data
        }),
        (
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            proptest::collection::vec((any::<u8>(), any::<u64>()), 0..4)
        )
            .prop_map(
                |(pages, events, page_hash, outputs)| Record::EpochEnd(EpochEnd {
                    pages,
                    events,
                    page_hash,
                    outputs
                })
            ),
        Just(Record::Ack),
        (any::<u64>(), any::<u64>()).prop_map(|(seq, sent_us)| Record::Heartbeat { seq, sent_us }),
        any::<u8>().prop_map(|code| Record::Shutdown { code }),
        any::<bool>().prop_map(|off| Record::Stop { off }),
        any::<u64>().prop_map(|session| Record::Session { session }),
        (0u64..1 << 40, 1usize..4).prop_map(|(sector, n)| Record::DiskWrite {
            offset: sector * 512,
            data: bytes::Bytes::from(vec![sector as u8; n * 512]),
        }),
    ]
}

/// Decodes every frame in `buf` into records; stops at the first error or torn tail.
fn drain(buf: &mut BytesMut) -> (Vec<(u64, Record)>, Option<ft_log::Error>) {
    let mut d = Decoder::new();
    let mut out = Vec::new();
    loop {
        match d.decode(buf) {
            Ok(Some(f)) => match Record::decode(&f) {
                Ok(r) => out.push(r),
                Err(e) => return (out, Some(e)),
            },
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

fn stream(records: &[(u64, Record)]) -> BytesMut {
    let mut b = BytesMut::new();
    for (epoch, r) in records {
        r.encode(*epoch, &mut b);
    }
    b
}

proptest! {
    #[test]
    fn records_round_trip(records in proptest::collection::vec((any::<u64>(), record()), 1..12)) {
        let mut b = stream(&records);
        let (got, err) = drain(&mut b);
        prop_assert!(err.is_none(), "{err:?}");
        prop_assert_eq!(got, records);
        prop_assert!(b.is_empty());
    }

    #[test]
    fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let mut b = BytesMut::from(&bytes[..]);
        let _ = drain(&mut b);
    }

    #[test]
    fn any_bytes_after_a_valid_header_never_panic(kind in any::<u8>(), epoch in any::<u64>(),
                                                  payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
        // A correct frame around arbitrary payload reaches every record parser.
        let mut b = BytesMut::new();
        ft_log::frame::encode(kind, epoch, &payload, &mut b);
        let _ = drain(&mut b);
    }

    #[test]
    fn mutated_streams_are_refused_or_decoded_without_panic(
        records in proptest::collection::vec((any::<u64>(), record()), 1..6),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..6),
        fix_crc in any::<bool>(),
    ) {
        let mut b = stream(&records);
        let len = b.len();
        for (i, x) in &flips {
            b[i.index(len)] ^= x;
        }
        if fix_crc {
            // Re-seal every frame so the payload parsers, not the CRC, see the damage.
            let mut off = 0;
            while off + ft_log::frame::HEADER_LEN <= b.len() {
                let plen = u32::from_le_bytes(b[off + 8..off + 12].try_into().unwrap()) as usize;
                let end = off + ft_log::frame::HEADER_LEN + plen;
                if plen > ft_log::MAX_PAYLOAD as usize || end + 4 > b.len() {
                    break;
                }
                let crc = crc32c::crc32c(&b[off..end]);
                b[end..end + 4].copy_from_slice(&crc.to_le_bytes());
                off = end + 4;
            }
            let _ = drain(&mut b);
        } else {
            let (got, err) = drain(&mut b);
            // Without a re-sealed CRC a flip is caught; at most a torn tail hides it.
            prop_assert!(err.is_some() || got.len() < records.len(), "damage went unnoticed");
        }
    }

    #[test]
    fn pages_encode_decode_apply_reproduce_the_page(
        old in proptest::collection::vec(any::<u8>(), PAGE_SIZE),
        edits in proptest::collection::vec((0usize..PAGE_SIZE, any::<u8>()), 0..64),
        zero in any::<bool>(),
    ) {
        let mut new = if zero { vec![0u8; PAGE_SIZE] } else { old.clone() };
        for (i, v) in edits {
            new[i] = v;
        }
        let e = encode_page(0x7000, &new, Some(&old));
        let mut b = BytesMut::new();
        let frames = encode_pages(std::slice::from_ref(&e), 5, &mut b);
        prop_assert_eq!(frames, 1);
        let (got, err) = drain(&mut b);
        prop_assert!(err.is_none());
        let Record::Pages(entries) = &got[0].1 else { panic!("not pages") };
        let mut target = old.clone();
        entries[0].apply(&mut target).unwrap();
        prop_assert_eq!(target, new);
    }

    #[test]
    fn hostile_page_deltas_never_panic_or_write(delta in proptest::collection::vec(any::<u8>(), 1..600)) {
        let e = PageEntry { gpa: 0, data: PageData::XorLz4(Bytes::from(delta)) };
        let mut p = vec![7u8; PAGE_SIZE];
        if e.apply(&mut p).is_err() {
            prop_assert_eq!(p, vec![7u8; PAGE_SIZE]);
        }
    }
}

#[test]
fn large_page_batches_split_into_frames_under_the_limit() {
    let entries: Vec<PageEntry> = (0..3000u64)
        .map(|i| PageEntry {
            gpa: i * 4096,
            data: PageData::Raw(Bytes::from(vec![1u8; PAGE_SIZE])),
        })
        .collect();
    let mut b = BytesMut::new();
    let frames = encode_pages(&entries, 1, &mut b);
    assert!(frames >= 3, "{frames} frames for ~12 MiB");
    let (got, err) = drain(&mut b);
    assert!(err.is_none());
    let n: usize = got
        .iter()
        .map(|(_, r)| if let Record::Pages(p) = r { p.len() } else { 0 })
        .sum();
    assert_eq!(n, 3000);
}
