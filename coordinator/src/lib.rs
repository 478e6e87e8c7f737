//! The failover coordinator's building blocks: the cluster model ([`model`]), the store it
//! lives in ([`store`]: an embedded file store with an atomic test-and-set and a coordinator
//! lease; with feature `etcd`, the same on etcd in `etcd`), and placement with vSphere FT's
//! limits ([`placement`]), the cluster's history ([`events`]), and who may do what ([`auth`]: API tokens with roles, host join
//! tokens, host identities). The processes (`ftvm coordinator`, `ftvm host-agent`) and the
//! operations CLI are in the `ftvm` binary.
pub mod auth;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod events;
pub mod model;
pub mod placement;
pub mod store;

pub use model::{Cluster, FtState, Host, Vm};
pub use placement::{Limits, PlacementError};
pub use store::{FileStore, Leadership, Store, StoreError};

/// The etcd store (see `etcd`) at `endpoints` with keys under `prefix`; an error naming the
/// missing feature when this build has no etcd support.
/// `tls`: (CA, optional client certificate and key) PEM files.
pub fn open_etcd(
    endpoints: &[String],
    prefix: &str,
    tls: Option<(
        std::path::PathBuf,
        Option<(std::path::PathBuf, std::path::PathBuf)>,
    )>,
) -> Result<Box<dyn Store>, StoreError> {
    #[cfg(feature = "etcd")]
    {
        let tls = tls.map(|(ca, client)| etcd::Tls { ca, client });
        Ok(Box::new(etcd::EtcdStore::connect_with(
            endpoints,
            prefix,
            tls.as_ref(),
        )?))
    }
    #[cfg(not(feature = "etcd"))]
    {
        let _ = (endpoints, prefix, tls);
        Err(StoreError::Backend(
            "this ftvm was built without etcd support: build it with `cargo build --release \
             -p ftvm --features etcd` (needs protoc: apt-get install protobuf-compiler)"
                .into(),
        ))
    }
}
