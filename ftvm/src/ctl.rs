//! `ftvm ctl`: control of a running pair through Unix sockets in the datastore.
//!
//! Each side serves `DIR/ctl-<role>.sock`. A request is one line (at most 64 bytes, a known
//! command word); the reply is one line of `key=value` pairs, or `error: …`. Anything else is
//! refused without touching the VM.
use anyhow::{anyhow, bail, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

const MAX_REQUEST: usize = 64;

/// A forwarded request and where its reply line goes.
pub type Forward = mpsc::Sender<(Request, mpsc::Sender<String>)>;

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

/// A side's status, as `ftvm ctl status` prints it.
#[derive(Debug, Clone, Default)]
pub struct Status {
    pub role: &'static str,
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
    /// After a takeover: when (Unix µs) this side detected the primary's loss, won the
    /// arbitration, and had the guest running.
    pub takeover_us: Option<(u64, u64, u64)>,
    /// A primary's current (or last) secondary's FT-link address.
    pub peer: String,
    pub note: String,
}

impl Status {
    /// A primary not protected (yet): `note` says why, `peer` names its secondary if any.
    pub fn unprotected_primary(note: &str, peer: String) -> Self {
        Status {
            role: "primary",
            protected: false,
            note: note.into(),
            peer,
            ..Default::default()
        }
    }

    pub fn line(&self) -> String {
        format!(
            "role={} protected={} epoch={} lag_epochs={} bytes_sent={} bytes_per_sec={} last_pause_us={} sessions={} events={} pid={}{}{}{}",
            self.role,
            self.protected,
            self.epoch,
            self.lag_epochs,
            self.bytes_sent,
            self.bytes_per_sec,
            self.last_pause_us,
            self.sessions,
            self.events,
            std::process::id(),
            if self.peer.is_empty() {
                String::new()
            } else {
                format!(" peer={}", self.peer)
            },
            match self.takeover_us {
                Some((d, a, l)) => format!(" detected_us={d} arbitrated_us={a} live_us={l}"),
                None => String::new(),
            },
            if self.note.is_empty() { String::new() } else { format!(" note={:?}", self.note) }
        )
    }
}

/// A field `key=value` of a status line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

pub fn socket_path(datastore: &Path, role: &str) -> PathBuf {
    datastore.join(format!("ctl-{role}.sock"))
}

/// Serves requests on `path` in a thread. `kill_on`: the request that makes this side die at
/// once, as its host would (`test-failover` for the primary, `test-restart-secondary` for the
/// secondary).
/// `forward`: where requests other than status and `kill_on` go (the primary's epoch loop),
/// each with a channel for the reply line.
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
                let reply = match Request::parse(&line) {
                    Ok(Request::Status) => status.lock().unwrap().line(),
                    Ok(r) if Some(r) == kill_on => {
                        let _ = writeln!(w, "ok: failing now");
                        let _ = w.flush();
                        // SAFETY: sending SIGKILL to ourselves has no memory-safety implications.
                        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                        continue;
                    }
                    Ok(r) => match &forward {
                        Some(f) => {
                            let (tx, rx) = mpsc::channel();
                            match f.send((r, tx)) {
                                Ok(()) => rx
                                    .recv_timeout(Duration::from_secs(30))
                                    .unwrap_or_else(|_| format!("error: {} timed out", r.word())),
                                Err(_) => format!("error: {} cannot be done now", r.word()),
                            }
                        }
                        None => format!("error: {} does not go to this side", r.word()),
                    },
                    Err(e) => format!("error: {e}"),
                };
                let _ = writeln!(w, "{reply}");
            }
        })?;
    Ok(())
}

/// Sends `req` to `role`'s control socket and returns the reply line (waiting up to 5 s).
pub fn request(datastore: &Path, role: &str, req: Request) -> Result<String> {
    request_within(datastore, role, req, Duration::from_secs(5))
}

/// As [`request`], waiting at most `timeout` for the reply (a frozen process accepts the
/// connection in the kernel's backlog but never answers).
pub fn request_within(
    datastore: &Path,
    role: &str,
    req: Request,
    timeout: Duration,
) -> Result<String> {
    let path = socket_path(datastore, role);
    let mut s = UnixStream::connect(&path)
        .with_context(|| format!("no {role} answers on {}", path.display()))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    writeln!(s, "{}", req.word())?;
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply)?;
    let reply = reply.trim().to_string();
    if reply.is_empty() {
        bail!("{role} closed the control connection without answering");
    }
    if let Some(e) = reply.strip_prefix("error: ") {
        return Err(anyhow!("{role}: {e}"));
    }
    Ok(reply)
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
    fn arbitrary_bytes_never_panic_and_only_known_words_pass() {
        for bytes in crate::pseudo_random_inputs(0x9e37_79b9_7f4a_7c15, 100_000, 80) {
            if let Ok(r) = Request::parse(&bytes) {
                assert_eq!(std::str::from_utf8(&bytes).unwrap().trim(), r.word());
            }
        }
    }
}
