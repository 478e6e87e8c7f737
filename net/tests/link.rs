//! The FT link on loopback: real QUIC, real sockets, real certificates.
use bytes::Bytes;
use ft_log::{Hello, Record, Role};
use net::link::{connect, Listener};
use net::{Identity, LinkConfig};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

struct Dir(PathBuf);
impl Dir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ftvm-net-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        Dir(p)
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn hello(role: Role) -> Hello {
    Hello {
        min_version: ft_log::MIN_VERSION,
        max_version: ft_log::VERSION,
        role,
        vcpus: 2,
        mem_mib: 128,
        vm_id: [7; 16],
    }
}

fn config(me: &Identity, peer: &Identity) -> LinkConfig {
    LinkConfig {
        identity: me.clone(),
        peer_cert: peer.cert.clone(),
        idle_timeout: Duration::from_secs(5),
        tuning: Default::default(),
    }
}

const T: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_peers_exchange_records_and_heartbeats() {
    let d = Dir::new("ok");
    let p = Identity::load_or_create(&d.0, "primary").unwrap();
    let s = Identity::load_or_create(&d.0, "secondary").unwrap();
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), &config(&s, &p)).unwrap();
    let addr = listener.local_addr();
    let server = tokio::spawn(async move {
        let (mut link, peer, v) = listener.accept(&hello(Role::Secondary)).await.unwrap();
        assert_eq!((peer.role, v), (Role::Primary, ft_log::VERSION));
        let (epoch, rec) = link.recv_record().await.unwrap();
        assert_eq!(epoch, 42);
        assert_eq!(
            rec,
            Record::Output {
                stream: 0,
                offset: 10,
                data: Bytes::from_static(b"hello\n")
            }
        );
        link.send_record(42, &Record::Ack).await.unwrap();
        let hb = link.recv_heartbeat(T).await.unwrap();
        assert_eq!(hb, (1, 1234));
        // Keep the connection until the client has read the ack.
        let _ = link.recv_record().await;
    });
    let (mut link, peer, _) =
        tokio::time::timeout(T, connect(addr, &config(&p, &s), &hello(Role::Primary)))
            .await
            .unwrap()
            .unwrap();
    assert_eq!(peer.role, Role::Secondary);
    link.send_record(
        42,
        &Record::Output {
            stream: 0,
            offset: 10,
            data: Bytes::from_static(b"hello\n"),
        },
    )
    .await
    .unwrap();
    assert_eq!(
        tokio::time::timeout(T, link.recv_record())
            .await
            .unwrap()
            .unwrap(),
        (42, Record::Ack)
    );
    link.send_heartbeat(1, 1234).await.unwrap();
    let st = link.stats();
    assert!(
        st.bytes_sent > 0 && st.bytes_received > 0 && st.frames_sent >= 2,
        "{st:?}"
    );
    assert!(st.rtt < Duration::from_secs(1));
    link.close("done");
    let _ = tokio::time::timeout(T, server).await;
}

async fn handshake_fails(
    server_id: &Identity,
    server_pins: &Identity,
    client_id: &Identity,
    client_pins: &Identity,
) {
    let listener = Listener::bind(
        "127.0.0.1:0".parse().unwrap(),
        &config(server_id, server_pins),
    )
    .unwrap();
    let addr = listener.local_addr();
    let accepted = tokio::spawn(async move {
        tokio::time::timeout(
            Duration::from_secs(3),
            listener.accept(&hello(Role::Secondary)),
        )
        .await
        .is_ok()
    });
    let res = tokio::time::timeout(
        T,
        connect(addr, &config(client_id, client_pins), &hello(Role::Primary)),
    )
    .await;
    let client_ok = matches!(res, Ok(Ok(_)));
    assert!(!client_ok, "client completed a link it should not have");
    assert!(
        !accepted.await.unwrap(),
        "server accepted a peer it should not have"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_with_another_certificate_is_refused() {
    let d = Dir::new("badclient");
    let p = Identity::load_or_create(&d.0, "primary").unwrap();
    let s = Identity::load_or_create(&d.0, "secondary").unwrap();
    let mallory = Identity::load_or_create(&d.0, "mallory").unwrap();
    // The secondary pins the primary; mallory connects with her own certificate.
    handshake_fails(&s, &p, &mallory, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_with_another_certificate_is_refused() {
    let d = Dir::new("badserver");
    let p = Identity::load_or_create(&d.0, "primary").unwrap();
    let s = Identity::load_or_create(&d.0, "secondary").unwrap();
    let mallory = Identity::load_or_create(&d.0, "mallory").unwrap();
    // The primary pins the secondary; mallory listens instead.
    handshake_fails(&mallory, &p, &p, &s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_do_not_hurt_the_listener() {
    let d = Dir::new("garbage");
    let p = Identity::load_or_create(&d.0, "primary").unwrap();
    let s = Identity::load_or_create(&d.0, "secondary").unwrap();
    let listener = Listener::bind("127.0.0.1:0".parse().unwrap(), &config(&s, &p)).unwrap();
    let addr = listener.local_addr();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut x: u64 = 0x1234_5678;
    for i in 0..2000usize {
        let len = 1 + (i * 37) % 1400;
        let pkt: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let _ = sock.send_to(&pkt, addr);
    }
    let server = tokio::spawn(async move {
        let (mut link, h, _) = listener.accept(&hello(Role::Secondary)).await.unwrap();
        // Stay connected until the client says goodbye.
        let _ = link.recv_record().await;
        h.role
    });
    let (mut link, _, _) =
        tokio::time::timeout(T, connect(addr, &config(&p, &s), &hello(Role::Primary)))
            .await
            .unwrap()
            .unwrap();
    link.send_record(1, &Record::Ack).await.unwrap();
    assert_eq!(
        tokio::time::timeout(T, server).await.unwrap().unwrap(),
        Role::Primary
    );
    link.close("done");
}

#[test]
fn keys_are_created_0600_and_reused() {
    let d = Dir::new("keys");
    let a = Identity::load_or_create(&d.0, "h1").unwrap();
    let (crt, key) = net::identity::paths(&d.0, "h1");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "private key mode {mode:o}");
    assert!(crt.exists());
    let b = Identity::load_or_create(&d.0, "h1").unwrap();
    assert_eq!(a.cert, b.cert, "second call reuses the stored identity");
    assert_eq!(net::identity::load_cert(&d.0, "h1").unwrap(), a.cert);
}
