//! The failover coordinator's building blocks: the cluster model ([`model`]), the store it
//! lives in ([`store`]: an embedded file store with an atomic test-and-set), and placement with
//! vSphere FT's limits ([`placement`]). The processes (`ftvm coordinator`, `ftvm host-agent`)
//! and the operations CLI are in the `ftvm` binary.
pub mod model;
pub mod placement;
pub mod store;

pub use model::{Cluster, FtState, Host, Vm};
pub use placement::{Limits, PlacementError};
pub use store::{FileStore, Store, StoreError};
