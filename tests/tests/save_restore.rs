//! Save at random moments, restore in a fresh process: the guest continues exactly.
use ftvm_tests::{counter_output, ftvm, require_kvm, Rng, TempDir};

const N: u64 = 400;
const RATE: u64 = 400; // one second of output

/// One save at `ms` then restore; returns the concatenated serial output.
fn save_then_restore(
    dir: &TempDir,
    guest: &str,
    vcpus: &str,
    cmdline: &str,
    ms: u64,
) -> (String, bool) {
    let serial = dir.path("serial");
    let state = dir.path("state");
    let _ = std::fs::remove_file(&serial);
    let _ = std::fs::remove_file(&state);
    let s = serial.to_str().unwrap();
    let out = ftvm(&[
        "run",
        "--guest",
        guest,
        "--vcpus",
        vcpus,
        "--cmdline",
        cmdline,
        "--serial-out",
        s,
        "--save-after-ms",
        &ms.to_string(),
        "--save",
        state.to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "save run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let saved = state.exists();
    if saved {
        let out = ftvm(&[
            "run",
            "--restore",
            state.to_str().unwrap(),
            "--serial-out",
            s,
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "restore run: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (std::fs::read_to_string(&serial).unwrap(), saved)
}

#[test]
fn counter_saved_at_20_random_moments_continues_exactly_once_each() {
    require_kvm!();
    let mut rng = Rng::from_env("counter_save_restore");
    let dir = TempDir::new("save-restore-counter");
    let cmdline = format!("count={N} rate={RATE}");
    let mut saved = 0;
    for round in 0..20 {
        let ms = rng.range(20, 950);
        let (out, was_saved) = save_then_restore(&dir, "counter", "1", &cmdline, ms);
        assert_eq!(out, counter_output(N), "round {round}: saved at {ms} ms");
        saved += was_saved as u32;
    }
    assert!(
        saved >= 15,
        "only {saved} of 20 runs were still going when saved"
    );
}

#[test]
fn dirtier_checksum_after_restore_equals_uninterrupted_run() {
    require_kvm!();
    let mut rng = Rng::from_env("dirtier_save_restore");
    let dir = TempDir::new("save-restore-dirtier");
    let cmdline = "mib=16 pages_per_sec=3000 secs=1";
    let plain = ftvm(&["run", "--guest", "dirtier", "--cmdline", cmdline]);
    assert_eq!(plain.status.code(), Some(0));
    let expected = String::from_utf8_lossy(&plain.stdout).to_string();
    assert!(expected.contains("checksum="));
    for _ in 0..3 {
        let ms = rng.range(100, 900);
        let (out, saved) = save_then_restore(&dir, "dirtier", "1", cmdline, ms);
        assert!(saved, "dirtier ended before {ms} ms");
        assert_eq!(out, expected, "saved at {ms} ms");
    }
}

#[test]
fn smp_guest_saved_mid_run_finishes_on_every_vcpu() {
    require_kvm!();
    let mut rng = Rng::from_env("smp_save_restore");
    let dir = TempDir::new("save-restore-smp");
    for _ in 0..3 {
        let ms = rng.range(50, 400);
        let (out, _) = save_then_restore(&dir, "smp", "4", "work=300000000", ms);
        for i in 0..4 {
            let n = out
                .lines()
                .filter(|l| l.starts_with(&format!("vcpu {i} ok")))
                .count();
            assert_eq!(
                n, 1,
                "vcpu {i} reported {n} times (saved at {ms} ms): {out}"
            );
        }
        assert!(out.contains("smp: all 4 cpus ok"), "{out}");
    }
}
