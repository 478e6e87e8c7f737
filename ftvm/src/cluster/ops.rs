//! The operations CLI: `ftvm vm …`, `ftvm ft …`, `ftvm status`, `ftvm token …`, `ftvm host
//! …`, each one call to the coordinator's HTTPS API. Test Failover and Test Restart Secondary
//! also wait for the outcome and print a timeline.
use super::client::Client;
use super::proto::{FtAction, Reply, Request};
use crate::now_us;
use anyhow::{bail, Result};
use std::time::{Duration, Instant};

/// `s` as one URL path segment (percent-encoded), so a name can never reach another route.
pub fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Sends `req` as its API call.
pub fn send(api: &Client, req: &Request) -> Result<Reply> {
    match req {
        Request::Status { name: None } => api.call("GET", "/api/v1/status", None::<&()>),
        Request::Status { name: Some(n) } => {
            api.call("GET", &format!("/api/v1/status?vm={}", seg(n)), None::<&()>)
        }
        Request::VmList => api.call("GET", "/api/v1/vms", None::<&()>),
        Request::VmCreate { .. } => api.call("POST", "/api/v1/vms", Some(req)),
        Request::VmStart { name } => api.call(
            "POST",
            &format!("/api/v1/vms/{}/start", seg(name)),
            None::<&()>,
        ),
        Request::VmStop { name } => api.call(
            "POST",
            &format!("/api/v1/vms/{}/stop", seg(name)),
            None::<&()>,
        ),
        Request::Ft { name, action } => api.call(
            "POST",
            &format!("/api/v1/vms/{}/ft", seg(name)),
            Some(action),
        ),
        Request::Heartbeat { .. } => bail!("a heartbeat is a host agent's call"),
    }
}

/// Sends `req`; its reply's text; an error reply is an error.
pub fn call(api: &Client, req: &Request) -> Result<String> {
    match send(api, req)? {
        Reply::Ok { text } | Reply::Status { text, .. } => Ok(text),
        Reply::Error { text } => bail!("{text}"),
        Reply::Assignments { .. } => bail!("unexpected reply"),
    }
}

/// The status JSON of one VM.
fn vm_status(addr: &Client, name: &str) -> Result<serde_json::Value> {
    match send(
        addr,
        &Request::Status {
            name: Some(name.into()),
        },
    )? {
        Reply::Status { json, .. } => Ok(json["vms"][0].clone()),
        Reply::Error { text } => bail!("{text}"),
        _ => bail!("unexpected reply"),
    }
}

/// Polls the VM's status until `done` says so (returns the status) or `secs` pass.
fn wait_for(
    addr: &Client,
    name: &str,
    secs: u64,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let t = Instant::now();
    loop {
        let st = vm_status(addr, name)?;
        if done(&st) {
            return Ok(st);
        }
        if t.elapsed() > Duration::from_secs(secs) {
            bail!(
                "{what} did not happen within {secs} s (VM {name}: FT {}, primary on {}, secondary on {})",
                state(&st),
                host(&st, "primary"),
                host(&st, "secondary")
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn state(st: &serde_json::Value) -> &str {
    st["vm"]["ft"]["state"].as_str().unwrap_or("")
}

fn host(st: &serde_json::Value, role: &str) -> String {
    st["vm"][role]["host"].as_str().unwrap_or("-").to_string()
}

/// Waits until the VM is protected (after `ft on`, `vm start`, a failover …).
pub fn wait_protected(addr: &Client, name: &str, secs: u64) -> Result<serde_json::Value> {
    wait_for(addr, name, secs, "protection", |s| state(s) == "protected")
}

/// `ftvm ft test-failover NAME`: fail the primary, then print when the secondary detected
/// it, won the arbitration, went live, and when protection was back.
pub fn test_failover(addr: &Client, name: &str) -> Result<String> {
    // No waiting here: the coordinator refuses at once, saying why, if the VM is not
    // protected (or the caller's token may not do this).
    let before = vm_status(addr, name)?;
    let (old_p, old_s) = (host(&before, "primary"), host(&before, "secondary"));
    let t0 = now_us();
    let reply = call(
        addr,
        &Request::Ft {
            name: name.into(),
            action: FtAction::TestFailover,
        },
    )?;
    let ms = |us: u64| us.saturating_sub(t0) as f64 / 1000.0;
    let live = wait_for(addr, name, 30, "the takeover", |s| {
        host(s, "primary") == old_s
    })?;
    let status: Option<crate::ctl::Status> =
        serde_json::from_value(live["primary_status"].clone()).unwrap_or(None);
    let mut out = format!("{reply}\n");
    if let Some(crate::ctl::Takeover {
        detected_us: d,
        arbitrated_us: a,
        live_us: l,
        ..
    }) = status.and_then(|s| s.takeover)
    {
        out += &format!(
            "  +{:7.1} ms  {old_s} detected the primary's loss (FT-link and datastore heartbeats)\n  +{:7.1} ms  {old_s} won the arbitration\n  +{:7.1} ms  {old_s} is live: the guest runs on from the last committed epoch\n",
            ms(d), ms(a), ms(l)
        );
    } else {
        out += &format!("  +{:7.1} ms  {old_s} is live\n", ms(now_us()));
    }
    let prot = wait_protected(addr, name, 60)?;
    out += &format!(
        "  +{:7.1} ms  re-protected: new secondary on {} synced (old primary host {old_p})",
        ms(now_us()),
        host(&prot, "secondary")
    );
    Ok(out)
}

/// `ftvm ft test-restart-secondary NAME`: fail the secondary, print when a new one is synced.
pub fn test_restart_secondary(addr: &Client, name: &str) -> Result<String> {
    // No waiting here: the coordinator refuses at once, saying why, if the VM is not
    // protected (or the caller's token may not do this).
    let before = vm_status(addr, name)?;
    let old = before["vm"]["secondary"]["id"].as_u64();
    let t0 = Instant::now();
    let reply = call(
        addr,
        &Request::Ft {
            name: name.into(),
            action: FtAction::TestRestartSecondary,
        },
    )?;
    let prot = wait_for(addr, name, 60, "re-protection", |s| {
        state(s) == "protected" && s["vm"]["secondary"]["id"].as_u64() != old
    })?;
    Ok(format!(
        "{reply}\n  +{:7.1} ms  re-protected: new secondary on {} synced",
        t0.elapsed().as_secs_f64() * 1000.0,
        host(&prot, "secondary")
    ))
}

/// `ftvm events`: the events `f` selects, as aligned columns or JSON Lines; with `follow`,
/// then every new one as it comes (asking every half second for those after the last seen).
pub fn events(
    api: &Client,
    f: &coordinator::events::Filter,
    follow: bool,
    json: bool,
) -> Result<u8> {
    use std::io::Write;
    let mut f = f.clone();
    let mut out = std::io::stdout().lock();
    loop {
        let mut q = Vec::new();
        if let Some(v) = &f.vm {
            q.push(format!("vm={}", seg(v)));
        }
        if let Some(h) = &f.host {
            q.push(format!("host={}", seg(h)));
        }
        if let Some(t) = f.since_ms {
            q.push(format!("since={t}"));
        }
        if let Some(a) = f.after {
            q.push(format!("after={a}"));
        }
        if let Some(n) = f.limit {
            q.push(format!("limit={n}"));
        }
        let r: super::api::EventsReply = api.call(
            "GET",
            &format!("/api/v1/events?{}", q.join("&")),
            None::<&()>,
        )?;
        for e in &r.events {
            let line = if json {
                serde_json::to_string(e)?
            } else {
                event_line(e)
            };
            // A closed pipe (`ftvm events | head`) ends the command quietly.
            if writeln!(out, "{line}").is_err() {
                return Ok(0);
            }
        }
        let _ = out.flush();
        if !follow {
            return Ok(0);
        }
        if let Some(last) = r.events.last() {
            f.after = Some(last.seq);
        } else if f.after.is_none() {
            f.after = Some(0);
        }
        f.limit = None;
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One event for people: time, severity, subject, actor, message, cause.
pub fn event_line(e: &coordinator::events::Event) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(e.at_ms);
    let subject = match (&e.vm, &e.host) {
        (Some(v), _) => format!("vm {v}"),
        (None, Some(h)) => format!("host {h}"),
        (None, None) => "cluster".into(),
    };
    format!(
        "{}  {:<7}  {:<29}  {:<12}  {:<12}  {}{}",
        humantime::format_rfc3339_millis(at),
        e.severity.word(),
        e.kind,
        subject,
        e.actor,
        e.message,
        e.cause
            .as_ref()
            .map_or(String::new(), |c| format!(" (cause: {c})"))
    )
}
