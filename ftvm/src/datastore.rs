//! The shared datastore directory of a protected pair: keys, heartbeat files, arbitration.
//!
//! ```text
//! DIR/keys/{primary,secondary}.{crt,key}.der   link identities (keys 0600)
//! DIR/primary.heartbeat                        touched by the live primary every 100 ms
//! DIR/arbitration                              created exclusively by whichever side goes
//!                                              live after losing its peer; holds its role
//! ```
use anyhow::{bail, Context, Result};
use std::fs;
use std::io::Write;
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

    /// Starts a new protection session: forgets a previous session's arbitration result.
    pub fn new_session(&self) -> Result<()> {
        match fs::remove_file(self.arbitration()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).context("cannot reset arbitration"),
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
        let p = self.heartbeat(role);
        let tmp = p.with_extension("tmp");
        fs::write(&tmp, format!("{:?}", SystemTime::now()))
            .context("writing datastore heartbeat")?;
        fs::rename(&tmp, &p).context("writing datastore heartbeat")?;
        Ok(())
    }

    /// How long ago `role` last touched its heartbeat (None: never).
    pub fn heartbeat_age(&self, role: &str) -> Option<Duration> {
        let m = fs::metadata(self.heartbeat(role)).ok()?.modified().ok()?;
        Some(SystemTime::now().duration_since(m).unwrap_or_default())
    }

    /// The atomic test-and-set: true if `role` may go live (it created the arbitration file,
    /// or had created it before); false if the other side won.
    pub fn arbitrate(&self, role: &str) -> Result<bool> {
        match fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(self.arbitration())
        {
            Ok(mut f) => {
                f.write_all(role.as_bytes())
                    .context("writing arbitration")?;
                f.sync_all().context("writing arbitration")?;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let winner = fs::read_to_string(self.arbitration()).unwrap_or_default();
                Ok(winner == role)
            }
            Err(e) => Err(e).context("arbitration on the datastore"),
        }
    }
}
