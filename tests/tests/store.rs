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
