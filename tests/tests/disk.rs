//! virtio-blk end to end: the `journal` guest on a real disk image, real KVM.
use ftvm_tests::journal::{acked, verify};
use ftvm_tests::{assert_clear_error, ftvm, require_kvm, TempDir};

fn disk(dir: &TempDir, name: &str, bytes: usize) -> String {
    let p = dir.path(name);
    std::fs::write(&p, vec![0u8; bytes]).unwrap();
    p.display().to_string()
}

fn console(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn journal_appends_acknowledged_records_and_continues_after_a_restart() {
    require_kvm!();
    let dir = TempDir::new("disk-journal");
    let d = disk(&dir, "d.img", 1 << 20);
    let run = |count: &str| {
        let o = ftvm(&[
            "run",
            "--guest",
            "journal",
            "--disk",
            &d,
            "--cmdline",
            &format!("count={count}"),
        ]);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}{}",
            console(&o),
            String::from_utf8_lossy(&o.stderr)
        );
        console(&o)
    };
    let first = run("40");
    assert!(
        first.contains("found 0 records on a disk of 2048 sectors"),
        "{first}"
    );
    assert_eq!(acked(&first), (1..=40).collect::<Vec<_>>());
    assert!(first.ends_with("journal: last=40\n"), "{first}");
    assert_eq!(verify(&std::fs::read(&d).unwrap()), 40);
    // A new VM on the same disk finds the log and continues it.
    let second = run("25");
    assert!(second.contains("found 40 records"), "{second}");
    assert_eq!(acked(&second), (41..=65).collect::<Vec<_>>());
    assert_eq!(verify(&std::fs::read(&d).unwrap()), 65);
}

#[test]
fn journal_saved_mid_run_continues_on_its_disk_after_restore() {
    require_kvm!();
    let dir = TempDir::new("disk-restore");
    let d = disk(&dir, "d.img", 1 << 20);
    let out = dir.path("out.txt").display().to_string();
    let st = dir.path("vm.state").display().to_string();
    let o = ftvm(&[
        "run",
        "--guest",
        "journal",
        "--disk",
        &d,
        "--cmdline",
        "count=300 rate=200",
        "--serial-out",
        &out,
        "--save-after-ms",
        "700",
        "--save",
        &st,
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = ftvm(&["run", "--restore", &st]);
    assert_clear_error(&o, "the saved VM has a disk: give it again with --disk");
    let o = ftvm(&["run", "--restore", &st, "--disk", &d, "--serial-out", &out]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(acked(&text), (1..=300).collect::<Vec<_>>(), "{text}");
    assert_eq!(verify(&std::fs::read(&d).unwrap()), 300);
}

#[test]
fn bad_disks_are_clear_errors() {
    require_kvm!();
    let dir = TempDir::new("disk-bad");
    let odd = disk(&dir, "odd.img", 1000);
    let o = ftvm(&["run", "--guest", "journal", "--disk", &odd]);
    assert_clear_error(&o, "a non-zero multiple of 512");
    let o = ftvm(&["run", "--guest", "journal", "--disk", "/nonexistent/d.img"]);
    assert_clear_error(&o, "cannot open --disk /nonexistent/d.img");
    // Without a disk the guest finds no device and says so.
    let o = ftvm(&["run", "--guest", "journal"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        console(&o).contains("journal: no disk: NoDevice"),
        "{}",
        console(&o)
    );
}
