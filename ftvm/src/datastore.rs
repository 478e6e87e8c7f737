//! The shared datastore directory of a protected pair: keys, heartbeat files, arbitration.
//!
//! ```text
//! DIR/keys/{primary,secondary}.{crt,key}.der   link identities (keys 0600)
//! DIR/primary.heartbeat                        touched by the live primary every 100 ms
//! DIR/arbitration                              created exclusively by whichever side goes
//!                                              live after losing its peer; holds its role
//! ```
use anyhow::{bail, Context, Result};
use coordinator::store::{lock_exclusive, write_atomic, write_heartbeat};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

pub struct Datastore {
    dir: PathBuf,
}

impl Datastore {
    pub fn open(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir)
            .with_context(|| format!("cannot create datastore {}", dir.display()))?;
        Ok(Datastore {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn keys(&self) -> PathBuf {
        self.dir.join("keys")
    }

    fn arbitration(&self) -> PathBuf {
        self.dir.join("arbitration")
    }

    fn heartbeat(&self, role: &str) -> PathBuf {
        self.dir.join(format!("{role}.heartbeat"))
    }

    /// Runs `f` on the arbitration record (`SESSION WINNER`, `-` while undecided) under an
    /// exclusive lock, writing back what it returns.
    fn with_record<T>(&self, f: impl FnOnce(&mut (u64, String)) -> T) -> Result<T> {
        let _lock = lock_exclusive(&self.dir.join("arbitration.lock"))
            .context("locking the arbitration")?;
        let text = fs::read_to_string(self.arbitration()).unwrap_or_default();
        let mut it = text.split_whitespace();
        let mut rec = match (it.next().and_then(|s| s.parse().ok()), it.next()) {
            (Some(s), Some(w)) => (s, w.to_string()),
            _ => (0, "-".to_string()),
        };
        let before = rec.clone();
        let out = f(&mut rec);
        if rec != before {
            write_atomic(
                &self.arbitration(),
                format!("{} {}", rec.0, rec.1).as_bytes(),
            )
            .context("writing arbitration")?;
        }
        Ok(out)
    }

    /// Starts a new protection session (the live primary, with a new secondary): returns its
    /// number. Its arbitration is undecided; every older session's is over, so a process of
    /// an older session that wakes up late can only lose.
    pub fn new_session(&self) -> Result<u64> {
        self.with_record(|r| {
            *r = (r.0 + 1, "-".into());
            r.0
        })
    }

    /// The secondary's FT-link address, if one was named (`peer` file: written by whoever
    /// places secondaries; a primary looking for a new secondary reads it).
    pub fn peer(&self) -> Option<std::net::SocketAddr> {
        fs::read_to_string(self.dir.join("peer"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The current protection session.
    pub fn session(&self) -> Result<u64> {
        self.with_record(|r| r.0)
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

    /// Records the command line that started the secondary (NUL-separated).
    pub fn record_secondary_command(&self, argv: &[String]) -> Result<()> {
        fs::write(self.dir.join("secondary.cmd"), argv.join("\0"))
            .context("recording the secondary's command line")
    }

    /// Turn Off FT: forget the secondary's configuration, so `resume` has nothing to start.
    pub fn forget_secondary(&self) -> Result<()> {
        match fs::remove_file(self.dir.join("secondary.cmd")) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).context("forgetting the secondary's configuration"),
        }
    }

    /// The command line recorded by [`Datastore::record_secondary_command`].
    pub fn secondary_command(&self) -> Result<Vec<String>> {
        let p = self.dir.join("secondary.cmd");
        let s = fs::read_to_string(&p).with_context(|| {
            format!(
                "no secondary is configured in this datastore ({} is missing: FT was never on, or was turned off)",
                p.display()
            )
        })?;
        let argv: Vec<String> = s.split('\0').map(str::to_string).collect();
        if argv.len() < 2 || argv.iter().any(|a| a.len() > 4096) {
            bail!("{} is not a command line ftvm wrote", p.display());
        }
        Ok(argv)
    }

    /// Records that `role` is alive now.
    pub fn touch_heartbeat(&self, role: &str) -> Result<()> {
        let now = format!("{:?}", SystemTime::now());
        write_heartbeat(&self.heartbeat(role), now.as_bytes())
            .context("writing datastore heartbeat")
    }

    /// How long ago `role` last touched its heartbeat (None: never).
    pub fn heartbeat_age(&self, role: &str) -> Option<Duration> {
        let m = fs::metadata(self.heartbeat(role)).ok()?.modified().ok()?;
        Some(SystemTime::now().duration_since(m).unwrap_or_default())
    }

    /// The atomic test-and-set: `me` (a process of protection session `session`) may go
    /// live only if that session is still the current one and undecided (then `me` becomes
    /// its winner) or already won by `me`. Everyone else loses.
    pub fn arbitrate(&self, session: u64, me: &str) -> Result<bool> {
        self.with_record(|r| {
            if r.0 != session {
                return false;
            }
            if r.1 == "-" {
                r.1 = me.to_string();
            }
            r.1 == me
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(tag: &str) -> Datastore {
        let dir = std::env::temp_dir().join(format!("ftvm-ds-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        Datastore::open(&dir).unwrap()
    }

    #[test]
    fn one_winner_per_session_and_late_sessions_lose() {
        let ds = store("arb");
        let s1 = ds.new_session().unwrap();
        assert!(ds.arbitrate(s1, "secondary-1").unwrap());
        assert!(
            ds.arbitrate(s1, "secondary-1").unwrap(),
            "the winner stays the winner"
        );
        assert!(!ds.arbitrate(s1, "primary-1").unwrap());
        // The winner starts a new session with a new secondary; the old primary wakes late.
        let s2 = ds.new_session().unwrap();
        assert_eq!(s2, s1 + 1);
        assert_eq!(ds.session().unwrap(), s2);
        assert!(
            !ds.arbitrate(s1, "primary-1").unwrap(),
            "an old session can only lose"
        );
        assert!(ds.arbitrate(s2, "secondary-1").unwrap());
        let _ = fs::remove_dir_all(ds.path());
    }

    #[test]
    fn concurrent_arbitration_has_exactly_one_winner() {
        let ds = std::sync::Arc::new(store("race"));
        for _ in 0..20 {
            let s = ds.new_session().unwrap();
            let winners: usize = (0..8)
                .map(|i| {
                    let ds = ds.clone();
                    std::thread::spawn(move || ds.arbitrate(s, &format!("p{i}")).unwrap())
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap() as usize)
                .sum();
            assert_eq!(winners, 1);
        }
        let _ = fs::remove_dir_all(ds.path());
    }
}
