//! `ftvm run` with the built-in guests, on the real /dev/kvm.
use ftvm_tests::{counter_output, ftvm, require_kvm, TempDir};

#[test]
fn counter_prints_1_to_1000_and_exits_0() {
    require_kvm!();
    let out = ftvm(&[
        "run",
        "--guest",
        "counter",
        "--cmdline",
        "count=1000 rate=0",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), counter_output(1000));
}

#[test]
fn counter_appends_to_serial_out_file() {
    require_kvm!();
    let dir = TempDir::new("serial-out");
    let file = dir.path("serial.txt");
    let f = file.to_str().unwrap();
    let out = ftvm(&[
        "run",
        "--guest",
        "counter",
        "--cmdline",
        "count=50 rate=0",
        "--serial-out",
        f,
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stdout.is_empty(),
        "console went to stdout despite --serial-out"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), counter_output(50));
}

#[test]
fn counter_rate_paces_the_output() {
    require_kvm!();
    // 40 lines at 100 lines/s take at least 0.39 s of guest time.
    let t = std::time::Instant::now();
    let out = ftvm(&[
        "run",
        "--guest",
        "counter",
        "--cmdline",
        "count=40 rate=100",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), counter_output(40));
    assert!(
        t.elapsed().as_millis() >= 390,
        "40 lines at 100/s finished in {:?}",
        t.elapsed()
    );
}

fn smp_reports_every_vcpu(n: u32) {
    let out = ftvm(&["run", "--guest", "smp", "--vcpus", &n.to_string()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout} stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&format!("smp: {n} cpus")), "{stdout}");
    for i in 0..n {
        let lines = stdout
            .lines()
            .filter(|l| l.starts_with(&format!("vcpu {i} ok")))
            .count();
        assert_eq!(lines, 1, "vcpu {i} reported {lines} times: {stdout}");
    }
}

#[test]
fn smp_4_vcpus_all_report() {
    require_kvm!();
    smp_reports_every_vcpu(4);
}

#[test]
fn smp_8_vcpus_all_report() {
    require_kvm!();
    smp_reports_every_vcpu(8);
}

#[test]
fn smp_2_vcpus_all_report() {
    require_kvm!();
    smp_reports_every_vcpu(2);
}

#[test]
fn guest_exit_code_becomes_ftvm_exit_code() {
    require_kvm!();
    // The dirtier exits 2 for an unknown preset.
    let out = ftvm(&["run", "--guest", "dirtier", "--cmdline", "preset=nonsense"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("unknown preset"));
}

#[test]
fn dirtier_checksum_is_deterministic() {
    require_kvm!();
    let args = [
        "run",
        "--guest",
        "dirtier",
        "--cmdline",
        "mib=8 pages_per_sec=4000 secs=1",
    ];
    let a = ftvm(&args);
    let b = ftvm(&args);
    assert_eq!(a.status.code(), Some(0));
    let sa = String::from_utf8_lossy(&a.stdout);
    assert!(sa.contains("checksum="), "{sa}");
    assert_eq!(sa, String::from_utf8_lossy(&b.stdout));
}

#[test]
fn compile_profile_stand_in_runs_and_says_what_it_is() {
    require_kvm!();
    let out = ftvm(&[
        "run",
        "--guest",
        "dirtier",
        "--mem-mib",
        "96",
        "--cmdline",
        "preset=compile-profile jobs=10",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("stand-in for a kernel compile") && s.contains("checksum="),
        "{s}"
    );
}

#[test]
fn guests_subcommand_lists_builtin_guests() {
    let out = ftvm(&["guests"]);
    let s = String::from_utf8_lossy(&out.stdout);
    for g in ["counter", "dirtier", "smp"] {
        assert!(s.contains(g), "{s}");
    }
}
