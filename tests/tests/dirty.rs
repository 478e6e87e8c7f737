//! Dirty tracking on the real KVM: the API reports exactly the pages the guest wrote, plus the
//! pages the VMM itself wrote (which it names separately).
use ftvm_tests::require_kvm;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::{BootSource, DirtyTracking, VmConfig, VmEvent, Vmm};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn wait_for(c: &Capture, text: &str) {
    let t = Instant::now();
    while !String::from_utf8_lossy(&c.0.lock().unwrap()).contains(text) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "guest never printed {text:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn known_guest_page_set_is_reported_exactly_with_the_bitmap() {
    require_kvm!();
    known_page_set(DirtyTracking::Bitmap);
}

#[test]
fn known_guest_page_set_is_reported_exactly_with_the_dirty_ring() {
    require_kvm!();
    known_page_set(DirtyTracking::Ring);
}

fn known_page_set(dirty: DirtyTracking) {
    let (base_mib, count, stride) = (32u64, 64u64, 3u64);
    let elf = guests::by_name("pages").unwrap().elf.to_vec();
    let src = BootSource::Kernel {
        image: elf,
        initrd: None,
        cmdline: format!("base={base_mib} count={count} stride={stride}"),
    };
    let cfg = VmConfig {
        vcpus: 1,
        mem_mib: 64,
        dirty,
    };
    let serial = Capture::default();
    let mut vm = Vmm::boot(&cfg, &src, Box::new(serial.clone())).expect("boot");
    vm.resume().unwrap();
    wait_for(&serial, "ready\n");
    // The guest is now spinning in registers on the flag word.
    std::thread::sleep(Duration::from_millis(200));
    vm.pause().unwrap();
    let before = vm.dirty_pages().unwrap();
    assert!(
        !before.guest.is_empty(),
        "booting dirtied nothing? dirty log not working"
    );
    let flag = (base_mib << 20) - 4096;
    vmm::memory::write_u64(vm.memory(), flag, 1).unwrap();
    vm.resume().unwrap();
    let ev = vm.wait_event(Some(Duration::from_secs(20)));
    assert_eq!(ev, Some(VmEvent::Exit(0)));
    let dirty = vm.dirty_pages().unwrap();
    let expected: Vec<u64> = (0..count)
        .map(|i| (base_mib << 20) + i * stride * 4096)
        .collect();
    assert_eq!(dirty.vmm, vec![flag], "the VMM wrote only the flag page");
    // Every page of the known set is reported; anything else KVM reports must be a page the
    // VMM named as its own write (on PVM, KVM's log also shows the page the VMM wrote).
    for p in &expected {
        assert!(
            dirty.guest.contains(p),
            "guest write to {p:#x} not reported"
        );
    }
    let extra: Vec<u64> = dirty
        .guest
        .iter()
        .copied()
        .filter(|p| !expected.contains(p))
        .collect();
    assert!(
        extra.iter().all(|p| dirty.vmm.contains(p)),
        "unexplained dirty pages {extra:x?}"
    );
    let mut all = expected.clone();
    all.push(flag);
    all.sort_unstable();
    assert_eq!(dirty.all(), all);
    // A second harvest starts from a clean log.
    let again = vm.dirty_pages().unwrap();
    assert!(
        again.guest.is_empty() && again.vmm.is_empty(),
        "log not cleared: {again:?}"
    );
    let _ = vm.finish(VmEvent::Exit(0));
}
