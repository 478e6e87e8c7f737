//! `ftvm host-agent`: one per host. Sends the coordinator a heartbeat with a report of its
//! processes every [`Config::interval`], starts the `ftvm primary | secondary | run` processes
//! the reply assigns to this host and kills those no longer assigned.
//!
//! The agent makes itself a process-group leader, so its VMM processes share its group:
//! killing the group is what a dying host does to all of them.
use super::proto::{self, Assignment, ProcReport, Reply, Request};
use crate::ctl;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Config {
    pub name: String,
    /// This host's address for FT links.
    pub ip: String,
    pub coordinator: String,
    pub interval: Duration,
}

struct Proc {
    child: Child,
    vm: String,
    datastore: String,
    exit: Option<Option<i32>>,
}

/// How long the agent waits for a process's status: a frozen VMM (its own, or the VM's other
/// side, whose socket is in the same datastore) must not delay the host's report past the
/// coordinator's host timeout, which would make this host look unreachable.
const STATUS_WAIT: Duration = Duration::from_millis(300);

/// The status line of the ctl socket that `pid` serves in `datastore`, if any.
fn status_of(datastore: &str, pid: u32) -> Option<String> {
    ["primary", "secondary"].iter().find_map(|role| {
        let line = ctl::request_within(
            Path::new(datastore),
            role,
            ctl::Request::Status,
            STATUS_WAIT,
        )
        .ok()?;
        (ctl::field(&line, "pid")? == pid.to_string()).then_some(line)
    })
}

pub fn run(cfg: Config) -> Result<u8> {
    // SAFETY: setpgid(0, 0) only changes this process's group.
    unsafe { libc::setpgid(0, 0) };
    let exe = std::env::current_exe().context("finding the ftvm binary")?;
    let mut procs: HashMap<u64, Proc> = HashMap::new();
    let mut told = false;
    // The datastore heartbeat runs on its own thread, so a coordinator call stuck in a
    // network timeout never delays it: it is how the coordinator tells an isolated host
    // (alive) from a failed one.
    let beat_file: Arc<Mutex<Option<PathBuf>>> = Arc::default();
    let (bf, name, interval) = (beat_file.clone(), cfg.name.clone(), cfg.interval);
    std::thread::Builder::new()
        .name("ds-heartbeat".into())
        .spawn(move || {
            let mut beats = 0u64;
            loop {
                let f = bf.lock().unwrap().clone();
                if let Some(f) = f {
                    beats += 1;
                    if let Some(d) = f.parent() {
                        let _ = std::fs::create_dir_all(d);
                    }
                    let r = coordinator::store::write_heartbeat(&f, beats.to_string().as_bytes());
                    if let Err(e) = r {
                        if beats % 50 == 1 {
                            eprintln!(
                                "ftvm host-agent {name}: datastore heartbeat {}: {e}",
                                f.display()
                            );
                        }
                    }
                }
                std::thread::sleep(interval);
            }
        })?;
    eprintln!(
        "ftvm host-agent {}: reporting to {}",
        cfg.name, cfg.coordinator
    );
    loop {
        let mut report = Vec::new();
        for (id, p) in procs.iter_mut() {
            if p.exit.is_none() {
                if let Ok(Some(st)) = p.child.try_wait() {
                    p.exit = Some(st.code());
                    eprintln!(
                        "ftvm host-agent {}: process {id} (VM {}) ended: {st}",
                        cfg.name, p.vm
                    );
                }
            }
            report.push(ProcReport {
                id: *id,
                vm: p.vm.clone(),
                running: p.exit.is_none(),
                exit: p.exit.flatten(),
                status: p
                    .exit
                    .is_none()
                    .then(|| status_of(&p.datastore, p.child.id()))
                    .flatten(),
            });
        }
        let req = Request::Heartbeat {
            host: cfg.name.clone(),
            ip: cfg.ip.clone(),
            report,
        };
        match proto::call(&cfg.coordinator, &req) {
            Ok(Reply::Assignments {
                procs: assigned,
                heartbeat_file,
            }) => {
                told = false;
                if let Some(f) = heartbeat_file {
                    *beat_file.lock().unwrap() = Some(PathBuf::from(f));
                }
                apply(&cfg, &exe, &mut procs, &assigned)?;
            }
            Ok(other) => eprintln!("ftvm host-agent {}: unexpected reply {other:?}", cfg.name),
            Err(e) => {
                // Keep everything running: the pairs fail over without the coordinator.
                if !told {
                    eprintln!("ftvm host-agent {}: {e:#}; retrying", cfg.name);
                    told = true;
                }
            }
        }
        std::thread::sleep(cfg.interval);
    }
}

fn apply(
    cfg: &Config,
    exe: &Path,
    procs: &mut HashMap<u64, Proc>,
    assigned: &[Assignment],
) -> Result<()> {
    for a in assigned {
        if procs.contains_key(&a.id) || !a.start {
            continue;
        }
        std::fs::create_dir_all(&a.datastore)?;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(Path::new(&a.datastore).join(format!("proc-{}.log", a.id)))?;
        let child = Command::new(exe)
            .args(&a.argv)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {:?}", a.argv))?;
        eprintln!(
            "ftvm host-agent {}: started process {} (VM {}): ftvm {}",
            cfg.name,
            a.id,
            a.vm,
            a.argv.join(" ")
        );
        procs.insert(
            a.id,
            Proc {
                child,
                vm: a.vm.clone(),
                datastore: a.datastore.clone(),
                exit: None,
            },
        );
    }
    let keep: Vec<u64> = assigned.iter().map(|a| a.id).collect();
    procs.retain(|id, p| {
        if keep.contains(id) {
            return true;
        }
        if p.exit.is_none() {
            eprintln!(
                "ftvm host-agent {}: stopping process {id} (VM {})",
                cfg.name, p.vm
            );
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        false
    });
    Ok(())
}
