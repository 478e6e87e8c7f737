//! Model-based property test of the standby: random epochs, some damaged; the standby must
//! always equal the image after the last intact epoch, and a damaged epoch must be refused.
use bytes::Bytes;
use ft_core::Standby;
use ft_log::page::encode_page;
use ft_log::record::{EpochEnd, EpochHasher};
use ft_log::{PageData, PageEntry, Record, PAGE_SIZE};
use proptest::prelude::*;
use std::collections::BTreeMap;
use vm_memory::{Bytes as _, GuestAddress};

const PAGES: u64 = 64; // pages the simulated guest touches (of a 16 MiB standby)

#[derive(Debug, Clone, Copy)]
enum Damage {
    None,
    DropPages,
    BadHash,
    Torn,
    OutputGap,
    OutOfRange,
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        6 => Just(Damage::None),
        1 => Just(Damage::DropPages),
        1 => Just(Damage::BadHash),
        1 => Just(Damage::Torn),
        1 => Just(Damage::OutputGap),
        1 => Just(Damage::OutOfRange),
    ]
}

/// One epoch's writes: (page index, byte offset, value) and output text.
fn epoch() -> impl Strategy<Value = (Vec<(u64, usize, u8)>, bool, String, Damage)> {
    (
        proptest::collection::vec((0..PAGES, 0..PAGE_SIZE, any::<u8>()), 1..20),
        any::<bool>(),
        "[a-z0-9\n]{0,20}",
        damage(),
    )
}

fn page_of(model: &BTreeMap<u64, Vec<u8>>, p: u64) -> Vec<u8> {
    model
        .get(&p)
        .cloned()
        .unwrap_or_else(|| vec![0u8; PAGE_SIZE])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn standby_always_equals_last_intact_epoch(epochs in proptest::collection::vec(epoch(), 1..12)) {
        let mut sec = Standby::new(vmm::memory::create(16).unwrap());
        let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        let mut out_end = 0u64;
        let mut next = 0u64;
        for (writes, zero_one, text, dmg) in epochs {
            // A secondary's first epoch legitimately sets where each output stream starts (it
            // may join a VM that already printed), so an offset "gap" is only damage later on.
            let dmg = if next == 0 && matches!(dmg, Damage::OutputGap) { Damage::None } else { dmg };
            // The primary's view after this epoch.
            let mut new_model = model.clone();
            for (p, off, v) in &writes {
                new_model.entry(*p).or_insert_with(|| vec![0u8; PAGE_SIZE])[*off] = *v;
            }
            if zero_one {
                new_model.insert(writes[0].0, vec![0u8; PAGE_SIZE]);
            }
            let dirty: Vec<u64> = writes.iter().map(|w| w.0).collect::<std::collections::BTreeSet<_>>().into_iter().collect();
            let mut entries = Vec::new();
            let mut hasher = EpochHasher::new();
            for p in &dirty {
                let new = page_of(&new_model, *p);
                let old = page_of(&model, *p);
                entries.push(encode_page(p * 4096, &new, Some(&old)));
                hasher.add(p * 4096, &new);
            }
            let mut page_hash = hasher.finish();
            let mut out_off = out_end;
            match dmg {
                Damage::DropPages => { entries.pop(); }
                Damage::BadHash => page_hash ^= 1,
                Damage::OutputGap => out_off += 1,
                Damage::OutOfRange => entries.push(PageEntry { gpa: 1 << 40, data: PageData::Zero }),
                Damage::None | Damage::Torn => {}
            }
            let pages = if matches!(dmg, Damage::DropPages) { dirty.len() } else { entries.len() } as u32;
            let end = EpochEnd { pages, events: 0, page_hash, outputs: vec![(0, out_end + text.len() as u64)] };
            let mut results = vec![
                sec.on_record(next, Record::EpochBegin { vcpus: 1 }),
                sec.on_record(next, if next == 0 { Record::Session { session: 1 } } else { Record::Heartbeat { seq: 0, sent_us: 0 } }),
                sec.on_record(next, Record::Pages(entries)),
                sec.on_record(next, Record::VcpuState { vcpu: 0, state: Bytes::from(format!("regs@{next}")) }),
                sec.on_record(next, Record::Output { stream: 0, offset: out_off, data: Bytes::from(text.clone()) }),
            ];
            if !matches!(dmg, Damage::Torn) {
                results.push(sec.on_record(next, Record::EpochEnd(end)));
            }
            let good = matches!(dmg, Damage::None);
            if good {
                prop_assert_eq!(results.last().unwrap(), &Ok(Some(next)));
                model = new_model;
                out_end += text.len() as u64;
                prop_assert_eq!(sec.committed_epoch(), Some(next));
                next += 1;
            } else if !matches!(dmg, Damage::Torn) {
                prop_assert!(results.last().unwrap().is_err(), "damaged epoch {:?} was acked", dmg);
            }
            // The standby equals the model of the last intact epoch, page for page.
            for p in 0..PAGES {
                let mut got = vec![0u8; PAGE_SIZE];
                sec.memory().read_slice(&mut got, GuestAddress(p * 4096)).unwrap();
                prop_assert_eq!(&got, &page_of(&model, p), "page {} after {:?}", p, dmg);
            }
            prop_assert_eq!(sec.output().end(0), out_end);
            if next > 0 {
                let want = Bytes::from(format!("regs@{}", next - 1));
                prop_assert_eq!(sec.state().vcpus.get(&0), Some(&want));
            }
        }
    }
}

#[test]
fn epoch_out_of_order_is_a_protocol_error() {
    let mut sec = Standby::new(vmm::memory::create(16).unwrap());
    assert!(sec.on_record(5, Record::EpochBegin { vcpus: 1 }).is_err());
    assert!(sec
        .on_record(
            0,
            Record::EpochEnd(EpochEnd {
                pages: 0,
                events: 0,
                page_hash: 0,
                outputs: vec![]
            })
        )
        .is_err());
    assert_eq!(sec.committed_epoch(), None);
}
