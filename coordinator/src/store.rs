//! Where cluster state lives: keys with versioned values and an atomic test-and-set.
//!
//! [`FileStore`] is the embedded default (nothing to install): one file per key in a
//! directory, every write under an exclusive `flock` of the directory's lock file, values
//! replaced by write-to-temporary + `rename`, so readers never see a torn value and
//! [`Store::cas`] is atomic across processes on the host (and on a shared filesystem with
//! working locks). Keys are restricted to `[A-Za-z0-9._/-]`, no `..`, at most 200 bytes.
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store key {0:?}")]
    Key(String),
    #[error("store {path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error("store value of {0:?} is corrupt")]
    Corrupt(String),
    /// The backend (etcd) failed or did not answer in time.
    #[error("store backend: {0}")]
    Backend(String),
}

/// Proof that this process is the cluster's one active coordinator (see [`Store::lead`]).
/// [`Leadership::held`] turns false for good when the lease is lost (etcd: a keep-alive went
/// unanswered for the lease's TTL); its holder must then stop acting for the cluster.
pub struct Leadership {
    held: Arc<AtomicBool>,
    /// Whatever keeps the lease (a locked file, a keep-alive task's handle).
    _keep: Box<dyn Send + Sync>,
}

impl Leadership {
    pub fn new(held: Arc<AtomicBool>, keep: Box<dyn Send + Sync>) -> Self {
        Leadership { held, _keep: keep }
    }

    pub fn held(&self) -> bool {
        self.held.load(Ordering::SeqCst)
    }
}

/// Opens (creating) `path` and takes an exclusive `flock` on it, held until the returned file
/// is dropped: mutual exclusion between processes on one host (and on shared filesystems
/// whose locks work).
pub fn lock_exclusive(path: &Path) -> std::io::Result<fs::File> {
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    // SAFETY: flock on a descriptor we own; released when `lock` is dropped.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(lock)
}

/// Replaces `path` with `bytes` so that readers see the old or the new contents, never a torn
/// mix: written to `path` + `.tmp~`, synced, then renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_replacing(path, bytes, true, path.with_extension("tmp~"))
}

/// [`write_atomic`] without the sync: for heartbeats, rewritten many times a second, whose
/// readers need an untorn value but not one that survives a crash. The temporary file is
/// this process's own (`.PID.tmp~`): two processes beating on one file (a halting primary
/// and its successor, for a moment) must not rename each other's half-written file away.
pub fn write_heartbeat(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("{}.tmp~", std::process::id()));
    write_replacing(path, bytes, false, tmp)
}

fn write_replacing(path: &Path, bytes: &[u8], sync: bool, tmp: PathBuf) -> std::io::Result<()> {
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    if sync {
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

/// A value and its version (versions start at 1 and grow by one per write; 0 = absent).
pub type Versioned = (Vec<u8>, u64);

pub trait Store: Send + Sync {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;
    /// Writes `value` only if the key's current version is `expected` (0: the key must be
    /// absent). Returns the new version, or `None` if someone else wrote first.
    fn cas(&self, key: &str, expected: u64, value: &[u8]) -> Result<Option<u64>, StoreError>;
    /// Writes unconditionally; returns the new version.
    fn put(&self, key: &str, value: &[u8]) -> Result<u64, StoreError>;
    fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Keys under `prefix` (as given to `put`), sorted.
    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    /// Waits until this process is the one holder of the store's coordinator lease, so that two
    /// coordinators started on one store never act at once: the second waits as a standby and
    /// takes over when the first dies. `who` is shown to waiters; `waiting` is called once, with
    /// the current holder's `who`, if the lease is taken.
    fn lead(&self, who: &str, waiting: &mut dyn FnMut(&str)) -> Result<Leadership, StoreError>;
}

pub(crate) fn check_key(key: &str) -> Result<(), StoreError> {
    let ok = !key.is_empty()
        && key.len() <= 200
        && !key.starts_with('/')
        && !key
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::Key(key.to_string()))
    }
}

/// The embedded store (see the module docs).
pub struct FileStore {
    dir: PathBuf,
}

/// On disk: `VERSION\n` then the value.
fn decode(key: &str, raw: &[u8]) -> Result<Versioned, StoreError> {
    let nl = raw
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| StoreError::Corrupt(key.into()))?;
    let v = std::str::from_utf8(&raw[..nl])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| StoreError::Corrupt(key.into()))?;
    Ok((raw[nl + 1..].to_vec(), v))
}

impl FileStore {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let io = |err| StoreError::Io {
            path: dir.into(),
            err,
        };
        fs::create_dir_all(dir.join("data")).map_err(io)?;
        Ok(FileStore { dir: dir.into() })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join("data").join(key)
    }

    fn io(&self, path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
        let path = path.to_path_buf();
        move |err| StoreError::Io {
            path: path.clone(),
            err,
        }
    }

    /// Runs `f` with the store locked against every other writer.
    fn locked<T>(&self, f: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
        let lp = self.dir.join("lock");
        let _lock = lock_exclusive(&lp).map_err(self.io(&lp))?;
        f()
    }

    fn read(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let p = self.path(key);
        match fs::read(&p) {
            Ok(raw) => decode(key, &raw).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(&p)(e)),
        }
    }

    fn write(&self, key: &str, version: u64, value: &[u8]) -> Result<(), StoreError> {
        let p = self.path(key);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).map_err(self.io(parent))?;
        }
        let mut raw = format!("{version}\n").into_bytes();
        raw.extend_from_slice(value);
        write_atomic(&p, &raw).map_err(self.io(&p))
    }
}

impl Store for FileStore {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        check_key(key)?;
        self.read(key)
    }

    fn cas(&self, key: &str, expected: u64, value: &[u8]) -> Result<Option<u64>, StoreError> {
        check_key(key)?;
        self.locked(|| {
            let current = self.read(key)?.map_or(0, |(_, v)| v);
            if current != expected {
                return Ok(None);
            }
            self.write(key, current + 1, value)?;
            Ok(Some(current + 1))
        })
    }

    fn put(&self, key: &str, value: &[u8]) -> Result<u64, StoreError> {
        check_key(key)?;
        self.locked(|| {
            let v = self.read(key)?.map_or(0, |(_, v)| v) + 1;
            self.write(key, v, value)?;
            Ok(v)
        })
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        check_key(key)?;
        self.locked(|| {
            let p = self.path(key);
            match fs::remove_file(&p) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(self.io(&p)(e)),
            }
        })
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let root = self.dir.join("data");
        let mut out = Vec::new();
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            let entries = match fs::read_dir(&d) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io(&d)(e)),
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(rel) = p.strip_prefix(&root) {
                    let k = rel.to_string_lossy().to_string();
                    if !k.ends_with("tmp~") && k.starts_with(prefix) && check_key(&k).is_ok() {
                        out.push(k);
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The lease is an exclusive `flock` on `DIR/leader.lock`, which the kernel releases when
    /// the holding process dies; `DIR/leader` names the holder.
    fn lead(&self, who: &str, waiting: &mut dyn FnMut(&str)) -> Result<Leadership, StoreError> {
        let lp = self.dir.join("leader.lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lp)
            .map_err(self.io(&lp))?;
        // SAFETY: flock on a descriptor we own; released when `lock` is dropped.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let holder = fs::read_to_string(self.dir.join("leader")).unwrap_or_default();
            waiting(holder.trim());
            // SAFETY: as above.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
                return Err(self.io(&lp)(std::io::Error::last_os_error()));
            }
        }
        let np = self.dir.join("leader");
        write_atomic(&np, who.as_bytes()).map_err(self.io(&np))?;
        Ok(Leadership::new(
            Arc::new(AtomicBool::new(true)),
            Box::new(lock),
        ))
    }
}

/// The contract every backend keeps, as checks that panic on a breach: run against each
/// backend by the unit tests (file store) and `tests/tests/store.rs` (file store and etcd).
#[doc(hidden)]
pub mod conformance {
    use super::*;
    use std::time::{Duration, Instant};

    pub fn versions_cas_list_delete(s: &dyn Store) {
        assert_eq!(s.get("vms/a").unwrap(), None);
        assert_eq!(s.cas("vms/a", 0, b"one").unwrap(), Some(1));
        assert_eq!(s.cas("vms/a", 0, b"two").unwrap(), None, "must be absent");
        assert_eq!(s.cas("vms/a", 1, b"two").unwrap(), Some(2));
        assert_eq!(s.get("vms/a").unwrap(), Some((b"two".to_vec(), 2)));
        assert_eq!(s.put("vms/a", b"three").unwrap(), 3);
        assert_eq!(s.put("hosts/h1", b"x").unwrap(), 1);
        assert_eq!(s.list("vms/").unwrap(), vec!["vms/a".to_string()]);
        assert_eq!(s.list("").unwrap().len(), 2);
        s.delete("vms/a").unwrap();
        s.delete("vms/a").unwrap();
        assert_eq!(s.get("vms/a").unwrap(), None);
        assert_eq!(
            s.cas("vms/a", 3, b"late").unwrap(),
            None,
            "deleted: version 0"
        );
        for bad in ["", "/etc/passwd", "a/../b", "a//b", "a b", "x\n"] {
            assert!(matches!(s.get(bad), Err(StoreError::Key(_))), "{bad:?}");
            assert!(
                matches!(s.put(bad, b"v"), Err(StoreError::Key(_))),
                "{bad:?}"
            );
        }
    }

    pub fn concurrent_cas_has_one_winner_per_version(s: Arc<dyn Store>) {
        for round in 0..10u64 {
            let wins: usize = (0..8)
                .map(|i| {
                    let s = s.clone();
                    std::thread::spawn(move || {
                        s.cas("lock", round, format!("{i}").as_bytes())
                            .unwrap()
                            .is_some() as usize
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .sum();
            assert_eq!(wins, 1, "round {round}");
        }
    }

    /// `a` leads; `b` (another handle on the same store) waits, told that `a` holds the lease,
    /// until `a`'s leadership is dropped, then leads within `handover`.
    pub fn one_leader_at_a_time(a: Arc<dyn Store>, b: Arc<dyn Store>, handover: Duration) {
        let la = a
            .lead("coordinator-a", &mut |_| panic!("nobody leads yet"))
            .unwrap();
        assert!(la.held());
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let tx2 = tx.clone();
            let lb = b
                .lead("coordinator-b", &mut |holder| {
                    tx2.send(format!("waiting for {holder}")).unwrap()
                })
                .unwrap();
            tx.send("leading".into()).unwrap();
            lb.held()
        });
        let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(first, "waiting for coordinator-a");
        assert!(
            rx.recv_timeout(Duration::from_millis(700)).is_err(),
            "b must not lead while a does"
        );
        assert!(la.held());
        let dropped = Instant::now();
        drop(la);
        assert_eq!(rx.recv_timeout(handover).unwrap(), "leading");
        assert!(dropped.elapsed() < handover);
        assert!(t.join().unwrap());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn store(tag: &str) -> FileStore {
        let d = std::env::temp_dir().join(format!("ftvm-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        FileStore::open(&d).unwrap()
    }

    #[test]
    fn file_store_keeps_the_store_contract() {
        conformance::versions_cas_list_delete(&store("basic"));
        conformance::concurrent_cas_has_one_winner_per_version(Arc::new(store("race")));
    }

    /// (The etcd backend runs the same checks in `tests/tests/store.rs`.)
    #[test]
    fn file_lease_has_one_holder_and_passes_on_when_lost() {
        let a = store("lease");
        let b = FileStore::open(&a.dir).unwrap();
        conformance::one_leader_at_a_time(Arc::new(a), Arc::new(b), Duration::from_secs(2));
    }

    proptest::proptest! {
        /// Arbitrary keys are either refused or stay inside the store's directory.
        #[test]
        fn keys_never_escape(key in "[a-z./ -]{0,12}") {
            let s = store("prop");
            if s.put(&key, b"v").is_ok() {
                let p = s.path(&key);
                proptest::prop_assert!(p.starts_with(s.dir.join("data")));
                // (A name like `a..` is an ordinary file name; `..` as a component is not.)
                proptest::prop_assert!(!key.split('/').any(|c| c == ".." || c == "."));
            }
        }
    }
}
