//! Micro-benchmarks (criterion): the FT log's codec, the page delta + LZ4 encoding, and the
//! dirty-log harvest against guest size. `cargo bench -p ftvm-benches --bench micro`; the
//! numbers in the README come from its output (throughput lines).
use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ft_log::frame::Decoder;
use ft_log::page::{encode_page, PageData, PageEntry};
use ft_log::record::{encode_pages, Record};
use std::hint::black_box;
use vmm::{BootSource, DirtyTracking, VmConfig, Vmm};

const PAGE: usize = 4096;
const BATCH: usize = 1024;

/// Pages that look like a compiler's heap: varied bytes, not compressible to nothing.
fn pages(n: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            (0..PAGE)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        })
        .collect()
}

fn raw_entries(ps: &[Vec<u8>]) -> Vec<PageEntry> {
    ps.iter()
        .enumerate()
        .map(|(i, p)| PageEntry {
            gpa: (i * PAGE) as u64,
            data: PageData::Raw(Bytes::copy_from_slice(p)),
        })
        .collect()
}

fn ft_log_codec(c: &mut Criterion) {
    let ps = pages(BATCH, 7);
    let entries = raw_entries(&ps);
    let mut g = c.benchmark_group("ft-log");
    g.throughput(Throughput::Bytes((BATCH * PAGE) as u64));
    g.bench_function("encode 1024 raw pages", |b| {
        let mut out = BytesMut::with_capacity(BATCH * (PAGE + 64));
        b.iter(|| {
            out.clear();
            black_box(encode_pages(black_box(&entries), 1, &mut out));
        })
    });
    let mut wire = BytesMut::new();
    encode_pages(&entries, 1, &mut wire);
    let wire = wire.freeze();
    g.bench_function("decode 1024 raw pages (CRC32C, zero-copy)", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&wire[..]);
            let mut d = Decoder::new();
            let mut n = 0;
            while let Some(f) = d.decode(&mut buf).unwrap() {
                if let (_, Record::Pages(e)) = Record::decode(&f).unwrap() {
                    n += e.len();
                }
            }
            assert_eq!(n, BATCH);
        })
    });
    g.finish();
}

fn page_encoding(c: &mut Criterion) {
    let old = pages(1, 11).remove(0);
    let mut g = c.benchmark_group("page");
    g.throughput(Throughput::Bytes(PAGE as u64));
    // A typical dirty page: a few words changed since the secondary's copy.
    let mut new = old.clone();
    for i in (0..PAGE).step_by(512) {
        new[i] ^= 0xff;
    }
    g.bench_function("xor+lz4 encode (8 bytes changed)", |b| {
        b.iter(|| black_box(encode_page(0, black_box(&new), Some(&old))))
    });
    let e = encode_page(0, &new, Some(&old));
    assert!(matches!(e.data, PageData::XorLz4(_)));
    g.bench_function("xor+lz4 apply (8 bytes changed)", |b| {
        let mut p = old.clone();
        b.iter(|| {
            p.copy_from_slice(&old);
            e.apply(black_box(&mut p)).unwrap();
        })
    });
    // Worst case: a page with nothing in common with the old copy falls back to raw.
    let other = pages(1, 99).remove(0);
    g.bench_function(
        "xor+lz4 encode (all bytes changed, falls back to raw)",
        |b| b.iter(|| black_box(encode_page(0, black_box(&other), Some(&old)))),
    );
    g.finish();
}

/// KVM dirty-bitmap harvest (GET + CLEAR) of a paused guest, against guest size: the fixed
/// part of every epoch's pause. Needs /dev/kvm.
fn dirty_harvest(c: &mut Criterion) {
    let mut g = c.benchmark_group("dirty harvest");
    g.sample_size(30);
    for mib in [64u64, 256, 1024, 4096] {
        let cfg = VmConfig {
            vcpus: 1,
            mem_mib: mib,
            dirty: DirtyTracking::Bitmap,
        };
        let src = BootSource::Kernel {
            image: guests::by_name("counter").unwrap().elf.to_vec(),
            initrd: None,
            cmdline: "count=1000000000 rate=0".into(),
        };
        let mut vm = Vmm::boot(&cfg, &src, Box::new(std::io::sink()))
            .expect("a VM for the harvest benchmark (needs /dev/kvm)");
        vm.resume().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        vm.pause().unwrap();
        g.bench_with_input(
            BenchmarkId::new("bitmap", format!("{mib} MiB")),
            &mib,
            |b, _| b.iter(|| black_box(vm.dirty_pages().unwrap())),
        );
        vm.stop();
    }
    g.finish();
}

criterion_group!(benches, ft_log_codec, page_encoding, dirty_harvest);
criterion_main!(benches);
