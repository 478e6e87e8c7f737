//! The Linux/x86 boot protocol path on the real KVM.
//!
//! A Linux kernel cannot boot in useful time on this project's PVM development host (its kernel
//! code is emulated, see DESIGN.md), so this uses a **synthetic bzImage**: a valid setup header
//! whose protected-mode payload, at the 64-bit entry (`load address + 0x200`), checks that it
//! runs in 64-bit mode with `RSI` pointing at `boot_params` carrying the "HdrS" header, then
//! writes exit code 42 (99 if a check fails). It proves the vCPU reaches the kernel's 64-bit
//! entry with the state the boot protocol promises.
use ftvm_tests::{ftvm, require_kvm, TempDir};

/// x86-64 machine code (assembled from the listing in the comments).
const ENTRY64: &[u8] = &[
    0x48, 0xb8, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22,
    0x11, // movabs $0x1122334455667788, %rax
    0x48, 0xc1, 0xe8, 0x20, //                                     shr $32, %rax
    0x3d, 0x44, 0x33, 0x22, 0x11, //                               cmp $0x11223344, %eax
    0x75, 0x16, //                                                 jne fail
    0x81, 0xbe, 0x02, 0x02, 0x00, 0x00, 0x48, 0x64, 0x72, 0x53, // cmpl $"HdrS", 0x202(%rsi)
    0x75, 0x0a, //                                                 jne fail
    0x66, 0xba, 0x01, 0x05, 0xb0, 0x2a, 0xee, //                   out 42 -> 0x501
    0xf4, 0xeb, 0xfd, //                                           1: hlt; jmp 1b
    0x66, 0xba, 0x01, 0x05, 0xb0, 0x63, 0xee, //                   fail: out 99 -> 0x501
    0xf4, 0xeb, 0xfd, //                                           2: hlt; jmp 2b
];

#[test]
fn bzimage_reaches_64bit_entry_with_boot_params_in_rsi() {
    require_kvm!();
    let dir = TempDir::new("bzimage");
    let k = dir.path("bzImage");
    std::fs::write(&k, vmm::boot::synthetic_bzimage(ENTRY64)).unwrap();
    let rd = dir.path("initrd");
    std::fs::write(&rd, vec![0xabu8; 64 << 10]).unwrap();
    let out = ftvm(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        rd.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0",
        "--vcpus",
        "2",
    ]);
    assert_eq!(
        out.status.code(),
        Some(42),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A real Linux kernel: Debian's `linux-image-*-amd64` bzImage (fetched by
/// `scripts/test.sh` into `FTVM_LINUX_KERNEL`). It cannot boot in useful time on a PVM host,
/// but after two seconds from its 64-bit entry the vCPU must still be in long mode, running
/// kernel code elsewhere in guest RAM, with no triple fault or KVM error.
#[test]
fn debian_kernel_runs_from_its_64bit_entry() {
    require_kvm!();
    let path = std::env::var_os("FTVM_LINUX_KERNEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "FTVM_LINUX_KERNEL is not set: scripts/test.sh fetches Debian's kernel and sets it"
            )
        });
    let image = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let src = vmm::BootSource::Kernel {
        image,
        initrd: None,
        cmdline: "console=ttyS0 earlyprintk=ttyS0".into(),
    };
    let cfg = vmm::VmConfig {
        vcpus: 1,
        mem_mib: 256,
        dirty: vmm::DirtyTracking::Off,
    };
    let mut vm =
        vmm::Vmm::boot(&cfg, &src, Box::new(std::io::sink())).expect("boot the Debian kernel");
    let entry = vmm::layout::HIMEM_START + 0x200;
    vm.resume().unwrap();
    let ev = vm.wait_event(Some(std::time::Duration::from_secs(2)));
    assert_eq!(ev, None, "the kernel stopped: {ev:?}");
    let st = vm.capture().unwrap();
    let v = &st.vcpus[0];
    let (rip, efer, cs_l) = (v.regs.rip, v.sregs.efer, v.sregs.cs.l);
    assert_ne!(efer & (1 << 10), 0, "left long mode (EFER {efer:#x})");
    assert_eq!(cs_l, 1, "not in a 64-bit code segment");
    assert_ne!(rip, entry, "never left the entry point");
    assert!(
        (vmm::layout::HIMEM_START..256 << 20).contains(&rip),
        "RIP {rip:#x} outside guest RAM"
    );
    vm.stop();
}
