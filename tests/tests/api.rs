//! The coordinator's API is HTTPS only and knows who calls: operators by API tokens with
//! roles, hosts by certificates the cluster CA signed when they joined with a one-time join
//! token. Real `ftvm coordinator` and `ftvm host-agent` processes on loopback, `curl` and raw
//! TCP as the outsiders. No VM runs here, so these tests need no /dev/kvm.
use ftvm_tests::cluster::{Backend, Cluster};
use ftvm_tests::{ftvm_bin, TempDir};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `curl` against the coordinator: (HTTP status, body). Status 0: no HTTP answer at all.
fn curl(c: &Cluster, method: &str, path: &str, extra: &[&str]) -> (u16, String) {
    let o = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
        ])
        .arg("--cacert")
        .arg(c.state.join("pki/ca.pem"))
        .args(extra)
        .arg(format!("https://{}{path}", c.addr))
        .output()
        .expect("curl (apt-get install curl)");
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// `ftvm ARGS` as the holder of `token` (not the admin).
fn ftvm_as(c: &Cluster, token: &str, args: &[&str]) -> Output {
    Command::new(ftvm_bin())
        .args(args)
        .env("FTVM_COORDINATOR", &c.addr)
        .env("FTVM_CONFIG", c.admin_config())
        .env("FTVM_TOKEN", token)
        .output()
        .unwrap()
}

/// A secret the admin's CLI prints on stdout (its hints go to stderr).
fn secret(c: &Cluster, args: &[&str]) -> String {
    let o = c.ftvm(args);
    assert!(o.status.success(), "ftvm {args:?}: {}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn the_api_refuses_plaintext_and_the_old_line_protocol() {
    let c = Cluster::start("api-plain", &["h1"], &[], Backend::File);
    for probe in [
        "GET /api/v1/status HTTP/1.1\r\nHost: x\r\n\r\n",
        "{\"op\":\"status\"}\n",
    ] {
        let mut s = std::net::TcpStream::connect(&c.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(probe.as_bytes()).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let got = String::from_utf8_lossy(&got);
        assert!(
            !got.contains("HTTP/") && !got.contains("VM") && !got.contains("h1"),
            "plaintext {probe:?} got an answer: {got:?}"
        );
    }
    let o = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("http://{}/api/v1/status", c.addr))
        .output()
        .unwrap();
    assert!(!o.status.success(), "plain HTTP must fail");
    // Over TLS, the status still needs a token.
    let (code, body) = curl(&c, "GET", "/api/v1/status", &[]);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("needs an API token"), "{body}");
    // The API describes itself: the served OpenAPI document is the committed one.
    let (code, body) = curl(&c, "GET", "/api/v1/openapi.json", &[]);
    assert_eq!(code, 200, "{body}");
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json"))
            .unwrap();
    assert_eq!(
        body.trim_end(),
        committed.trim_end(),
        "GET /api/v1/openapi.json differs from docs/openapi.json"
    );
    // And the real client, which pins the cluster CA, refuses a coordinator of another CA.
    let other = TempDir::new("api-other-ca");
    Cluster::init(&other.path("cluster"), &[]);
    let o = Command::new(ftvm_bin())
        .args(["status"])
        .env("FTVM_COORDINATOR", &c.addr)
        .env("FTVM_CONFIG", other.path("cluster/pki/admin.toml"))
        .env_remove("FTVM_TOKEN")
        .env_remove("FTVM_CA")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("TLS with the coordinator"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn tokens_have_roles_and_revoked_tokens_are_refused() {
    let c = Cluster::start("api-tokens", &["h1"], &[], Backend::File);
    let viewer = secret(&c, &["token", "create", "viewer", "--role", "read-only"]);
    let viewer = viewer.as_str();
    assert!(viewer.starts_with("viewer."), "{viewer}");
    let ops = secret(&c, &["token", "create", "ops", "--role", "operator"]);
    let ops = ops.as_str();
    // A name is taken once.
    let err = c.refused(&["token", "create", "ops", "--role", "admin"]);
    assert!(err.contains("exists"), "{err}");

    // Read-only: status, not operations.
    let o = ftvm_as(&c, viewer, &["status"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("h1"));
    let o = ftvm_as(
        &c,
        viewer,
        &["vm", "create", "x", "--guest", "counter", "--mem-mib", "32"],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("role read-only") && stderr(&o).contains("needs operator"),
        "{}",
        stderr(&o)
    );
    // Operator: operations, not tokens.
    let o = ftvm_as(
        &c,
        ops,
        &["vm", "create", "x", "--guest", "counter", "--mem-mib", "32"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // (The VM exists now, so the read-only token reaches the failover call itself.)
    let o = ftvm_as(&c, viewer, &["ft", "test-failover", "x"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("needs operator"), "{}", stderr(&o));
    let o = ftvm_as(&c, ops, &["token", "create", "mine", "--role", "admin"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("needs admin"), "{}", stderr(&o));

    // A wrong secret for a real name is refused like an unknown token.
    let forged = format!("viewer.{}", "0".repeat(40));
    let o = ftvm_as(&c, &forged, &["status"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not valid"), "{}", stderr(&o));

    // The list names tokens and roles, never secrets.
    let list = c.ok(&["token", "list"]);
    for want in ["admin", "viewer", "read-only", "ops", "operator"] {
        assert!(list.contains(want), "{want} missing from:\n{list}");
    }
    for secret in [viewer, ops] {
        let s = secret.split_once('.').unwrap().1;
        assert!(!list.contains(s), "a secret in the token list:\n{list}");
    }
    // Nor does the store: it keeps hashes.
    let mut store = String::new();
    let mut dirs = vec![c.state.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                dirs.push(e.path());
            } else {
                store += &String::from_utf8_lossy(&std::fs::read(e.path()).unwrap_or_default());
            }
        }
    }
    assert!(store.contains("viewer"), "the file store has no tokens?");
    assert!(
        !store.contains(viewer.split_once('.').unwrap().1),
        "the store holds a token's secret"
    );

    c.ok(&["token", "revoke", "viewer"]);
    let o = ftvm_as(&c, viewer, &["status"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("revoked"), "{}", stderr(&o));
    assert!(c.ok(&["token", "list"]).contains("revoked"));
}

/// An agent started outside the test cluster's helpers, with its log.
fn agent(c: &Cluster, name: &str, state: &Path, join: &str, ca: &Path) -> std::process::Child {
    Command::new(ftvm_bin())
        .args(["host-agent", "--name", name, "--coordinator", &c.addr])
        .arg("--state-dir")
        .arg(state)
        .args(["--join", join, "--ca"])
        .arg(ca)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (at most 15 s) for `child` to exit; its exit code and stderr.
fn exited(mut child: std::process::Child) -> (Option<i32>, String) {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (st.code(), err);
        }
        if t.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent should have exited");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn hosts_join_once_and_prove_their_names() {
    let mut c = Cluster::start("api-hosts", &["h1", "h2"], &[], Backend::File);
    let ca = c.state.join("pki/ca.pem");
    let h1 = c.dir.path("agent-state-h1");
    let (h1_cert, h1_key) = (h1.join("host.pem"), h1.join("host.key"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&h1_key).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "host.key must be private: {mode:o}");
    let beat = r#"{"version":1,"ip":"127.0.0.1","report":[]}"#;
    let cert_args = |cert: &Path, key: &Path| {
        vec![
            "--cert".to_string(),
            cert.display().to_string(),
            "--key".to_string(),
            key.display().to_string(),
        ]
    };
    let h1_args = cert_args(&h1_cert, &h1_key);
    let h1_args: Vec<&str> = h1_args.iter().map(String::as_str).collect();
    let json = ["-H", "content-type: application/json", "-d", beat];

    // No certificate, or an operator's token instead of one: refused.
    let (code, body) = curl(&c, "POST", "/api/v1/hosts/h1/heartbeat", &json);
    assert_eq!(code, 401, "{body}");
    let admin = std::fs::read_to_string(c.admin_config()).unwrap();
    let admin_token = admin
        .lines()
        .find_map(|l| l.strip_prefix("token = "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    let bearer = format!("authorization: Bearer {admin_token}");
    let (code, body) = curl(
        &c,
        "POST",
        "/api/v1/hosts/h1/heartbeat",
        &[&json[..], &["-H", &bearer]].concat(),
    );
    assert_eq!(code, 401, "{body}");
    // h1's certificate for h2's heartbeat: refused, naming both.
    let (code, body) = curl(
        &c,
        "POST",
        "/api/v1/hosts/h2/heartbeat",
        &[&json[..], &h1_args].concat(),
    );
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("h1") && body.contains("h2"), "{body}");
    // Its own: accepted.
    let (code, body) = curl(
        &c,
        "POST",
        "/api/v1/hosts/h1/heartbeat",
        &[&json[..], &h1_args].concat(),
    );
    assert_eq!(code, 200, "{body}");

    // A join token works once.
    let tok = secret(&c, &["host", "join-token"]);
    let tok = tok.as_str();
    let h3 = c.dir.path("agent-state-h3");
    let a3 = agent(&c, "h3", &h3, tok, &ca);
    c.agents.push(("h3".into(), a3));
    c.wait(15, "h3 up", |s| s.matches(": up").count() == 3);
    let (code, err) = exited(agent(&c, "h4", &c.dir.path("agent-state-h4"), tok, &ca));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("already used"), "{err}");
    // A name already joined cannot be joined again with a fresh token.
    let tok2 = secret(&c, &["host", "join-token"]);
    let (code, err) = exited(agent(
        &c,
        "h1",
        &c.dir.path("agent-state-h1-again"),
        tok2.trim(),
        &ca,
    ));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("\"h1\" already has a certificate"), "{err}");
    // A made-up token: refused.
    let (code, err) = exited(agent(
        &c,
        "h5",
        &c.dir.path("agent-state-h5"),
        "join.0000.1111",
        &ca,
    ));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("join token"), "{err}");
    // An agent given another cluster's CA does not talk to this coordinator.
    let other = TempDir::new("api-hosts-other");
    Cluster::init(&other.path("cluster"), &[]);
    let (code, err) = exited(agent(
        &c,
        "h6",
        &c.dir.path("agent-state-h6"),
        tok2.trim(),
        &other.path("cluster/pki/ca.pem"),
    ));
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("TLS with the coordinator"), "{err}");
    assert!(!c.dir.path("agent-state-h6/host.pem").exists());

    // Forgetting a host: its certificate is refused from then on.
    c.ok(&["host", "forget", "h1"]);
    let (code, body) = curl(
        &c,
        "POST",
        "/api/v1/hosts/h1/heartbeat",
        &[&json[..], &h1_args].concat(),
    );
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("forgotten") || body.contains("join"),
        "{body}"
    );
}
