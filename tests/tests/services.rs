//! ftvm as services: the systemd units in contrib/ pass `systemd-analyze verify` (no warning
//! either), the example settings files are accepted by the real binary, and a coordinator
//! started from a settings file takes the command line's options over the file's.
use ftvm_tests::cluster::free_loopback_addr;
use ftvm_tests::{ftvm_bin, TempDir};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn contrib(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../contrib")
        .join(name)
}

#[test]
fn systemd_units_verify_cleanly() {
    let dir = TempDir::new("units");
    let mut units = Vec::new();
    for u in ["ftvm-coordinator.service", "ftvm-host-agent.service"] {
        let text = std::fs::read_to_string(contrib(u)).unwrap();
        assert!(text.contains("ExecStart=/usr/local/bin/ftvm "), "{u}");
        // As installed, with the binary where this build put it.
        let text = text.replace("/usr/local/bin/ftvm", &ftvm_bin().display().to_string());
        let path = dir.path(u);
        std::fs::write(&path, text).unwrap();
        units.push(path);
    }
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "systemd-analyze verify: {err}");
    assert!(err.trim().is_empty(), "systemd-analyze verify warns: {err}");
    // The agent's VMs outlive a restart of the agent only if systemd leaves them alone.
    let agent = std::fs::read_to_string(contrib("ftvm-host-agent.service")).unwrap();
    assert!(agent.lines().any(|l| l == "KillMode=process"), "{agent}");
}

#[test]
fn example_settings_files_are_accepted_and_bad_ones_refused() {
    for (cmd, file) in [
        ("coordinator", "coordinator.toml"),
        ("host-agent", "host-agent.toml"),
    ] {
        // --help after the settings: they are parsed and checked, then help is printed.
        let o = Command::new(ftvm_bin())
            .args([cmd, "--config"])
            .arg(contrib(file))
            .arg("--help")
            .output()
            .unwrap();
        assert!(o.status.success(), "ftvm {cmd} --config {file}: {o:?}");
    }
    let dir = TempDir::new("settings");
    for (text, want) in [
        ("lisen = \"127.0.0.1:1\"\n", "unknown setting \"lisen\""),
        ("listen = \"not an address\"\n", "invalid value"),
        ("listen = [1, {}]\n", "must be a string or a number"),
        ("listen = \n", "config file"),
    ] {
        let f = dir.path("bad.toml");
        std::fs::write(&f, text).unwrap();
        let o = Command::new(ftvm_bin())
            .args(["coordinator", "--config"])
            .arg(&f)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{text:?}: {err}");
        assert!(err.contains(want), "{text:?}: {err}");
    }
    let o = Command::new(ftvm_bin())
        .args(["coordinator", "--config", "/no/such/ftvm.toml"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot read the config file"));
}

#[test]
fn the_command_line_overrides_the_settings_file() {
    let dir = TempDir::new("svc-coord");
    let cluster = dir.path("cluster");
    let o = Command::new(ftvm_bin())
        .args(["coordinator", "init", "--dir"])
        .arg(&cluster)
        .output()
        .unwrap();
    assert!(o.status.success(), "{o:?}");
    let (in_file, on_line) = (free_loopback_addr(), free_loopback_addr());
    let settings = dir.path("coordinator.toml");
    std::fs::write(
        &settings,
        format!(
            "dir = \"{}\"\nlisten = \"{in_file}\"\nhost-timeout-ms = 800\n",
            cluster.display()
        ),
    )
    .unwrap();
    let log = dir.path("coordinator.log");
    let mut c = Command::new(ftvm_bin())
        .args(["coordinator", "--config"])
        .arg(&settings)
        .args(["--listen", &on_line])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("listening on") || t.elapsed() > Duration::from_secs(20) {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = c.kill();
    let _ = c.wait();
    assert!(
        text.contains(&format!("listening on https://{on_line}/api/v1")),
        "the command line's --listen wins: {text}"
    );
    assert!(
        text.contains(&cluster.display().to_string()),
        "the file's dir is used: {text}"
    );
}
