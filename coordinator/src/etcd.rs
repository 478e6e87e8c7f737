//! The etcd backend of [`Store`], for clusters that outgrow one machine (feature `etcd`).
//!
//! Every key lives under a prefix (default `/ftvm/`), so several clusters (or test runs) can
//! share one etcd. Versions are etcd's per-key `version` (1 on creation, +1 per write, 0 when
//! absent), which is exactly [`Store`]'s contract, and every write is one etcd transaction:
//! [`Store::cas`] is `if version(key) == expected then put, get`, [`Store::put`] is
//! `put, get` (the `get` returns the new version atomically with the write).
//!
//! The coordinator lease ([`Store::lead`]) is an etcd lease (TTL [`LEASE_TTL_S`]) attached
//! to the key `PREFIX/leader`, created by a transaction that succeeds only if the key does not
//! exist; a keep-alive task renews it every third of the TTL. If a renewal is refused or not
//! answered within the TTL, the leadership is lost ([`Leadership::held`] turns false) and the
//! key disappears with the lease, so a standby takes over.
//!
//! The client is async (`etcd-client`, tonic); this module runs it on a private one-thread
//! tokio runtime and bounds every call by [`CALL_TIMEOUT`], so a dead etcd is an error, not a
//! hang. Over TLS ([`Tls`], `https://` endpoints) it trusts the given CA only and can
//! present a client certificate (etcd's `--client-cert-auth`).
use crate::store::{check_key, Leadership, Store, StoreError, Versioned};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Bound on every etcd call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// TTL of the coordinator lease, in seconds (etcd's minimum is about 1.5 s with its default
/// election timeout).
pub const LEASE_TTL_S: i64 = 3;

/// TLS to etcd: the CA that signed etcd's certificate, and a client certificate and key
/// (PEM files) for an etcd that requires one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    pub ca: std::path::PathBuf,
    pub client: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl Tls {
    fn options(&self) -> Result<etcd_client::TlsOptions, StoreError> {
        let read = |p: &std::path::Path, what: &str| {
            std::fs::read(p)
                .map_err(|e| backend(format!("reading the etcd {what} {}: {e}", p.display())))
        };
        let mut o = etcd_client::TlsOptions::new().ca_certificate(
            etcd_client::Certificate::from_pem(read(&self.ca, "CA certificate")?),
        );
        if let Some((cert, key)) = &self.client {
            o = o.identity(etcd_client::Identity::from_pem(
                read(cert, "client certificate")?,
                read(key, "client key")?,
            ));
        }
        Ok(o)
    }
}

pub struct EtcdStore {
    rt: tokio::runtime::Runtime,
    client: Client,
    prefix: String,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (e.g. `http://127.0.0.1:2379`) and keeps every key
    /// under `prefix`, which must start and end with `/`.
    pub fn connect(endpoints: &[String], prefix: &str) -> Result<Self, StoreError> {
        Self::connect_with(endpoints, prefix, None)
    }

    /// As [`EtcdStore::connect`], over TLS when `tls` is given (then every endpoint must be
    /// `https://`, and a plain one is refused before any connection).
    pub fn connect_with(
        endpoints: &[String],
        prefix: &str,
        tls: Option<&Tls>,
    ) -> Result<Self, StoreError> {
        for e in endpoints {
            match (tls.is_some(), e.starts_with("https://")) {
                (true, false) => {
                    return Err(backend(format!(
                        "etcd endpoint {e}: with TLS options every endpoint is https://"
                    )))
                }
                (false, true) => {
                    return Err(backend(format!(
                        "etcd endpoint {e} is https://: give the CA that signed its certificate (--etcd-ca)"
                    )))
                }
                _ => {}
            }
        }
        if !prefix.starts_with('/')
            || !prefix.ends_with('/')
            || prefix.len() > 100
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
        {
            return Err(StoreError::Key(format!(
                "etcd prefix {prefix:?}: must start and end with '/' and use [A-Za-z0-9._/-]"
            )));
        }
        if endpoints.is_empty() {
            return Err(backend("no etcd endpoint given"));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-client")
            .enable_all()
            .build()
            .map_err(backend)?;
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT);
        if let Some(t) = tls {
            opts = opts.with_tls(t.options()?);
        }
        let client = rt
            .block_on(async {
                let mut c = Client::connect(endpoints, Some(opts)).await?;
                // Connecting is lazy; one read proves the endpoint answers.
                c.get("/", Some(GetOptions::new().with_keys_only())).await?;
                Ok::<_, etcd_client::Error>(c)
            })
            .map_err(|e| backend(format!("cannot reach etcd at {}: {e}", endpoints.join(","))))?;
        Ok(EtcdStore {
            rt,
            client,
            prefix: prefix.to_string(),
        })
    }

    fn key(&self, key: &str) -> Result<String, StoreError> {
        check_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }

    /// Runs one etcd call on the private runtime, bounded by [`CALL_TIMEOUT`].
    fn call<T, F>(&self, f: impl FnOnce(Client) -> F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        let fut = f(self.client.clone());
        self.rt.block_on(async {
            match tokio::time::timeout(CALL_TIMEOUT, fut).await {
                Ok(r) => r.map_err(backend),
                Err(_) => Err(backend(format!(
                    "etcd did not answer within {CALL_TIMEOUT:?}"
                ))),
            }
        })
    }

    /// The version that the `get` in a write transaction's responses reports.
    fn written_version(key: &str, ops: Vec<TxnOpResponse>) -> Result<u64, StoreError> {
        ops.into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.version()),
                _ => None,
            })
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| StoreError::Corrupt(key.into()))
    }
}

impl Store for EtcdStore {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let k = self.key(key)?;
        let r = self.call(|mut c| async move { c.get(k, None).await })?;
        Ok(r.kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.version().max(0) as u64)))
    }

    fn cas(&self, key: &str, expected: u64, value: &[u8]) -> Result<Option<u64>, StoreError> {
        let k = self.key(key)?;
        let expected_i = i64::try_from(expected).map_err(backend)?;
        let v = value.to_vec();
        let r = self.call(|mut c| async move {
            let txn = Txn::new()
                .when([Compare::version(k.clone(), CompareOp::Equal, expected_i)])
                .and_then([TxnOp::put(k.clone(), v, None), TxnOp::get(k, None)]);
            c.txn(txn).await
        })?;
        if !r.succeeded() {
            return Ok(None);
        }
        Self::written_version(key, r.op_responses()).map(Some)
    }

    fn put(&self, key: &str, value: &[u8]) -> Result<u64, StoreError> {
        let k = self.key(key)?;
        let v = value.to_vec();
        let r = self.call(|mut c| async move {
            let txn = Txn::new().and_then([TxnOp::put(k.clone(), v, None), TxnOp::get(k, None)]);
            c.txn(txn).await
        })?;
        Self::written_version(key, r.op_responses())
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        let k = self.key(key)?;
        self.call(|mut c| async move { c.delete(k, None).await })?;
        Ok(())
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let p = format!("{}{prefix}", self.prefix);
        let r = self.call(|mut c| async move {
            c.get(p, Some(GetOptions::new().with_prefix().with_keys_only()))
                .await
        })?;
        let mut out: Vec<String> = r
            .kvs()
            .iter()
            .filter_map(|kv| kv.key_str().ok())
            .filter_map(|k| k.strip_prefix(&self.prefix))
            .filter(|k| check_key(k).is_ok())
            .map(str::to_string)
            .collect();
        out.sort();
        Ok(out)
    }

    fn lead(&self, who: &str, waiting: &mut dyn FnMut(&str)) -> Result<Leadership, StoreError> {
        let key = format!("{}leader", self.prefix);
        let mut told = false;
        loop {
            let lease = self
                .call(|mut c| async move { c.lease_grant(LEASE_TTL_S, None).await })?
                .id();
            let (k, w) = (key.clone(), who.to_string());
            let r = self.call(|mut c| async move {
                let txn = Txn::new()
                    .when([Compare::create_revision(k.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        k.clone(),
                        w,
                        Some(PutOptions::new().with_lease(lease)),
                    )])
                    .or_else([TxnOp::get(k, None)]);
                c.txn(txn).await
            })?;
            if r.succeeded() {
                return self.keep_alive(lease);
            }
            // Taken: the lease we made is not needed (it would expire anyway).
            let _ = self.call(|mut c| async move { c.lease_revoke(lease).await });
            if !told {
                let holder = r
                    .op_responses()
                    .into_iter()
                    .find_map(|op| match op {
                        TxnOpResponse::Get(g) => g
                            .kvs()
                            .first()
                            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                        _ => None,
                    })
                    .unwrap_or_default();
                waiting(&holder);
                told = true;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl EtcdStore {
    /// Starts renewing `lease`; the returned leadership is lost when a renewal fails.
    fn keep_alive(&self, lease: i64) -> Result<Leadership, StoreError> {
        let (mut keeper, mut stream) =
            self.call(|mut c| async move { c.lease_keep_alive(lease).await })?;
        let held = Arc::new(AtomicBool::new(true));
        let h = held.clone();
        let ttl = Duration::from_secs(LEASE_TTL_S as u64);
        let task = self.rt.spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                let renewed = async {
                    keeper.keep_alive().await?;
                    stream.message().await
                };
                match tokio::time::timeout(ttl, renewed).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                    _ => {
                        h.store(false, Ordering::SeqCst);
                        return;
                    }
                }
            }
        });
        struct Abort(tokio::task::JoinHandle<()>);
        impl Drop for Abort {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        Ok(Leadership::new(held, Box::new(Abort(task))))
    }
}
