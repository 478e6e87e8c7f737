//! Bad input to `ftvm run`: one clear error line and a non-zero exit, never a panic.
use ftvm_tests::{assert_clear_error, ftvm, require_kvm, TempDir};

#[test]
fn nine_vcpus_are_refused_naming_the_limit_of_8() {
    let out = ftvm(&["run", "--guest", "counter", "--vcpus", "9"]);
    assert_clear_error(&out, "1 to 8 vCPUs");
}

#[test]
fn zero_vcpus_are_refused() {
    let out = ftvm(&["run", "--guest", "counter", "--vcpus", "0"]);
    assert_clear_error(&out, "0 vCPUs requested");
}

#[test]
fn too_little_memory_is_refused() {
    let out = ftvm(&["run", "--guest", "counter", "--mem-mib", "4"]);
    assert_clear_error(&out, "too small (minimum 16 MiB)");
}

#[test]
fn missing_kernel_is_refused() {
    let out = ftvm(&["run", "--kernel", "/nonexistent/vmlinuz"]);
    assert_clear_error(&out, "cannot read kernel /nonexistent/vmlinuz");
}

#[test]
fn garbage_kernel_is_refused() {
    require_kvm!();
    let dir = TempDir::new("garbage-kernel");
    let k = dir.path("garbage");
    std::fs::write(&k, vec![0x5au8; 8192]).unwrap();
    let out = ftvm(&["run", "--kernel", k.to_str().unwrap()]);
    assert_clear_error(&out, "neither an ELF nor a Linux bzImage");
}

#[test]
fn elf_without_pvh_note_is_refused() {
    require_kvm!();
    // Any ordinary host executable is an ELF without a PVH note.
    let out = ftvm(&["run", "--kernel", "/bin/true"]);
    assert_clear_error(&out, "cannot create the VM");
}

#[test]
fn unknown_guest_is_refused_with_the_list() {
    let out = ftvm(&["run", "--guest", "nosuch"]);
    assert_clear_error(&out, "built-in guests: counter");
}

#[test]
fn missing_state_file_is_refused() {
    let out = ftvm(&["run", "--restore", "/nonexistent/state"]);
    assert_clear_error(&out, "cannot open state file /nonexistent/state");
}

#[test]
fn garbage_state_file_is_refused() {
    let dir = TempDir::new("garbage-state");
    let s = dir.path("state");
    std::fs::write(&s, b"this is not a state file at all, just text").unwrap();
    let out = ftvm(&["run", "--restore", s.to_str().unwrap()]);
    assert_clear_error(&out, "not an ftvm state file");
}

/// Saves a real state file to corrupt.
fn saved_state(dir: &TempDir) -> std::path::PathBuf {
    let s = dir.path("state");
    let out = ftvm(&[
        "run",
        "--guest",
        "counter",
        "--cmdline",
        "count=100000 rate=1000",
        "--serial-out",
        dir.path("serial").to_str().unwrap(),
        "--save-after-ms",
        "100",
        "--save",
        s.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s
}

#[test]
fn bit_flipped_state_file_is_refused() {
    require_kvm!();
    let dir = TempDir::new("flip-state");
    let s = saved_state(&dir);
    let mut bytes = std::fs::read(&s).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&s, &bytes).unwrap();
    let out = ftvm(&["run", "--restore", s.to_str().unwrap()]);
    assert_clear_error(&out, "checksum mismatch");
}

#[test]
fn truncated_state_file_is_refused() {
    require_kvm!();
    let dir = TempDir::new("trunc-state");
    let s = saved_state(&dir);
    let bytes = std::fs::read(&s).unwrap();
    std::fs::write(&s, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let out = ftvm(&["run", "--restore", s.to_str().unwrap()]);
    assert_clear_error(&out, "state file is corrupt");
}

/// A saved state whose header claims format `major` is refused with `needle`.
fn state_of_major_version_is_refused(tag: &str, major: u16, needle: &str) {
    let dir = TempDir::new(tag);
    let s = saved_state(&dir);
    let mut bytes = std::fs::read(&s).unwrap();
    bytes[8..10].copy_from_slice(&major.to_le_bytes());
    std::fs::write(&s, &bytes).unwrap();
    let out = ftvm(&["run", "--restore", s.to_str().unwrap()]);
    assert_clear_error(&out, needle);
}

#[test]
fn newer_major_version_state_file_is_refused() {
    require_kvm!();
    let newer = vmm::persist::VERSION_MAJOR + 1;
    state_of_major_version_is_refused("newer-state", newer, "newer than this ftvm understands");
}

#[test]
fn older_major_version_state_file_is_refused() {
    require_kvm!();
    let older = vmm::persist::VERSION_MAJOR - 1;
    state_of_major_version_is_refused("older-state", older, "was written by an older ftvm");
}

#[test]
fn save_without_delay_is_a_usage_error() {
    let out = ftvm(&["run", "--guest", "counter", "--save", "/tmp/x"]);
    assert_clear_error(&out, "--save-after-ms");
}

#[test]
fn bad_network_options_are_refused_clearly() {
    let out = ftvm(&[
        "run",
        "--guest",
        "netserve",
        "--tap",
        "t0",
        "--mac",
        "01:00:5e:00:00:01",
    ]);
    assert_clear_error(&out, "multicast");
    let out = ftvm(&[
        "run", "--guest", "netserve", "--tap", "t0", "--mac", "02:00:00",
    ]);
    assert_clear_error(&out, "is not a MAC address");
    let out = ftvm(&["run", "--guest", "netserve", "--mac", "02:00:00:00:00:01"]);
    assert_clear_error(&out, "--tap");
    require_kvm!();
    let out = ftvm(&["run", "--guest", "netserve", "--tap", "a/b"]);
    assert_clear_error(&out, "tap name");
    let out = ftvm(&["run", "--guest", "netserve", "--tap", "lo"]);
    assert_clear_error(&out, "is not a tap device");
}

#[test]
fn run_without_a_boot_image_is_a_usage_error() {
    for args in [&["run"][..], &["primary", "--datastore", "/tmp/x"][..]] {
        let out = ftvm(args);
        assert_clear_error(&out, "give --guest NAME or --kernel PATH");
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: a usage error exits 2"
        );
    }
}

#[test]
fn ctl_on_a_mistyped_datastore_creates_nothing() {
    let dir = TempDir::new("ctl-typo");
    let typo = dir.path("no-such-ds");
    let out = ftvm(&[
        "ctl",
        "--datastore",
        typo.to_str().unwrap(),
        "test-failover",
    ]);
    assert_clear_error(&out, "no datastore at");
    assert!(!typo.exists(), "ctl created {}", typo.display());
}

#[test]
fn host_agent_refuses_an_ip_that_is_not_one() {
    let out = ftvm(&["host-agent", "--name", "h1", "--ip", "not-an-ip"]);
    assert_clear_error(&out, "--ip");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn vm_create_checks_the_boot_image_and_vcpus_before_asking_the_coordinator() {
    // Nothing listens on port 1: each refusal must come before any connection.
    let c = ["--coordinator", "127.0.0.1:1"];
    let out = ftvm(&[&["vm", "create", "k", "--kernel", "/no/such/file"][..], &c].concat());
    assert_clear_error(&out, "cannot read kernel /no/such/file");
    let out = ftvm(&[&["vm", "create", "g", "--guest", "nosuch"][..], &c].concat());
    assert_clear_error(&out, "built-in guests: counter");
    let out = ftvm(
        &[
            &["vm", "create", "v", "--guest", "counter", "--vcpus", "300"][..],
            &c,
        ]
        .concat(),
    );
    assert_clear_error(&out, "1 to 8 vCPUs");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("255"));
    let out = ftvm(&[&["vm", "create", "n"][..], &c].concat());
    assert_clear_error(&out, "give --guest NAME or --kernel PATH");
}
