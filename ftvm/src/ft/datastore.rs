//! The shared datastore directory of a protected pair, as an [`ft_core::datastore::Store`]:
//! the records and keys are [`ft_core::datastore`]'s; this module only reads and writes them.
//!
//! The lock is `flock(2)` on `DIR/arbitration.lock` (held by the open file description: a
//! process that dies lets go of it; one that is paused keeps it, and whoever needs it waits —
//! the fence's point). Within one process a mutex orders the threads, since `flock` does not.
use anyhow::{bail, Context, Result};
use coordinator::store::{write_atomic, write_heartbeat};
use ft_core::datastore::{self as contract, Arbitration, Heartbeat, Name, Role, Verdict};
use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

pub struct Datastore {
    dir: PathBuf,
    /// The lock file, open for the process's life.
    lock: Mutex<Option<fs::File>>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Record(#[from] contract::Error),
    #[error("datastore {path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl Datastore {
    /// Opens the datastore `dir`, which must exist (`create`: make it first).
    pub fn open(dir: &Path, create: bool) -> Result<Self> {
        if create {
            fs::create_dir_all(dir)
                .with_context(|| format!("cannot create datastore {}", dir.display()))?;
        } else if !dir.is_dir() {
            bail!(
                "no datastore at {} (give the --datastore of a running pair)",
                dir.display()
            );
        }
        Ok(Datastore {
            dir: dir.to_path_buf(),
            lock: Mutex::new(None),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn keys(&self) -> PathBuf {
        self.dir.join(contract::KEYS)
    }

    fn io(&self, key: &str, what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
        let path = self.dir.join(key);
        move |source| Error::Io { path, what, source }
    }

    /// Starts a new protection session owned by `me`; returns its number.
    pub fn new_session(&self, me: &Name) -> Result<u64, Error> {
        contract::new_session(self, me)
    }

    /// Arbitrates for `session`.
    pub fn arbitrate(&self, session: u64, me: &Name) -> Result<Verdict, Error> {
        contract::arbitrate(self, session, me)
    }

    /// The secondary's FT-link address, if one was named (see [`contract::PEER`]).
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        let text = fs::read(self.dir.join(contract::PEER)).ok()?;
        match contract::parse_peer(&text) {
            Ok(a) => Some(a),
            Err(e) => {
                tracing::warn!("{e}");
                None
            }
        }
    }

    /// Waits until the peer `name` has published its certificate.
    pub fn wait_for_cert(&self, name: &str, timeout: Duration) -> Result<net::PeerCert> {
        let t = Instant::now();
        loop {
            if let Ok(c) = net::identity::load_cert(&self.keys(), name) {
                return Ok(c);
            }
            if t.elapsed() > timeout {
                bail!("the {name} never published its certificate in {} (is it running with the same --datastore?)", self.keys().display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Records the command line that started the secondary.
    pub fn record_secondary_command(&self, argv: &[String]) -> Result<()> {
        fs::write(
            self.dir.join(contract::SECONDARY_COMMAND),
            contract::encode_command(argv),
        )
        .context("recording the secondary's command line")
    }

    /// Turn Off FT: forget the secondary's configuration, so `resume` has nothing to start.
    pub fn forget_secondary(&self) -> Result<()> {
        match fs::remove_file(self.dir.join(contract::SECONDARY_COMMAND)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).context("forgetting the secondary's configuration"),
        }
    }

    /// The command line recorded by [`Datastore::record_secondary_command`].
    pub fn secondary_command(&self) -> Result<Vec<String>> {
        let p = self.dir.join(contract::SECONDARY_COMMAND);
        let s = fs::read(&p).with_context(|| {
            format!(
                "no secondary is configured in this datastore ({} is missing: FT was never on, or was turned off)",
                p.display()
            )
        })?;
        Ok(contract::parse_command(&s)?)
    }

    /// Records that `role` is alive now (beat `seq`).
    pub fn touch_heartbeat(&self, role: Role, seq: u64) -> Result<()> {
        let beat = Heartbeat {
            seq,
            unix_us: crate::now_us(),
        };
        write_heartbeat(
            &self.dir.join(contract::heartbeat_key(role)),
            beat.encode().as_bytes(),
        )
        .context("writing datastore heartbeat")
    }

    /// How long ago `role` last wrote its heartbeat (None: never), by the file's time.
    pub fn heartbeat_age(&self, role: Role) -> Option<Duration> {
        let m = fs::metadata(self.dir.join(contract::heartbeat_key(role)))
            .ok()?
            .modified()
            .ok()?;
        Some(SystemTime::now().duration_since(m).unwrap_or_default())
    }
}

impl contract::Store for Datastore {
    type Error = Error;

    fn locked<T>(&self, f: impl FnOnce(&mut Arbitration) -> T) -> Result<T, Error> {
        let mut lock = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if lock.is_none() {
            let file = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(self.dir.join(contract::LOCK))
                .map_err(self.io(contract::LOCK, "opening the lock"))?;
            *lock = Some(file);
        }
        let fd = lock.as_ref().expect("opened above").as_raw_fd();
        // SAFETY: flock on a descriptor this struct owns; unlocked below on every path.
        if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
            return Err(self.io(contract::LOCK, "locking")(
                std::io::Error::last_os_error(),
            ));
        }
        struct Unlock(i32);
        impl Drop for Unlock {
            fn drop(&mut self) {
                // SAFETY: as above; the descriptor outlives this guard.
                unsafe { libc::flock(self.0, libc::LOCK_UN) };
            }
        }
        let _unlock = Unlock(fd);
        let path = self.dir.join(contract::ARBITRATION);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(self.io(contract::ARBITRATION, "reading")(e)),
        };
        let mut rec = Arbitration::parse(&text)?;
        let before = rec.clone();
        let out = f(&mut rec);
        if rec != before {
            write_atomic(&path, rec.encode().as_bytes())
                .map_err(self.io(contract::ARBITRATION, "writing"))?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ft_core::datastore::Store;

    fn store(tag: &str) -> Datastore {
        let dir = std::env::temp_dir().join(format!("ftvm-ds-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        Datastore::open(&dir, true).unwrap()
    }

    #[test]
    fn concurrent_arbitration_has_exactly_one_winner() {
        let ds = std::sync::Arc::new(store("race"));
        for _ in 0..20 {
            let s = ds.new_session(&Name::new("starter").unwrap()).unwrap();
            let winners: usize = (0..8)
                .map(|i| {
                    let ds = ds.clone();
                    std::thread::spawn(move || {
                        ds.arbitrate(s, &Name::new(format!("p{i}")).unwrap())
                            .unwrap()
                            == Verdict::Won
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap() as usize)
                .sum();
            assert_eq!(winners, 1);
        }
        let _ = fs::remove_dir_all(ds.path());
    }

    /// The fence: a writer holds the lock while writing (it sleeps inside `fenced`); a taker's
    /// arbitration waits for it and runs after it, and the writer owns nothing afterwards.
    #[test]
    fn a_taker_waits_for_a_write_in_flight_under_the_lock() {
        let ds = std::sync::Arc::new(store("fence"));
        let me = Name::new("p").unwrap();
        let s = ds.new_session(&me).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let ds2 = ds.clone();
        let writer = std::thread::spawn(move || {
            contract::fenced(&*ds2, s, &me, || {
                tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(200));
                Instant::now()
            })
            .unwrap()
            .unwrap()
        });
        rx.recv().unwrap();
        let taker = Name::new("s").unwrap();
        let r = contract::take_over(&*ds, s, &taker, Instant::now).unwrap();
        let wrote_at = writer.join().unwrap();
        assert!(r.unwrap() >= wrote_at, "the taker ran after the write");
        assert_eq!(
            contract::fenced(&*ds, s, &Name::new("p").unwrap(), || ()).unwrap(),
            None,
            "the old owner is fenced off"
        );
        let _ = fs::remove_dir_all(ds.path());
    }

    #[test]
    fn a_corrupt_arbitration_record_is_an_error_not_a_guess() {
        let ds = store("corrupt");
        fs::write(ds.path().join(contract::ARBITRATION), "garbage").unwrap();
        let err = ds.locked(|_| ()).unwrap_err().to_string();
        assert!(
            err.contains("corrupt datastore record arbitration"),
            "{err}"
        );
        let _ = fs::remove_dir_all(ds.path());
    }
}
