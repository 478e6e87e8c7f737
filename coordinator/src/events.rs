//! The cluster's history: every state change and every operation as an [`Event`] with its
//! wall-clock time, severity, VM or host, actor (an API token's name, a host, or `system`)
//! and cause. Events live in the [`Store`] under `events/<seq>` (so a standby coordinator
//! that takes over serves the same history), the newest [`EventLog::retain`] of them; the
//! coordinator serves them from memory.
//!
//! Sequence numbers only grow (a taking-over coordinator continues after the highest stored
//! one), so a follower asks for "everything after `seq`" and misses nothing that is kept.
use crate::store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// How many events are kept unless told otherwise.
pub const DEFAULT_RETAIN: usize = 5000;

const PREFIX: &str = "events/";

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Severity {
    Info,
    Warning,
    Error,
}

impl Severity {
    pub fn word(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// One thing that happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    /// Position in the history (set when recorded).
    #[serde(default)]
    pub seq: u64,
    /// When (Unix ms, the coordinator's clock).
    pub at_ms: u64,
    pub severity: Severity,
    /// What kind of thing: `vm.failover`, `host.state`, `api.vm-create`, …
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Who: an API token's name, `host:NAME`, or `system` (the coordinator on its own).
    pub actor: String,
    pub message: String,
    /// Why it happened, when that is known and not the message itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// Structured facts (a failover's evidence and times, an operation's arguments).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

impl Event {
    /// An event by `system` now, about nothing in particular yet.
    pub fn new(severity: Severity, kind: &str, message: impl Into<String>) -> Self {
        Event {
            seq: 0,
            at_ms: now_ms(),
            severity,
            kind: kind.into(),
            vm: None,
            host: None,
            actor: "system".into(),
            message: message.into(),
            cause: None,
            details: serde_json::Value::Null,
        }
    }

    pub fn vm(mut self, vm: &str) -> Self {
        self.vm = Some(vm.into());
        self
    }

    pub fn host(mut self, host: &str) -> Self {
        self.host = Some(host.into());
        self
    }

    pub fn actor(mut self, actor: &str) -> Self {
        self.actor = actor.into();
        self
    }

    pub fn cause(mut self, cause: impl Into<String>) -> Self {
        self.cause = Some(cause.into());
        self
    }

    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }
}

/// Which events a reader wants.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// Only events about this VM.
    pub vm: Option<String>,
    /// Only events about this host.
    pub host: Option<String>,
    /// Only events at or after this time (Unix ms).
    pub since_ms: Option<u64>,
    /// Only events after this sequence number (a follower's last one).
    pub after: Option<u64>,
    /// At most this many, the newest.
    pub limit: Option<usize>,
}

impl Filter {
    pub fn matches(&self, e: &Event) -> bool {
        self.vm.as_ref().is_none_or(|v| e.vm.as_ref() == Some(v))
            && self
                .host
                .as_ref()
                .is_none_or(|h| e.host.as_ref() == Some(h))
            && self.since_ms.is_none_or(|t| e.at_ms >= t)
            && self.after.is_none_or(|s| e.seq > s)
    }
}

/// The history: the newest events in memory, every one also in the store.
pub struct EventLog {
    store: Arc<dyn Store>,
    retain: usize,
    inner: Mutex<Inner>,
}

struct Inner {
    next: u64,
    recent: VecDeque<Event>,
    /// Stored keys, oldest first (pruned beyond `retain`).
    keys: VecDeque<String>,
}

fn key(seq: u64) -> String {
    format!("{PREFIX}{seq:016}")
}

impl EventLog {
    /// Loads the kept history from `store` (values that do not parse are skipped: the store
    /// is shared, its contents are not trusted to be well-formed).
    pub fn open(store: Arc<dyn Store>, retain: usize) -> Result<Self, StoreError> {
        let retain = retain.max(1);
        let keys = store.list(PREFIX)?;
        let mut recent = VecDeque::new();
        let mut next = 1;
        for k in keys.iter().skip(keys.len().saturating_sub(retain)) {
            let Some(seq) = k.strip_prefix(PREFIX).and_then(|s| s.parse::<u64>().ok()) else {
                continue;
            };
            next = next.max(seq + 1);
            if let Some((v, _)) = store.get(k)? {
                if let Ok(mut e) = serde_json::from_slice::<Event>(&v) {
                    e.seq = seq;
                    recent.push_back(e);
                }
            }
        }
        Ok(EventLog {
            store,
            retain,
            inner: Mutex::new(Inner {
                next,
                recent,
                keys: keys.into(),
            }),
        })
    }

    pub fn retain(&self) -> usize {
        self.retain
    }

    /// Records `e`; returns its sequence number. The oldest events beyond the retention are
    /// deleted from the store.
    pub fn record(&self, mut e: Event) -> Result<u64, StoreError> {
        let mut g = self.inner.lock().unwrap();
        e.seq = g.next;
        let k = key(e.seq);
        self.store
            .put(&k, &serde_json::to_vec(&e).expect("an event serializes"))?;
        g.next += 1;
        g.keys.push_back(k);
        g.recent.push_back(e.clone());
        while g.recent.len() > self.retain {
            g.recent.pop_front();
        }
        while g.keys.len() > self.retain {
            let old = g.keys.pop_front().expect("non-empty");
            self.store.delete(&old)?;
        }
        Ok(e.seq)
    }

    /// The events `f` wants, oldest first.
    pub fn query(&self, f: &Filter) -> Vec<Event> {
        let g = self.inner.lock().unwrap();
        let mut out: Vec<Event> = g.recent.iter().filter(|e| f.matches(e)).cloned().collect();
        if let Some(n) = f.limit {
            out.drain(..out.len().saturating_sub(n));
        }
        out
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The contract every store backend keeps for the event log (run on the file store here and
/// on etcd by the integration tests).
pub mod conformance {
    use super::*;

    pub fn history_survives_reopening_and_is_bounded(store: Arc<dyn Store>) {
        let log = EventLog::open(store.clone(), 5).unwrap();
        for i in 0..8u64 {
            let e = Event::new(Severity::Info, "test", format!("event {i}")).vm(if i % 2 == 0 {
                "even"
            } else {
                "odd"
            });
            assert_eq!(log.record(e).unwrap(), i + 1);
        }
        let all = log.query(&Filter::default());
        assert_eq!(
            all.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![4, 5, 6, 7, 8],
            "the newest five are kept"
        );
        assert_eq!(store.list(PREFIX).unwrap().len(), 5, "older ones deleted");
        let even = log.query(&Filter {
            vm: Some("even".into()),
            ..Default::default()
        });
        assert!(even.iter().all(|e| e.vm.as_deref() == Some("even")));
        assert_eq!(even.len(), 2);
        let after = log.query(&Filter {
            after: Some(6),
            ..Default::default()
        });
        assert_eq!(after.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![7, 8]);
        let last = log.query(&Filter {
            limit: Some(1),
            ..Default::default()
        });
        assert_eq!(last[0].message, "event 7");
        drop(log);
        // A coordinator taking over: the same history, and numbering goes on.
        let log = EventLog::open(store.clone(), 5).unwrap();
        assert_eq!(log.query(&Filter::default()), all);
        assert_eq!(
            log.record(Event::new(Severity::Warning, "test", "after"))
                .unwrap(),
            9
        );
        // Garbage under the prefix is skipped, not fatal.
        store.put("events/0000000000000099", b"{not json").unwrap();
        let log = EventLog::open(store, 5).unwrap();
        assert!(log
            .query(&Filter::default())
            .iter()
            .all(|e| e.kind == "test"));
        assert_eq!(
            log.record(Event::new(Severity::Info, "t", "x")).unwrap(),
            100
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_store_keeps_the_event_log_contract() {
        let dir = std::env::temp_dir().join(format!("ftvm-events-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = crate::FileStore::open(&dir).unwrap();
        conformance::history_survives_reopening_and_is_bounded(Arc::new(store));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn events_round_trip_and_bad_json_is_an_error() {
        let e = Event::new(Severity::Warning, "vm.failover", "VM web failed over")
            .vm("web")
            .host("h2")
            .cause("h1 is DOWN")
            .details(serde_json::json!({"live_after_ms": 80}));
        let j = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Event>(&j).unwrap(), e);
        assert!(serde_json::from_str::<Event>(r#"{"at_ms":"x"}"#).is_err());
        assert!(serde_json::from_str::<Event>(
            r#"{"at_ms":1,"severity":"bad","kind":"k","actor":"a","message":"m"}"#
        )
        .is_err());
    }
}
