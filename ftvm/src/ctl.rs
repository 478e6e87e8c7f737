//! `ftvm ctl`: control of a running pair through Unix sockets in the datastore.
//!
//! Each side serves `DIR/ctl-<role>.sock`. A request is one line (at most 64 bytes, a known
//! command word); the reply is one line of JSON, a versioned [`Reply`]: the side's typed
//! [`Status`], an operation's result, or an error. Anything else is refused without touching
//! the VM.
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

const MAX_REQUEST: usize = 64;

/// A forwarded request and where its reply line goes.
pub type Forward = mpsc::Sender<(Request, mpsc::Sender<Outcome>)>;

/// What `ftvm ctl` can ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Status,
    TestFailover,
    TestRestartSecondary,
    Suspend,
    FtOff,
}

impl Request {
    /// Parses one request line (untrusted bytes).
    pub fn parse(line: &[u8]) -> Result<Self, String> {
        if line.len() > MAX_REQUEST {
            return Err(format!("request longer than {MAX_REQUEST} bytes"));
        }
        let text = std::str::from_utf8(line).map_err(|_| "request is not UTF-8".to_string())?;
        match text.trim() {
            "status" => Ok(Request::Status),
            "test-failover" => Ok(Request::TestFailover),
            "test-restart-secondary" => Ok(Request::TestRestartSecondary),
            "suspend" => Ok(Request::Suspend),
            "ft-off" => Ok(Request::FtOff),
            other => Err(format!(
                "unknown request {:?}",
                other.chars().take(32).collect::<String>()
            )),
        }
    }

    pub fn word(self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::TestFailover => "test-failover",
            Request::TestRestartSecondary => "test-restart-secondary",
            Request::Suspend => "suspend",
            Request::FtOff => "ft-off",
        }
    }
}

/// The version of the control socket's replies ([`Reply`]); a reader refuses others.
pub const VERSION: u32 = 1;

/// The upper bounds (µs) of the epoch-pause histogram in [`Status::pause_buckets`].
pub const PAUSE_BOUNDS_US: [u64; 10] = [
    250, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 500_000,
];

/// Which side of the pair answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
#[schema(as = PairRole)]
pub enum Role {
    #[default]
    Primary,
    Secondary,
}

impl Role {
    pub fn word(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }
}

/// When a side that took over detected the primary's loss, won the arbitration and had the
/// guest running (Unix µs), and why it took over (how long the FT link was silent, how
/// stale the primary's datastore heartbeat was, the arbitration's outcome).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Takeover {
    pub detected_us: u64,
    pub arbitrated_us: u64,
    pub live_us: u64,
    #[serde(default)]
    pub evidence: String,
}

/// A side's status: what `ftvm ctl status` prints, what the host agent reports to the
/// coordinator, and what the coordinator decides on. One JSON object on the wire.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[schema(as = PairStatus)]
pub struct Status {
    pub role: Role,
    pub protected: bool,
    pub epoch: u64,
    pub lag_epochs: u64,
    pub bytes_sent: u64,
    pub bytes_per_sec: u64,
    pub last_pause_us: u64,
    /// Protection sessions started after the first (a new secondary joined).
    pub sessions: u64,
    /// Device-input events recorded (primary) or committed (secondary).
    pub events: u64,
    /// Primary: output bytes (console and frames) held until their epoch is acknowledged.
    #[serde(default)]
    pub held_bytes: u64,
    /// Primary: epoch pauses so far, as a histogram: how many lasted at most each of
    /// [`PAUSE_BOUNDS_US`] (cumulative), their count and their sum.
    #[serde(default)]
    pub pause_buckets: Vec<u64>,
    #[serde(default)]
    pub pause_count: u64,
    #[serde(default)]
    pub pause_sum_us: u64,
    /// The answering process (filled in when the reply is made).
    #[serde(default)]
    pub pid: u32,
    /// After a takeover: its times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub takeover: Option<Takeover>,
    /// A primary's current (or last) secondary's FT-link address.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

impl Status {
    /// Counts one epoch pause of `us` µs in the histogram.
    pub fn observe_pause(&mut self, us: u64) {
        if self.pause_buckets.len() != PAUSE_BOUNDS_US.len() {
            self.pause_buckets = vec![0; PAUSE_BOUNDS_US.len()];
        }
        for (b, bound) in self.pause_buckets.iter_mut().zip(PAUSE_BOUNDS_US) {
            if us <= bound {
                *b += 1;
            }
        }
        self.pause_count += 1;
        self.pause_sum_us += us;
    }

    /// A primary not protected (yet): `note` says why, `peer` names its secondary if any.
    pub fn unprotected_primary(note: &str, peer: String) -> Self {
        Status {
            role: Role::Primary,
            protected: false,
            note: note.into(),
            peer,
            ..Default::default()
        }
    }

    /// One line of `key=value` pairs, for people (`ftvm ctl status`).
    pub fn line(&self) -> String {
        format!(
            "role={} protected={} epoch={} lag_epochs={} bytes_sent={} bytes_per_sec={} last_pause_us={} sessions={} events={} pid={}{}{}{}",
            self.role.word(),
            self.protected,
            self.epoch,
            self.lag_epochs,
            self.bytes_sent,
            self.bytes_per_sec,
            self.last_pause_us,
            self.sessions,
            self.events,
            self.pid,
            if self.peer.is_empty() {
                String::new()
            } else {
                format!(" peer={}", self.peer)
            },
            match &self.takeover {
                Some(t) => format!(
                    " detected_us={} arbitrated_us={} live_us={}",
                    t.detected_us, t.arbitrated_us, t.live_us
                ),
                None => String::new(),
            },
            if self.note.is_empty() { String::new() } else { format!(" note={:?}", self.note) }
        )
    }
}

/// What a request got: a status, an operation's result, or why it was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Status(Status),
    Done(String),
    Error(String),
}

/// One reply line on the control socket (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub version: u32,
    pub outcome: Outcome,
}

impl Reply {
    pub fn new(outcome: Outcome) -> Self {
        Reply {
            version: VERSION,
            outcome,
        }
    }

    pub fn line(&self) -> String {
        serde_json::to_string(self).expect("a reply serializes")
    }

    /// Parses a reply line (bytes from another process: checked, never trusted).
    pub fn parse(line: &str) -> Result<Outcome> {
        let r: Reply = serde_json::from_str(line.trim())
            .with_context(|| format!("not a control reply: {:?}", truncate(line, 80)))?;
        if r.version != VERSION {
            bail!(
                "control reply version {} (this ftvm speaks {VERSION})",
                r.version
            );
        }
        Ok(r.outcome)
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

pub fn socket_path(datastore: &Path, role: &str) -> PathBuf {
    datastore.join(format!("ctl-{role}.sock"))
}

/// Serves requests on `path` in a thread. `kill_on`: the request that makes this side die at
/// once, as its host would (`test-failover` for the primary, `test-restart-secondary` for the
/// secondary).
/// `forward`: where requests other than status and `kill_on` go (the primary's epoch loop),
/// each with a channel for its outcome.
pub fn serve(
    path: PathBuf,
    status: Arc<Mutex<Status>>,
    kill_on: Option<Request>,
    forward: Option<Forward>,
) -> Result<()> {
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("cannot serve control socket {}", path.display()))?;
    std::thread::Builder::new()
        .name("ctl".into())
        .spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut line = Vec::new();
                let mut r = BufReader::new((&conn).take(MAX_REQUEST as u64 + 1));
                let _ = r.read_until(b'\n', &mut line);
                let mut w = &conn;
                let outcome = match Request::parse(&line) {
                    Ok(Request::Status) => {
                        let mut st = status.lock().unwrap().clone();
                        st.pid = std::process::id();
                        Outcome::Status(st)
                    }
                    Ok(r) if Some(r) == kill_on => {
                        let _ = writeln!(
                            w,
                            "{}",
                            Reply::new(Outcome::Done("failing now".into())).line()
                        );
                        let _ = w.flush();
                        // SAFETY: sending SIGKILL to ourselves has no memory-safety implications.
                        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                        continue;
                    }
                    Ok(r) => match &forward {
                        Some(f) => {
                            let (tx, rx) = mpsc::channel();
                            match f.send((r, tx)) {
                                Ok(()) => {
                                    rx.recv_timeout(Duration::from_secs(30))
                                        .unwrap_or_else(|_| {
                                            Outcome::Error(format!("{} timed out", r.word()))
                                        })
                                }
                                Err(_) => {
                                    Outcome::Error(format!("{} cannot be done now", r.word()))
                                }
                            }
                        }
                        None => Outcome::Error(format!("{} does not go to this side", r.word())),
                    },
                    Err(e) => Outcome::Error(e),
                };
                let _ = writeln!(w, "{}", Reply::new(outcome).line());
            }
        })?;
    Ok(())
}

/// Sends `req` to `role`'s control socket and returns what was done (waiting up to 5 s).
pub fn request(datastore: &Path, role: &str, req: Request) -> Result<String> {
    match request_within(datastore, role, req, Duration::from_secs(5))? {
        Outcome::Done(text) => Ok(text),
        Outcome::Status(st) => Ok(st.line()),
        Outcome::Error(e) => Err(anyhow!("{role}: {e}")),
    }
}

/// `role`'s status (waiting up to `timeout`).
pub fn status(datastore: &Path, role: &str, timeout: Duration) -> Result<Status> {
    match request_within(datastore, role, Request::Status, timeout)? {
        Outcome::Status(st) => Ok(st),
        Outcome::Done(text) => bail!("{role} answered {text:?} to a status request"),
        Outcome::Error(e) => Err(anyhow!("{role}: {e}")),
    }
}

/// Sends `req`, waiting at most `timeout` for the reply (a frozen process accepts the
/// connection in the kernel's backlog but never answers).
pub fn request_within(
    datastore: &Path,
    role: &str,
    req: Request,
    timeout: Duration,
) -> Result<Outcome> {
    let path = socket_path(datastore, role);
    let mut s = UnixStream::connect(&path)
        .with_context(|| format!("no {role} answers on {}", path.display()))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    writeln!(s, "{}", req.word())?;
    let mut reply = String::new();
    // A reply is a status of a few hundred bytes: more is not a reply.
    BufReader::new(s.take(64 << 10)).read_line(&mut reply)?;
    if reply.trim().is_empty() {
        bail!("{role} closed the control connection without answering");
    }
    Reply::parse(&reply).with_context(|| format!("{role}'s control socket"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_requests_parse_and_anything_else_is_refused() {
        assert_eq!(Request::parse(b"status\n"), Ok(Request::Status));
        assert_eq!(Request::parse(b"test-failover"), Ok(Request::TestFailover));
        assert!(Request::parse(b"rm -rf /").is_err());
        assert!(Request::parse(&[0xff, 0xfe]).is_err());
        assert!(Request::parse(&[b'a'; 65]).is_err());
    }

    #[test]
    fn replies_round_trip_and_bad_ones_are_errors() {
        let st = Status {
            role: Role::Secondary,
            protected: true,
            epoch: 7,
            pid: 42,
            takeover: Some(Takeover {
                detected_us: 1,
                arbitrated_us: 2,
                live_us: 3,
                evidence: "primary lost: no heartbeat for 61 ms".into(),
            }),
            note: "a \"quoted\" note".into(),
            ..Default::default()
        };
        let line = Reply::new(Outcome::Status(st.clone())).line();
        assert!(!line.contains('\n'));
        assert_eq!(Reply::parse(&line).unwrap(), Outcome::Status(st.clone()));
        assert!(st
            .line()
            .starts_with("role=secondary protected=true epoch=7 "));
        assert!(st
            .line()
            .contains(" pid=42 detected_us=1 arbitrated_us=2 live_us=3 "));
        let future = line.replace("\"version\":1", "\"version\":2");
        assert!(Reply::parse(&future)
            .unwrap_err()
            .to_string()
            .contains("version 2"));
        assert!(Reply::parse("role=primary protected=true").is_err());
        for bytes in crate::pseudo_random_inputs(0x1357_9bdf_2468_ace0, 20_000, 120) {
            let _ = Reply::parse(&String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_only_known_words_pass() {
        for bytes in crate::pseudo_random_inputs(0x9e37_79b9_7f4a_7c15, 100_000, 80) {
            if let Ok(r) = Request::parse(&bytes) {
                assert_eq!(std::str::from_utf8(&bytes).unwrap().trim(), r.word());
            }
        }
    }
}
