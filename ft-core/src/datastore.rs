//! The shared datastore's contract: what a protected pair keeps there, as typed records, and
//! the decisions taken on them — arbitration, and the **fence** every output write passes.
//!
//! Keys, relative to the VM's datastore directory (the file-backed store lives in the binary,
//! the simulator keeps the same records in memory):
//!
//! ```text
//! keys/{primary,secondary}.{crt,key}.der  the FT link's identities (keys 0600)
//! primary.heartbeat                        the live primary's heartbeat (a Heartbeat record;
//!                                          its age is the file's modification time's)
//! arbitration                              the Arbitration record, written only under the lock
//! arbitration.lock                         the lock: arbitration, and every write of guest
//!                                          output to a sink, happen while holding it
//! peer                                     the current secondary's FT-link address (Peer)
//! secondary.cmd                            the command line that starts a secondary (argv,
//!                                          NUL-separated)
//! ```
//!
//! # Ownership
//!
//! Each protection session has one **owner**: the primary that started it, until someone
//! wins the session's arbitration; from then on the winner. Starting a new session makes its
//! starter the owner of the new one, and every older session is over: a process of an older
//! session owns nothing, whatever it believes.
//!
//! # The fence
//!
//! A process can be paused (SIGSTOP, a stalled host) between deciding to write and writing,
//! and resume after someone else took over. So a decision made before the write proves
//! nothing: every write of guest output (the console, network frames) happens inside
//! [`Store::locked`], after [`Arbitration::may_write`] said yes under the same lock
//! ([`fenced`]). A taker's arbitration takes the same lock, so it waits for an in-flight
//! write and then sees it (it measures the sink only after winning, under the lock:
//! [`take_over`]); a writer that resumes after the taker won finds it is no longer the owner
//! and writes nothing.
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// The arbitration record file.
pub const ARBITRATION: &str = "arbitration";
/// The lock of the arbitration record and of every output write.
pub const LOCK: &str = "arbitration.lock";
/// The secondary's FT-link address, as placed by whoever places secondaries.
pub const PEER: &str = "peer";
/// The secondary's command line.
pub const SECONDARY_COMMAND: &str = "secondary.cmd";
/// The link identities' directory.
pub const KEYS: &str = "keys";
/// Longest process name in an arbitration record.
pub const MAX_NAME: usize = 64;
/// Longest argument of a recorded command line.
const MAX_ARG: usize = 4096;

/// The heartbeat file of `role`.
pub fn heartbeat_key(role: Role) -> String {
    format!("{}.heartbeat", role.name())
}

/// A side of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Secondary,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("corrupt datastore record {key}: {why}")]
    Corrupt { key: &'static str, why: String },
    #[error("process name {0:?} is not 1 to 64 of [A-Za-z0-9._-]")]
    BadName(String),
}

fn corrupt(key: &'static str, why: impl Into<String>) -> Error {
    Error::Corrupt {
        key,
        why: why.into(),
    }
}

/// A process's name in the arbitration record (unique per process: pid and start time).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Name(String);

impl Name {
    pub fn new(s: impl Into<String>) -> Result<Self, Error> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() <= MAX_NAME
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if ok && s != "-" {
            Ok(Name(s))
        } else {
            Err(Error::BadName(s))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The arbitration record: the current protection session, who started it, and who won its
/// arbitration (if anyone did yet).
///
/// Text form, one line: `SESSION OWNER WINNER` (`-` for no owner or no winner yet); an
/// absent record is session 0 with neither.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Arbitration {
    pub session: u64,
    /// The process that started the session (a primary).
    pub owner: Option<Name>,
    /// The process that won the session's arbitration.
    pub winner: Option<Name>,
}

/// What [`Arbitration::arbitrate`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// `me` won (now, or before).
    Won,
    /// Someone else won this session.
    Lost,
    /// The session is over: a newer one started.
    Superseded,
}

impl Arbitration {
    /// Parses the record's text (untrusted bytes: a torn or foreign file is an error, never a
    /// guess).
    pub fn parse(text: &[u8]) -> Result<Self, Error> {
        if text.is_empty() {
            return Ok(Arbitration::default());
        }
        let text = std::str::from_utf8(text).map_err(|_| corrupt(ARBITRATION, "not UTF-8"))?;
        let fields: Vec<&str> = text.split_ascii_whitespace().collect();
        let [session, owner, winner] = fields[..] else {
            return Err(corrupt(
                ARBITRATION,
                format!("{} fields, expected SESSION OWNER WINNER", fields.len()),
            ));
        };
        let session = session
            .parse()
            .map_err(|_| corrupt(ARBITRATION, format!("session {session:?}")))?;
        let name = |s: &str| -> Result<Option<Name>, Error> {
            match s {
                "-" => Ok(None),
                s => Name::new(s)
                    .map(Some)
                    .map_err(|e| corrupt(ARBITRATION, e.to_string())),
            }
        };
        Ok(Arbitration {
            session,
            owner: name(owner)?,
            winner: name(winner)?,
        })
    }

    pub fn encode(&self) -> String {
        let name = |n: &Option<Name>| n.as_ref().map_or("-", |n| n.as_str()).to_string();
        format!(
            "{} {} {}\n",
            self.session,
            name(&self.owner),
            name(&self.winner)
        )
    }

    /// `me` starts a new protection session: returns its number. Every older session is over.
    pub fn new_session(&mut self, me: &Name) -> u64 {
        self.session += 1;
        self.owner = Some(me.clone());
        self.winner = None;
        self.session
    }

    /// The atomic test-and-set: `me`, a process of protection session `session`, may go live
    /// only if that session is still the current one and undecided (then `me` becomes its
    /// winner) or already won by `me`.
    pub fn arbitrate(&mut self, session: u64, me: &Name) -> Verdict {
        if self.session != session {
            return Verdict::Superseded;
        }
        match &self.winner {
            None => {
                self.winner = Some(me.clone());
                Verdict::Won
            }
            Some(w) if w == me => Verdict::Won,
            Some(_) => Verdict::Lost,
        }
    }

    /// The fence's test: whether `me`, of session `session`, owns the VM now (see the module
    /// docs): the session is current and `me` won it, or nobody has and `me` started it.
    pub fn may_write(&self, session: u64, me: &Name) -> bool {
        self.session == session
            && match &self.winner {
                Some(w) => w == me,
                None => self.owner.as_ref() == Some(me),
            }
    }

    /// Who owns the VM now, if anyone.
    pub fn current_owner(&self) -> Option<&Name> {
        self.winner.as_ref().or(self.owner.as_ref())
    }
}

/// A store that holds the arbitration record under an exclusive lock.
pub trait Store {
    type Error: From<Error>;
    /// Runs `f` on the arbitration record while holding the store's exclusive lock, and
    /// writes back the record `f` leaves (if changed) before letting go. Whatever else `f`
    /// does (writing a sink) happens while no other process can read or change the record.
    fn locked<T>(&self, f: impl FnOnce(&mut Arbitration) -> T) -> Result<T, Self::Error>;
}

/// `me` starts a new protection session; returns its number.
pub fn new_session<S: Store>(store: &S, me: &Name) -> Result<u64, S::Error> {
    store.locked(|a| a.new_session(me))
}

/// The current session.
pub fn session<S: Store>(store: &S) -> Result<u64, S::Error> {
    store.locked(|a| a.session)
}

/// Arbitrates for `session` (see [`Arbitration::arbitrate`]).
pub fn arbitrate<S: Store>(store: &S, session: u64, me: &Name) -> Result<Verdict, S::Error> {
    store.locked(|a| a.arbitrate(session, me))
}

/// The fence: runs `write` only if `me` owns the VM at this moment, under the lock (see the
/// module docs). `None`: not the owner, nothing written — the caller must halt.
pub fn fenced<S: Store, T>(
    store: &S,
    session: u64,
    me: &Name,
    write: impl FnOnce() -> T,
) -> Result<Option<T>, S::Error> {
    store.locked(|a| a.may_write(session, me).then(write))
}

/// Arbitrates for `session` and, if `me` won, runs `release` under the same lock: a taker
/// measures what the old owner released only once no write of the old owner can be in
/// flight. `Err(verdict)` in the result: lost, `release` not run.
pub fn take_over<S: Store, T>(
    store: &S,
    session: u64,
    me: &Name,
    release: impl FnOnce() -> T,
) -> Result<Result<T, Verdict>, S::Error> {
    store.locked(|a| match a.arbitrate(session, me) {
        Verdict::Won => Ok(release()),
        v => Err(v),
    })
}

/// The live primary's datastore heartbeat (text: `SEQ UNIX_US`). Readers judge its age by
/// when it was written (the file's modification time), not by its content: the clocks of two
/// hosts need not agree, the datastore's clock is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    pub seq: u64,
    pub unix_us: u64,
}

impl Heartbeat {
    pub fn encode(&self) -> String {
        format!("{} {}\n", self.seq, self.unix_us)
    }

    pub fn parse(text: &[u8]) -> Result<Self, Error> {
        let key = "primary.heartbeat";
        let text = std::str::from_utf8(text).map_err(|_| corrupt(key, "not UTF-8"))?;
        let mut it = text.split_ascii_whitespace().map(str::parse::<u64>);
        match (it.next(), it.next(), it.next()) {
            (Some(Ok(seq)), Some(Ok(unix_us)), None) => Ok(Heartbeat { seq, unix_us }),
            _ => Err(corrupt(key, "expected SEQ UNIX_US")),
        }
    }
}

/// The secondary's FT-link address (text: `IP:PORT`).
pub fn parse_peer(text: &[u8]) -> Result<SocketAddr, Error> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| corrupt(PEER, "not an IP:PORT address"))
}

/// A recorded command line: NUL-separated arguments, program first.
pub fn encode_command(argv: &[String]) -> Vec<u8> {
    argv.join("\0").into_bytes()
}

/// Parses a recorded command line: at least a program and one argument, none longer than
/// 4096 bytes, no empty program.
pub fn parse_command(text: &[u8]) -> Result<Vec<String>, Error> {
    let text = std::str::from_utf8(text).map_err(|_| corrupt(SECONDARY_COMMAND, "not UTF-8"))?;
    let argv: Vec<String> = text.split('\0').map(str::to_string).collect();
    if argv.len() < 2 || argv[0].is_empty() || argv.iter().any(|a| a.len() > MAX_ARG) {
        return Err(corrupt(SECONDARY_COMMAND, "not a command line ftvm wrote"));
    }
    Ok(argv)
}

/// How long a secondary that lost its primary on the link keeps waiting while the primary's
/// datastore heartbeat stays fresh (a live primary then wins the arbitration first): this
/// many detection timeouts, and at least [`CONFIRM_MIN`]. A dead or frozen primary's
/// heartbeat goes stale within one timeout, so this bounds only the case of a primary whose
/// process lives but does not act (measured on a loaded host: a live primary starved of CPU
/// for ~250 ms lost a 240 ms wait, a false takeover).
pub const CONFIRM_TIMEOUTS: u32 = 4;
/// The shortest wait for a primary whose datastore heartbeat is fresh.
pub const CONFIRM_MIN: Duration = Duration::from_secs(1);

/// Whether the primary's datastore heartbeat, last written `age` ago (None: never), counts as
/// stale for a detection timeout of `timeout`.
pub fn heartbeat_stale(age: Option<Duration>, timeout: Duration) -> bool {
    age.is_none_or(|a| a >= timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::RefCell;

    fn n(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    #[test]
    fn one_winner_per_session_and_late_sessions_lose() {
        let mut a = Arbitration::default();
        let (p, s) = (n("primary-1"), n("secondary-1"));
        let s1 = a.new_session(&p);
        assert!(a.may_write(s1, &p), "the starter owns an undecided session");
        assert!(!a.may_write(s1, &s));
        assert_eq!(a.arbitrate(s1, &s), Verdict::Won);
        assert_eq!(
            a.arbitrate(s1, &s),
            Verdict::Won,
            "the winner stays the winner"
        );
        assert_eq!(a.arbitrate(s1, &p), Verdict::Lost);
        assert!(!a.may_write(s1, &p), "the old primary is fenced off");
        assert!(a.may_write(s1, &s));
        let s2 = a.new_session(&s);
        assert_eq!(s2, s1 + 1);
        assert_eq!(a.arbitrate(s1, &p), Verdict::Superseded);
        assert!(!a.may_write(s1, &s), "an old session owns nothing");
        assert!(a.may_write(s2, &s));
    }

    #[test]
    fn records_round_trip_and_garbage_is_an_error() {
        let a = Arbitration {
            session: 7,
            owner: Some(n("p-1")),
            winner: None,
        };
        assert_eq!(Arbitration::parse(a.encode().as_bytes()), Ok(a));
        assert_eq!(Arbitration::parse(b""), Ok(Arbitration::default()));
        for bad in [&b"7 p"[..], b"x p -", b"1 - - -", b"1 \xff -", b"1 a/b -"] {
            assert!(Arbitration::parse(bad).is_err(), "{bad:?}");
        }
        let h = Heartbeat {
            seq: 3,
            unix_us: 99,
        };
        assert_eq!(Heartbeat::parse(h.encode().as_bytes()), Ok(h));
        assert!(Heartbeat::parse(b"3").is_err());
        assert_eq!(
            parse_peer(b"10.0.0.2:47000\n").unwrap().to_string(),
            "10.0.0.2:47000"
        );
        assert!(parse_peer(b"nope").is_err());
        let argv = vec!["ftvm".to_string(), "secondary".into()];
        assert_eq!(parse_command(&encode_command(&argv)), Ok(argv));
        assert!(parse_command(b"ftvm").is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_what_parses_round_trips(b in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(a) = Arbitration::parse(&b) {
                prop_assert_eq!(Arbitration::parse(a.encode().as_bytes()), Ok(a));
            }
            let _ = Heartbeat::parse(&b);
            let _ = parse_peer(&b);
            let _ = parse_command(&b);
        }
    }

    /// An in-memory store whose lock is a `RefCell` borrow (one thread).
    struct Mem(RefCell<Arbitration>);
    impl Store for Mem {
        type Error = Error;
        fn locked<T>(&self, f: impl FnOnce(&mut Arbitration) -> T) -> Result<T, Error> {
            Ok(f(&mut self.0.borrow_mut()))
        }
    }

    #[test]
    fn a_fenced_write_runs_only_for_the_owner_and_a_taker_runs_its_release_only_if_it_won() {
        let store = Mem(RefCell::new(Arbitration::default()));
        let (p, s) = (n("p"), n("s"));
        let session = new_session(&store, &p).unwrap();
        assert_eq!(fenced(&store, session, &p, || 1).unwrap(), Some(1));
        assert_eq!(fenced(&store, session, &s, || 2).unwrap(), None);
        assert_eq!(take_over(&store, session, &s, || 3).unwrap(), Ok(3));
        assert_eq!(fenced(&store, session, &p, || 4).unwrap(), None);
        assert_eq!(
            take_over(&store, session, &p, || 5).unwrap(),
            Err(Verdict::Lost)
        );
    }
}
