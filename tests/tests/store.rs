//! The coordinator's store contract (versions, test-and-set, listing, the coordinator lease)
//! against both backends: the embedded file store and a real etcd (Debian's etcd-server).
use coordinator::etcd::{EtcdStore, CALL_TIMEOUT, LEASE_TTL_S};
use coordinator::store::conformance;
use coordinator::{FileStore, Store, StoreError};
use ftvm_tests::{Etcd, TempDir};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn etcd_store(e: &Etcd, prefix: &str) -> EtcdStore {
    EtcdStore::connect(&e.endpoints, prefix).expect("connect to the test etcd")
}

#[test]
fn file_store_keeps_the_store_contract() {
    let d = TempDir::new("store-file");
    let s = FileStore::open(&d.path("s")).unwrap();
    conformance::versions_cas_list_delete(&s);
    conformance::concurrent_cas_has_one_winner_per_version(Arc::new(s));
}

#[test]
fn etcd_store_keeps_the_store_contract() {
    let e = Etcd::start();
    let p = e.prefix("contract");
    conformance::versions_cas_list_delete(&etcd_store(&e, &p));
    conformance::concurrent_cas_has_one_winner_per_version(Arc::new(etcd_store(&e, &p)));
}

#[test]
fn etcd_lease_has_one_holder_and_passes_on_when_lost() {
    let e = Etcd::start();
    let p = e.prefix("lease");
    let (a, b): (Arc<dyn Store>, Arc<dyn Store>) =
        (Arc::new(etcd_store(&e, &p)), Arc::new(etcd_store(&e, &p)));
    // Dropping the first leadership stops its keep-alive: the lease expires within its TTL.
    conformance::one_leader_at_a_time(a, b, Duration::from_secs(LEASE_TTL_S as u64 + 3));
}

#[test]
fn two_etcd_prefixes_never_see_each_other() {
    let e = Etcd::start();
    let (a, b) = (
        etcd_store(&e, &e.prefix("iso")),
        etcd_store(&e, &e.prefix("iso")),
    );
    a.put("cluster", b"a").unwrap();
    assert_eq!(b.get("cluster").unwrap(), None);
    assert!(b.list("").unwrap().is_empty());
    assert_eq!(a.list("").unwrap(), vec!["cluster".to_string()]);
}

#[test]
fn bad_etcd_prefix_and_dead_endpoint_are_clear_errors() {
    assert!(matches!(
        EtcdStore::connect(&["http://127.0.0.1:1".into()], "no-slash"),
        Err(StoreError::Key(_))
    ));
    let t = Instant::now();
    let err = EtcdStore::connect(&["http://127.0.0.1:1".into()], "/x/")
        .err()
        .expect("nothing listens on port 1");
    assert!(err.to_string().contains("cannot reach etcd"), "{err}");
    assert!(t.elapsed() < CALL_TIMEOUT * 3, "took {:?}", t.elapsed());
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl, in
/// `dir`: (ca.pem, server.pem, server.key, client.pem, client.key).
fn make_pki(dir: &TempDir) {
    let sh = |args: &[&str]| {
        let o = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&dir.0)
            .output()
            .expect("openssl (Debian package openssl)");
        assert!(o.status.success(), "openssl {args:?}: {o:?}");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    sh(&[
        &["req", "-x509"],
        &ec[..],
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=test etcd CA",
        ],
    ]
    .concat());
    std::fs::write(
        dir.path("server.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.path("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (who, cn) in [("server", "etcd"), ("client", "ftvm")] {
        sh(&[
            &["req"],
            &ec[..],
            &[
                "-keyout",
                &format!("{who}.key"),
                "-out",
                &format!("{who}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        ]
        .concat());
        sh(&[
            "x509",
            "-req",
            "-in",
            &format!("{who}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{who}.pem"),
            "-extfile",
            &format!("{who}.ext"),
        ]);
    }
}

/// The etcd backend over TLS, against an etcd that requires client certificates: the store
/// contract holds, and a client without a certificate, one that trusts another CA, and a
/// plain-HTTP endpoint are refused.
#[test]
fn etcd_over_tls_with_client_certificates() {
    use coordinator::etcd::Tls;
    let d = TempDir::new("etcd-tls");
    make_pki(&d);
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (client, peer) = (
        format!("https://127.0.0.1:{}", free()),
        format!("http://127.0.0.1:{}", free()),
    );
    let p = |f: &str| d.path(f).display().to_string();
    let mut etcd = std::process::Command::new("etcd")
        .args(["--name", "tls", "--data-dir", &p("data")])
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &format!("tls={peer}")])
        .args([
            "--cert-file",
            &p("server.pem"),
            "--key-file",
            &p("server.key"),
        ])
        .args(["--trusted-ca-file", &p("ca.pem"), "--client-cert-auth"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(d.path("etcd.log")).unwrap())
        .spawn()
        .expect("etcd (Debian package etcd-server)");
    let tls = Tls {
        ca: d.path("ca.pem"),
        client: Some((d.path("client.pem"), d.path("client.key"))),
    };
    let endpoints = vec![client.clone()];
    let t = Instant::now();
    let store = loop {
        match EtcdStore::connect_with(&endpoints, "/tls/", Some(&tls)) {
            Ok(s) => break s,
            Err(_) if t.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!(
                "no TLS connection to etcd: {e}; its log: {}",
                std::fs::read_to_string(d.path("etcd.log")).unwrap_or_default()
            ),
        }
    };
    conformance::versions_cas_list_delete(&store);
    // No client certificate: etcd refuses the handshake.
    let no_cert = Tls {
        ca: d.path("ca.pem"),
        client: None,
    };
    assert!(EtcdStore::connect_with(&endpoints, "/tls/", Some(&no_cert)).is_err());
    // Trusting another CA (the client's certificate is not a CA): refused.
    let other_ca = Tls {
        ca: d.path("client.pem"),
        client: tls.client.clone(),
    };
    assert!(EtcdStore::connect_with(&endpoints, "/tls/", Some(&other_ca)).is_err());
    // TLS options with a plain endpoint, or an https endpoint without them: refused at once.
    let plain = vec![client.replace("https://", "http://")];
    let err = EtcdStore::connect_with(&plain, "/tls/", Some(&tls))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("every endpoint is https://"), "{err}");
    let err = EtcdStore::connect(&endpoints, "/tls/")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("--etcd-ca"), "{err}");
    // The coordinator takes the same options: a cluster created in this etcd over TLS.
    let o = std::process::Command::new(ftvm_tests::ftvm_bin())
        .args([
            "coordinator",
            "init",
            "--dir",
            &p("cluster"),
            "--etcd",
            &client,
        ])
        .args(["--etcd-prefix", "/tls-cluster/", "--etcd-ca", &p("ca.pem")])
        .args([
            "--etcd-cert",
            &p("client.pem"),
            "--etcd-key",
            &p("client.key"),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "coordinator init over TLS: {o:?}");
    let cluster_keys = EtcdStore::connect_with(&endpoints, "/tls-cluster/", Some(&tls))
        .unwrap()
        .list("")
        .unwrap();
    assert!(
        !cluster_keys.is_empty(),
        "init wrote the cluster's keys over TLS"
    );
    let _ = etcd.kill();
    let _ = etcd.wait();
}
