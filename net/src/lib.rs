//! The FT link between a primary and its secondary: QUIC (quinn) with pinned mutual TLS.
//!
//! - **Identity** ([`identity`]): each side has a self-signed certificate (rcgen), created on
//!   first use and stored in a directory (the shared datastore's `keys/`, or a given path) with
//!   the private key at mode 0600.
//! - **Pinning** ([`verify`]): each side accepts exactly one peer certificate, byte for byte —
//!   no CA, no name checks; any other certificate is refused during the handshake. The TLS 1.3
//!   signature is still verified with that certificate's key, so holding a copy of the
//!   certificate is not enough to impersonate the peer.
//! - **Streams** ([`link`]): one bidirectional stream carries the FT log (ft-log frames) and a
//!   second one carries heartbeats at a higher send priority, so page traffic cannot starve
//!   them; [`link::LinkStats`] reports bytes, frames and RTT.
//! - **Transport** ([`link::transport_config`]): windows sized for a dedicated 10GbE link.
pub mod identity;
pub mod link;
pub mod verify;

pub use identity::Identity;
pub use link::{Congestion, Link, LinkConfig, LinkStats, PeerCert, Tuning};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("key store {0}")]
    Keys(String, #[source] std::io::Error),
    #[error("generating a certificate")]
    CertGen(#[source] rcgen::Error),
    #[error("TLS configuration")]
    Tls(#[source] rustls::Error),
    #[error("QUIC configuration: {0}")]
    QuicConfig(String),
    #[error("binding the FT link socket on {0}")]
    Bind(std::net::SocketAddr, #[source] std::io::Error),
    #[error("connecting to the peer")]
    Connect(#[source] quinn::ConnectError),
    #[error("FT link connection")]
    Connection(#[source] quinn::ConnectionError),
    #[error("FT link stream")]
    Write(#[source] quinn::WriteError),
    #[error("FT link stream")]
    Read(#[source] quinn::ReadError),
    #[error("FT link: peer closed the stream")]
    Closed,
    #[error("FT link: no connection arrived")]
    NoConnection,
    #[error("FT log")]
    Log(#[source] ft_log::Error),
    #[error("FT link timed out after {0:?}")]
    Timeout(std::time::Duration),
}
