//! The QUIC connection and its two streams (FT log, heartbeats).
use crate::verify::Pinned;
use crate::{Error, Identity};
use bytes::{Bytes, BytesMut};
use ft_log::{Decoder, Frame, Hello, Record};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, RecvStream, SendStream, TransportConfig, VarInt};
use rustls::pki_types::CertificateDer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

const ALPN: &[u8] = b"ftvm-ft/1";
/// Server name used in the handshake (not checked: the certificate is pinned).
const SERVER_NAME: &str = "ftvm-peer";

/// A certificate as pinned by the other side.
pub type PeerCert = CertificateDer<'static>;

/// What a side needs to bring up the link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub identity: Identity,
    /// The one certificate the peer may present.
    pub peer_cert: CertificateDer<'static>,
    /// QUIC idle timeout: the connection is declared dead after this long without packets.
    pub idle_timeout: Duration,
    pub tuning: Tuning,
}

/// Congestion controller of the FT link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    Cubic,
    NewReno,
    Bbr,
}

/// Transport knobs for the FT link. The defaults are the choice measured by
/// `ftvm-bench link` (README, Performance).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Stream receive window in bytes; the connection's windows are twice it. `None`:
    /// quinn's defaults (sized for the Internet, not for a dedicated link).
    pub window: Option<u32>,
    pub congestion: Congestion,
    /// Largest UDP payload MTU discovery may try: 1452 fits a standard 1500-byte Ethernet
    /// MTU; 8952 fits the jumbo frames a dedicated FT link usually has.
    pub max_mtu: u16,
}

impl Default for Tuning {
    /// Measured on loopback and on a 10 Gbit/s-shaped veth (`ftvm-bench link`): the link is
    /// CPU-bound (crypto, framing) long before flow control matters at LAN round trips, and
    /// 64 MiB windows were slightly slower than small ones; 8 MiB stream windows still cover
    /// 10 Gbit/s × 6 ms in flight. Cubic (BBR measured slower). Standard Ethernet MTU: jumbo
    /// frames gained nothing measurable and cannot be assumed.
    fn default() -> Self {
        Tuning {
            window: Some(8 << 20),
            congestion: Congestion::Cubic,
            max_mtu: 1452,
        }
    }
}

/// Transport settings for a dedicated FT link (see [`Tuning`]); keep-alives well inside the
/// idle timeout.
pub fn transport_config(idle_timeout: Duration, tuning: &Tuning) -> Result<TransportConfig, Error> {
    let mut t = TransportConfig::default();
    if let Some(w) = tuning.window {
        t.stream_receive_window(VarInt::from_u32(w));
        t.receive_window(VarInt::from_u32(w.saturating_mul(2)));
        t.send_window(u64::from(w) * 2);
    }
    match tuning.congestion {
        Congestion::Cubic => {}
        Congestion::NewReno => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()));
        }
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
    }
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(tuning.max_mtu);
    t.mtu_discovery_config(Some(mtu));
    t.max_concurrent_bidi_streams(VarInt::from_u32(4));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.keep_alive_interval(Some(idle_timeout / 4));
    t.max_idle_timeout(Some(
        idle_timeout
            .try_into()
            .map_err(|e| Error::QuicConfig(format!("idle timeout: {e}")))?,
    ));
    t.initial_mtu(1400);
    Ok(t)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn server_config(cfg: &LinkConfig) -> Result<quinn::ServerConfig, Error> {
    let p = provider();
    let mut tls = rustls::ServerConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::Tls)?
        .with_client_cert_verifier(Pinned::new(cfg.peer_cert.clone(), &p))
        .with_single_cert(vec![cfg.identity.cert.clone()], cfg.identity.key())
        .map_err(Error::Tls)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicServerConfig::try_from(tls).map_err(|e| Error::QuicConfig(e.to_string()))?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(quic));
    sc.transport_config(Arc::new(transport_config(cfg.idle_timeout, &cfg.tuning)?));
    Ok(sc)
}

fn client_config(cfg: &LinkConfig) -> Result<quinn::ClientConfig, Error> {
    let p = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::Tls)?
        .dangerous()
        .with_custom_certificate_verifier(Pinned::new(cfg.peer_cert.clone(), &p))
        .with_client_auth_cert(vec![cfg.identity.cert.clone()], cfg.identity.key())
        .map_err(Error::Tls)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = QuicClientConfig::try_from(tls).map_err(|e| Error::QuicConfig(e.to_string()))?;
    let mut cc = quinn::ClientConfig::new(Arc::new(quic));
    cc.transport_config(Arc::new(transport_config(cfg.idle_timeout, &cfg.tuning)?));
    Ok(cc)
}

/// A listening side (the secondary).
pub struct Listener {
    endpoint: Endpoint,
}

impl Listener {
    /// Binds `addr` (UDP). Must be called inside a tokio runtime.
    pub fn bind(addr: SocketAddr, cfg: &LinkConfig) -> Result<Self, Error> {
        let endpoint =
            Endpoint::server(server_config(cfg)?, addr).map_err(|e| Error::Bind(addr, e))?;
        Ok(Listener { endpoint })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("bound socket has an address")
    }

    /// Waits for the next peer that completes the pinned handshake and the `Hello` exchange;
    /// returns the link, the peer's `Hello` and the negotiated version. Failed handshakes
    /// (wrong certificate, garbage, no common version) are logged and skipped.
    pub async fn accept(&self, hello: &Hello) -> Result<(Link, Hello, u8), Error> {
        loop {
            let incoming = self.endpoint.accept().await.ok_or(Error::NoConnection)?;
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) if gave_up_in_handshake(&e) => {
                    // A primary started beside its secondary sends before anyone listens; its
                    // attempt times out and it tries again. Nothing was refused.
                    tracing::debug!("FT link: a peer gave up its handshake: {e}");
                    continue;
                }
                Err(e) => {
                    tracing::warn!("FT link: refused a connection: {e}");
                    continue;
                }
            };
            let (log_tx, log_rx) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("FT link: peer did not open its streams: {e}");
                    continue;
                }
            };
            let (hb_tx, hb_rx) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("FT link: peer did not open its heartbeat stream: {e}");
                    continue;
                }
            };
            let mut link = Link::new(conn, None, log_tx, log_rx, hb_tx, hb_rx);
            match link.exchange_hello(hello).await {
                Ok((peer, v)) => return Ok((link, peer, v)),
                Err(e) => {
                    tracing::warn!("FT link: hello exchange failed: {e}");
                    link.close("hello exchange failed");
                }
            }
        }
    }
}

/// Connects to the listening peer at `addr` (the primary's side) and exchanges `Hello`s;
/// returns the link, the peer's `Hello` and the negotiated version.
pub async fn connect(
    addr: SocketAddr,
    cfg: &LinkConfig,
    hello: &Hello,
) -> Result<(Link, Hello, u8), Error> {
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse().unwrap()
    } else {
        "0.0.0.0:0".parse().unwrap()
    };
    let mut endpoint = Endpoint::client(bind).map_err(|e| Error::Bind(bind, e))?;
    endpoint.set_default_client_config(client_config(cfg)?);
    let conn = endpoint
        .connect(addr, SERVER_NAME)
        .map_err(Error::Connect)?
        .await
        .map_err(Error::Connection)?;
    let (log_tx, log_rx) = conn.open_bi().await.map_err(Error::Connection)?;
    let (hb_tx, hb_rx) = conn.open_bi().await.map_err(Error::Connection)?;
    let mut link = Link::new(conn, Some(endpoint), log_tx, log_rx, hb_tx, hb_rx);
    let (peer, v) = link.exchange_hello(hello).await?;
    Ok((link, peer, v))
}

/// Link statistics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LinkStats {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub frames_sent: u64,
    pub frames_received: u64,
    pub rtt: Duration,
}

/// The sending side of one stream.
pub struct Sender {
    tx: SendStream,
    frames: u64,
}

impl Sender {
    /// Sends already-encoded ft-log frames (copied into the stream's send buffer).
    pub async fn send_frames(&mut self, bytes: &[u8], frames: u64) -> Result<(), Error> {
        self.frames += frames;
        self.tx.write_all(bytes).await.map_err(Error::Write)
    }

    /// Sends already-encoded ft-log frames without copying them: the stream keeps `bytes`
    /// until the peer has acknowledged them. For epochs of many pages, where a copy into
    /// fresh send-buffer memory costs more than the encoding (first-touch page faults).
    pub async fn send_frames_owned(&mut self, bytes: Bytes, frames: u64) -> Result<(), Error> {
        self.frames += frames;
        self.tx.write_chunk(bytes).await.map_err(Error::Write)
    }

    /// Sends one record.
    pub async fn send_record(&mut self, epoch: u64, r: &Record) -> Result<(), Error> {
        let mut b = BytesMut::new();
        r.encode(epoch, &mut b);
        self.send_frames(&b, 1).await
    }

    /// Sends a heartbeat record.
    pub async fn send_heartbeat(&mut self, seq: u64, sent_us: u64) -> Result<(), Error> {
        self.send_record(0, &Record::Heartbeat { seq, sent_us })
            .await
    }
}

/// The receiving side of one stream.
pub struct Receiver {
    rx: RecvStream,
    buf: BytesMut,
    decoder: Decoder,
}

impl Receiver {
    async fn recv_frame(&mut self) -> Result<Frame, Error> {
        loop {
            if let Some(f) = self.decoder.decode(&mut self.buf).map_err(Error::Log)? {
                return Ok(f);
            }
            match self
                .rx
                .read_chunk(1 << 20, true)
                .await
                .map_err(Error::Read)?
            {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None => return Err(Error::Closed),
            }
        }
    }

    /// The next record.
    pub async fn recv_record(&mut self) -> Result<(u64, Record), Error> {
        let f = self.recv_frame().await?;
        Record::decode(&f).map_err(Error::Log)
    }

    /// The next heartbeat, waiting at most `timeout`.
    pub async fn recv_heartbeat(&mut self, timeout: Duration) -> Result<(u64, u64), Error> {
        let rec = tokio::time::timeout(timeout, self.recv_record())
            .await
            .map_err(|_| Error::Timeout(timeout))??;
        match rec {
            (_, Record::Heartbeat { seq, sent_us }) => Ok((seq, sent_us)),
            (_, other) => Err(Error::Log(ft_log::Error::Corruption(format!(
                "{:?} on the heartbeat stream",
                other.kind()
            )))),
        }
    }

    /// Frames decoded so far.
    pub fn frames(&self) -> u64 {
        self.decoder.frames
    }
}

/// The connection itself: statistics and closing.
#[derive(Clone)]
pub struct Control {
    conn: quinn::Connection,
    _endpoint: Option<Endpoint>,
}

impl Control {
    pub fn stats(&self) -> LinkStats {
        let s = self.conn.stats();
        LinkStats {
            bytes_sent: s.udp_tx.bytes,
            bytes_received: s.udp_rx.bytes,
            rtt: s.path.rtt,
            ..Default::default()
        }
    }

    /// Closes the connection with a reason the peer sees.
    pub fn close(&self, reason: &str) {
        self.conn.close(VarInt::from_u32(0), reason.as_bytes());
    }
}

/// A link taken apart so each stream direction can live in its own task.
pub struct Parts {
    pub log_tx: Sender,
    pub log_rx: Receiver,
    pub hb_tx: Sender,
    pub hb_rx: Receiver,
    pub control: Control,
}

/// An established, authenticated FT link.
pub struct Link {
    parts: Parts,
}

impl Link {
    fn new(
        conn: quinn::Connection,
        endpoint: Option<Endpoint>,
        log_tx: SendStream,
        log_rx: RecvStream,
        hb_tx: SendStream,
        hb_rx: RecvStream,
    ) -> Self {
        // Heartbeats go out before queued page data.
        let _ = hb_tx.set_priority(10);
        let _ = log_tx.set_priority(0);
        let rx = |rx| Receiver {
            rx,
            buf: BytesMut::new(),
            decoder: Decoder::new(),
        };
        Link {
            parts: Parts {
                log_tx: Sender {
                    tx: log_tx,
                    frames: 0,
                },
                log_rx: rx(log_rx),
                hb_tx: Sender {
                    tx: hb_tx,
                    frames: 0,
                },
                hb_rx: rx(hb_rx),
                control: Control {
                    conn,
                    _endpoint: endpoint,
                },
            },
        }
    }

    /// Takes the link apart (for separate sender / receiver / heartbeat tasks).
    pub fn into_parts(self) -> Parts {
        self.parts
    }

    /// Sends our `Hello` first on both streams (which also makes them visible to the peer),
    /// reads the peer's from the log stream and negotiates the version.
    async fn exchange_hello(&mut self, hello: &Hello) -> Result<(Hello, u8), Error> {
        self.send_record(0, &Record::Hello(hello.clone())).await?;
        self.send_heartbeat(0, 0).await?;
        match self.recv_record().await? {
            (_, Record::Hello(peer)) => {
                let v =
                    ft_log::negotiate(peer.min_version, peer.max_version).map_err(Error::Log)?;
                // The peer's opening heartbeat.
                self.recv_heartbeat(Duration::from_secs(10)).await?;
                Ok((peer, v))
            }
            (_, other) => Err(Error::Log(ft_log::Error::Corruption(format!(
                "expected Hello, got {:?}",
                other.kind()
            )))),
        }
    }

    /// Sends one record on the log stream.
    pub async fn send_record(&mut self, epoch: u64, r: &Record) -> Result<(), Error> {
        self.parts.log_tx.send_record(epoch, r).await
    }

    /// Receives the next record from the log stream.
    pub async fn recv_record(&mut self) -> Result<(u64, Record), Error> {
        self.parts.log_rx.recv_record().await
    }

    /// Sends a heartbeat on the heartbeat stream.
    pub async fn send_heartbeat(&mut self, seq: u64, sent_us: u64) -> Result<(), Error> {
        self.parts.hb_tx.send_heartbeat(seq, sent_us).await
    }

    /// Waits for the peer's next heartbeat, up to `timeout`.
    pub async fn recv_heartbeat(&mut self, timeout: Duration) -> Result<(u64, u64), Error> {
        self.parts.hb_rx.recv_heartbeat(timeout).await
    }

    pub fn stats(&self) -> LinkStats {
        LinkStats {
            frames_sent: self.parts.log_tx.frames,
            frames_received: self.parts.log_rx.frames(),
            ..self.parts.control.stats()
        }
    }

    /// Closes the connection with a reason the peer sees.
    pub fn close(&self, reason: &str) {
        self.parts.control.close(reason)
    }
}

/// Whether a handshake ended because the connecting side closed it (QUIC reports an
/// application's close during the handshake as APPLICATION_ERROR): a client whose connect
/// timed out, not a peer refused for its certificate or its bytes.
fn gave_up_in_handshake(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ConnectionClosed(c)
        if c.error_code == quinn::TransportErrorCode::APPLICATION_ERROR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed(code: quinn::TransportErrorCode) -> quinn::ConnectionError {
        quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: code,
            frame_type: None,
            reason: bytes::Bytes::new(),
        })
    }

    #[test]
    fn a_client_giving_up_is_told_apart_from_a_refusal() {
        assert!(gave_up_in_handshake(&closed(
            quinn::TransportErrorCode::APPLICATION_ERROR
        )));
        // A peer that rejected our certificate closes with a TLS alert (CRYPTO_ERROR range).
        assert!(!gave_up_in_handshake(&closed(
            quinn::TransportErrorCode::crypto(42)
        )));
        assert!(!gave_up_in_handshake(&closed(
            quinn::TransportErrorCode::PROTOCOL_VIOLATION
        )));
        assert!(!gave_up_in_handshake(&quinn::ConnectionError::TimedOut));
    }
}
