//! `ftvm demo`: the embedded default. A coordinator and three host agents on this machine (the
//! hosts share loopback and a datastore directory), an FT-protected `counter` VM, its status,
//! Test Failover and Test Restart Secondary with their timelines, and a check that the guest's
//! console holds every line exactly once.
use super::ops;
use super::proto::{FtAction, Request};
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the demo's processes (each agent with its process group: its VMMs) on drop.
struct Procs(Vec<(Child, bool)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (c, group) in self.0.iter_mut().rev() {
            if *group {
                // SAFETY: signals the agent's own process group (agents call setpgid).
                unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(exe: &Path, args: &[&str], log: &Path) -> Result<Child> {
    Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(File::create(log)?)
        .stderr(File::create(log.with_extension("err"))?)
        .spawn()
        .with_context(|| format!("starting ftvm {}", args.join(" ")))
}

/// Checks that `console` is `1`..`n`, one per line, each once; returns n.
pub fn check_counter_console(text: &str) -> Result<u64> {
    let mut n = 0u64;
    for line in text.lines() {
        n += 1;
        if line != n.to_string() {
            bail!("console line {n} is {line:?}: output lost or repeated");
        }
    }
    Ok(n)
}

pub fn run(dir: Option<PathBuf>) -> Result<u8> {
    let t0 = Instant::now();
    let dir = dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("ftvm-demo-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let exe = std::env::current_exe()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let d = dir.display().to_string();
    println!(
        "ftvm demo: a coordinator and hosts h1, h2, h3 on this machine (state and logs in {d})"
    );
    let init = std::process::Command::new(&exe)
        .args(["coordinator", "init", "--dir", &d, "--coordinator", &addr])
        .output()?;
    if !init.status.success() {
        bail!(
            "`ftvm coordinator init` failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
    }
    let admin = super::client::ClientFile::load(&dir.join("pki/admin.toml"))?;
    let ca = dir.join("pki/ca.pem");
    let api = super::client::Client::new(&addr, &std::fs::read_to_string(&ca)?, admin.token, None)?;
    println!(
        "cluster CA and admin token created ({d}/pki; the CLI uses them with \
         FTVM_CONFIG={d}/pki/admin.toml)"
    );
    let mut procs = Procs(vec![]);
    procs.0.push((
        spawn(
            &exe,
            &["coordinator", "--dir", &d, "--listen", &addr],
            &dir.join("coordinator.log"),
        )?,
        false,
    ));
    for h in ["h1", "h2", "h3"] {
        let join: super::api::Secret = (|| {
            let t = Instant::now();
            loop {
                match api.call(
                    "POST",
                    "/api/v1/join-tokens",
                    Some(&super::api::NewJoin { ttl_s: 600 }),
                ) {
                    Err(e)
                        if e.downcast_ref::<super::client::ApiError>().is_none()
                            && t.elapsed() < Duration::from_secs(20) =>
                    {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    r => return r,
                }
            }
        })()
        .with_context(|| format!("a join token for {h} (logs in {d})"))?;
        let state = dir.join(format!("agent-{h}"));
        procs.0.push((
            spawn(
                &exe,
                &[
                    "host-agent",
                    "--name",
                    h,
                    "--ip",
                    "127.0.0.1",
                    "--coordinator",
                    &addr,
                    "--ca",
                    &ca.display().to_string(),
                    "--join",
                    &join.token,
                    "--state-dir",
                    &state.display().to_string(),
                ],
                &dir.join(format!("agent-{h}.log")),
            )?,
            true,
        ));
    }
    let t = Instant::now();
    loop {
        let up = ops::call(&api, &Request::Status { name: None })
            .map(|s| s.matches(": up").count())
            .unwrap_or(0);
        if up == 3 {
            break;
        }
        if t.elapsed() > Duration::from_secs(20) {
            bail!("the hosts did not all register within 20 s (logs in {d})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let step = |what: &str| println!("\n== {what} (+{:.1} s)", t0.elapsed().as_secs_f64());
    step("Create an FT-protected VM and start it");
    println!(
        "{}",
        ops::call(
            &api,
            &Request::VmCreate {
                name: "demo".into(),
                guest: Some("counter".into()),
                kernel: None,
                initrd: None,
                disk_mib: None,
                tap: None,
                mac: None,
                cmdline: "count=1000000 rate=50".into(),
                vcpus: 1,
                mem_mib: 64,
                ft: true,
            },
        )?
    );
    println!(
        "{}",
        ops::call(
            &api,
            &Request::VmStart {
                name: "demo".into()
            }
        )?
    );
    ops::wait_protected(&api, "demo", 60).with_context(|| format!("logs in {d}"))?;
    println!("{}", ops::call(&api, &Request::Status { name: None })?);
    step("Test Failover");
    println!("{}", ops::test_failover(&api, "demo")?);
    step("Test Restart Secondary");
    println!("{}", ops::test_restart_secondary(&api, "demo")?);
    step("Status");
    println!("{}", ops::call(&api, &Request::Status { name: None })?);
    step("Turn Off FT and stop the VM");
    println!(
        "{}",
        ops::call(
            &api,
            &Request::Ft {
                name: "demo".into(),
                action: FtAction::Off,
            },
        )?
    );
    println!(
        "{}",
        ops::call(
            &api,
            &Request::VmStop {
                name: "demo".into()
            }
        )?
    );
    std::thread::sleep(Duration::from_millis(300));
    step("Events of the demo VM (ftvm events --vm demo)");
    ops::events(
        &api,
        &coordinator::events::Filter {
            vm: Some("demo".into()),
            limit: Some(100),
            ..Default::default()
        },
        false,
        false,
    )?;
    let console = std::fs::read_to_string(dir.join("vms/demo/console.txt"))?;
    let n = check_counter_console(&console)?;
    println!(
        "\nconsole: 1..{n}, every line exactly once, across a failover and a secondary restart"
    );
    println!("demo finished in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(0)
}
