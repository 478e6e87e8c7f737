//! `ftvm-bench ft-cost`: where FT's overhead goes, in the steady state of a long run.
//!
//! `cargo run --release -p ftvm-benches -- ft-cost [--runs N] [--jobs J] [--epoch-ms MS] [--vcpus 1,2]`
//!
//! `ftvm-bench ft` measures the overhead of real pairs on the default `jobs=100` stand-in
//! (~0.27 s at 1 vCPU). This takes the same `dirtier preset=compile-profile` workload ten
//! times longer (`jobs=1000` by default, ~2.7 s) and splits the overhead two ways:
//!
//! - **Stages, in one process, 1 vCPU** (no secondary, no network, no encoding): an epoch
//!   loop at the primary's epoch length adds one piece of the primary's epoch work at a time
//!   (pause and resume only; + vCPU/device state capture; 2 MiB chunk tracking alone — at each
//!   pause the written chunks are taken and write-protected again; everything the primary
//!   does with the guest's memory — the cut under the state capture, then the copy of the
//!   written chunks while the guest runs). Each stage's guest time against the same guest
//!   with no loop, runs interleaved.
//! - **CPU of real pairs** (`ftvm secondary` + `ftvm primary`, defaults): the CPU time of
//!   both processes while the guest ran (sampled from `/proc/PID/stat` every 10 ms; the
//!   window is the guest's own elapsed time, ending when the primary exits) against the CPU
//!   time of `ftvm run --mem-prealloc` over its guest's run. When the guest's vCPUs alone fill
//!   every core of the host, the guest cannot run faster than (guest CPU + replication CPU) /
//!   cores allows, so this CPU ratio is a floor for the slowdown on that host.
use crate::ft::{boot_dirtier, ftvm, guest_args, guest_ms, median, off_command, pair};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use vmm::DirtyTracking;

/// What the in-process epoch loop does at each epoch boundary.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
enum Stage {
    /// No epoch loop: the guest runs undisturbed (memory backed first).
    Off,
    /// Pause all vCPUs and resume them.
    Pause,
    /// Pause, capture the vCPU and device state, resume.
    Capture,
    /// Pause, take the written 2 MiB chunks and write-protect them again, resume.
    Tracking,
    /// Pause; the cut (take the written chunks, protect them, publish their copy) while the
    /// vCPU threads save their state; resume; copy the chunks while the guest runs — what the
    /// FT primary does with guest memory, short of encoding and sending it.
    CutCaptureCopy,
}

impl Stage {
    const ALL: [Stage; 5] = [
        Stage::Off,
        Stage::Pause,
        Stage::Capture,
        Stage::Tracking,
        Stage::CutCaptureCopy,
    ];

    fn label(self) -> &'static str {
        match self {
            Stage::Off => "no epoch loop",
            Stage::Pause => "pause + resume",
            Stage::Capture => "pause + state capture",
            Stage::Tracking => "pause + 2 MiB chunk tracking (take, re-protect)",
            Stage::CutCaptureCopy => "pause + cut + state capture, copy after resume",
        }
    }
}

#[derive(Serialize)]
struct StageResult {
    stage: Stage,
    what: &'static str,
    guest_ms: Vec<u64>,
    /// Write faults the chunk tracking served, per epoch (mean of the runs).
    faults_per_epoch: f64,
    ratio_vs_off: f64,
}

#[derive(Serialize, Default)]
struct CpuResult {
    vcpus: u8,
    guest_ms_off: Vec<u64>,
    guest_ms_ft: Vec<u64>,
    /// CPU ms of `ftvm run --mem-prealloc` over its guest's run.
    cpu_ms_off: Vec<u64>,
    /// CPU ms of the primary and of the secondary over the guest's run.
    cpu_ms_primary: Vec<u64>,
    cpu_ms_secondary: Vec<u64>,
    ratio_guest_ms: f64,
    /// (primary + secondary CPU) / off CPU, medians.
    ratio_cpu: f64,
}

#[derive(Serialize)]
struct Report {
    bench: &'static str,
    command: String,
    machine: crate::Machine,
    workload: String,
    epoch_ms: u64,
    stages_1_vcpu: Vec<StageResult>,
    cpu: Vec<CpuResult>,
}

pub fn run(args: &[String]) -> Result<()> {
    let (mut runs, mut jobs, mut epoch_ms) = (3usize, 1000u64, 50u64);
    let mut vcpu_counts: Vec<u8> = vec![1, 2];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = it.next().context("--runs N")?.parse()?,
            "--jobs" => jobs = it.next().context("--jobs J")?.parse()?,
            "--epoch-ms" => epoch_ms = it.next().context("--epoch-ms MS")?.parse()?,
            "--vcpus" => {
                vcpu_counts = it
                    .next()
                    .context("--vcpus 1,2")?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    if runs == 0 || epoch_ms == 0 {
        bail!("--runs and --epoch-ms must be at least 1");
    }
    let bin = ftvm()?;
    let cmdline = format!("preset=compile-profile jobs={jobs}");

    let mut ms = vec![Vec::new(); Stage::ALL.len()];
    let mut faults = vec![0f64; Stage::ALL.len()];
    for r in 0..runs {
        for (i, &stage) in Stage::ALL.iter().enumerate() {
            eprintln!("stages: run {r}, {}", stage.label());
            let (m, f) = stage_run(&cmdline, stage, epoch_ms)?;
            ms[i].push(m);
            faults[i] += f / runs as f64;
        }
    }
    let base = median(&ms[0]);
    let stages: Vec<StageResult> = Stage::ALL
        .iter()
        .enumerate()
        .map(|(i, &stage)| StageResult {
            stage,
            what: stage.label(),
            ratio_vs_off: median(&ms[i]) / base,
            guest_ms: ms[i].clone(),
            faults_per_epoch: faults[i],
        })
        .collect();

    let mut cpu = Vec::new();
    for &vcpus in &vcpu_counts {
        let mut c = CpuResult {
            vcpus,
            ..Default::default()
        };
        let vc = ["--vcpus".to_string(), vcpus.to_string()];
        for r in 0..runs {
            eprintln!("cpu: {vcpus} vCPUs, run {r}");
            let child = off_command(&bin, vcpus, &cmdline)
                .stdout(Stdio::piped())
                .spawn()?;
            let (out, _, samples) = sample_until_exit(child, None)?;
            let gm = guest_ms(&out)?;
            c.guest_ms_off.push(gm);
            c.cpu_ms_off.push(window(&samples, gm).0);

            let boot = guest_args("dirtier", &cmdline);
            let p = pair(&bin, "cost", &boot, &vc)?;
            let secondary_pid = p.secondary.id();
            let (_, err, samples) = sample_until_exit(p.primary, Some(secondary_pid))?;
            let mut secondary = p.secondary;
            let _ = secondary.wait();
            let console = std::fs::read_to_string(p.dir.join("console.txt"))?;
            let _ = std::fs::remove_dir_all(&p.dir);
            // A primary prints its summary only if the pair stayed protected to the end; a
            // pair that split measured an unprotected guest.
            if !err.lines().any(|l| l.contains("summary")) {
                bail!("the pair did not stay protected to the end:\n{err}");
            }
            let gm = guest_ms(&console)?;
            let (pri, sec) = window(&samples, gm);
            c.guest_ms_ft.push(gm);
            c.cpu_ms_primary.push(pri);
            c.cpu_ms_secondary.push(sec);
        }
        c.ratio_guest_ms = median(&c.guest_ms_ft) / median(&c.guest_ms_off);
        let both: Vec<u64> = c
            .cpu_ms_primary
            .iter()
            .zip(&c.cpu_ms_secondary)
            .map(|(a, b)| a + b)
            .collect();
        c.ratio_cpu = median(&both) / median(&c.cpu_ms_off);
        cpu.push(c);
    }

    let report = Report {
        bench: "ft-cost",
        command: crate::command_line("ft-cost", args),
        machine: crate::machine(),
        workload: format!("dirtier {cmdline} (stand-in for a kernel compile), 128 MiB"),
        epoch_ms,
        stages_1_vcpu: stages,
        cpu,
    };
    let json = crate::write_results("ft-cost", &report)?;
    print_report(&report);
    eprintln!("wrote {}", json.display());
    Ok(())
}

fn print_report(r: &Report) {
    println!("Machine: {}", r.machine);
    println!("Command: `{}`\n", r.command);
    println!(
        "**Stages** (one process, 1 vCPU, {} ms epochs, no secondary): {}, guest ms, median of {}\n",
        r.epoch_ms,
        r.workload,
        r.stages_1_vcpu[0].guest_ms.len()
    );
    println!("| at each epoch boundary | guest ms (runs) | vs no loop | chunk faults/epoch |");
    println!("|---|---|---|---|");
    for s in &r.stages_1_vcpu {
        println!(
            "| {} | {} ({:?}) | {:.3}× | {:.1} |",
            s.what,
            median(&s.guest_ms),
            s.guest_ms,
            s.ratio_vs_off,
            s.faults_per_epoch
        );
    }
    println!(
        "\n**CPU of real pairs** (defaults; both processes on this host), over the guest's run, median of {}\n",
        r.cpu.first().map_or(0, |c| c.guest_ms_off.len())
    );
    println!(
        "| vCPUs | guest ms: off / FT on | ratio | CPU ms: off / primary + secondary | CPU ratio |"
    );
    println!("|---|---|---|---|---|");
    for c in &r.cpu {
        println!(
            "| {} | {} / {} | {:.2}× | {} / {} + {} | {:.2}× |",
            c.vcpus,
            median(&c.guest_ms_off),
            median(&c.guest_ms_ft),
            c.ratio_guest_ms,
            median(&c.cpu_ms_off),
            median(&c.cpu_ms_primary),
            median(&c.cpu_ms_secondary),
            c.ratio_cpu
        );
    }
}

/// One in-process run of `stage`: (guest ms, chunk faults per epoch).
fn stage_run(cmdline: &str, stage: Stage, epoch_ms: u64) -> Result<(u64, f64)> {
    let (mut vm, cap) = boot_dirtier(1, cmdline, DirtyTracking::Off)?;
    // As the FT primary (and `ftvm run --mem-prealloc`): memory backed before the guest runs.
    vmm::memory::populate(vm.memory())?;
    let wp = match stage {
        Stage::Tracking | Stage::CutCaptureCopy => {
            let wp = vmm::wp::BackgroundCopy::new(vm.memory())?;
            wp.track()?;
            Some(wp)
        }
        _ => None,
    };
    let every = (stage != Stage::Off).then(|| Duration::from_millis(epoch_ms));
    let mut epochs = 0u64;
    // Reused from epoch to epoch, as the primary's page buffer is.
    let mut buf: Vec<u8> = Vec::new();
    vm.resume()?;
    loop {
        if let Some(ev) = vm.wait_event(every) {
            vm.finish(ev)?;
            break;
        }
        vm.pause()?;
        epochs += 1;
        match (stage, &wp) {
            (Stage::Capture, _) => {
                std::hint::black_box(vm.capture()?);
            }
            (Stage::Tracking, Some(wp)) => {
                std::hint::black_box(wp.take_written(&[])?);
            }
            (Stage::CutCaptureCopy, Some(wp)) => {
                let need = wp.written_chunks() * vmm::wp::CHUNK as usize;
                if buf.capacity() < need {
                    buf = Vec::with_capacity(need + need / 2);
                }
                let spare = std::mem::take(&mut buf);
                let (_, cut) = vm.capture_with(|| wp.cut(&[], spare))?;
                let (_, copying) = cut?;
                vm.resume()?;
                let copied = copying.finish()?;
                buf = copied.pages;
                buf.clear();
                continue;
            }
            _ => {}
        }
        vm.resume()?;
    }
    let faults = wp.map_or(0, |w| w.faults());
    Ok((guest_ms(&cap.text())?, faults as f64 / epochs.max(1) as f64))
}

/// (time, CPU ms of the main process, CPU ms of the other) every 10 ms.
type Sample = (Instant, u64, u64);

/// Samples the CPU time of `child` (and of `other`, if given) until `child` exits; returns
/// its stdout and stderr (where piped) and the samples, the last taken when it had exited.
fn sample_until_exit(
    mut child: Child,
    other: Option<u32>,
) -> Result<(String, String, Vec<Sample>)> {
    fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<String> {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut s);
            }
            s
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let mut samples = Vec::new();
    let mut last = (0, 0);
    loop {
        // Read before checking for exit: once reaped, a process has no stat to read.
        let now = (
            cpu_ms(child.id()).unwrap_or(last.0),
            other.and_then(cpu_ms).unwrap_or(last.1),
        );
        last = now;
        samples.push((Instant::now(), now.0, now.1));
        if child.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = stdout.join().unwrap_or_default();
    let err = stderr.join().unwrap_or_default();
    Ok((out, err, samples))
}

/// CPU ms (user + system, all threads) of a live process.
fn cpu_ms(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the command.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(ticks * 1000 / hz)
}

/// CPU ms of each sampled process over the last `guest_ms` before the main one exited.
fn window(samples: &[Sample], guest_ms: u64) -> (u64, u64) {
    let Some(&(end, a1, b1)) = samples.last() else {
        return (0, 0);
    };
    let start = end.checked_sub(Duration::from_millis(guest_ms));
    let &(_, a0, b0) = samples
        .iter()
        .find(|s| start.is_none_or(|t| s.0 >= t))
        .unwrap_or(&samples[0]);
    (a1.saturating_sub(a0), b1.saturating_sub(b0))
}
