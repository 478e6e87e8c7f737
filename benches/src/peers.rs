//! `ftvm-bench peers`: the same guest images under ftvm and under QEMU/KVM, side by side.
//!
//! `cargo run --release -p ftvm-benches -- peers [--runs N]` (needs `qemu-system-x86_64`,
//! Debian's `qemu-system-x86`)
//!
//! - **Boot to exit**: the `counter` guest printing one line, as a whole process: `ftvm run`
//!   against `qemu-system-x86_64 -accel kvm` booting the very same PVH ELF (`-kernel`, with
//!   QEMU's `isa-debug-exit` at ftvm's exit port 0x501). QEMU's time includes its firmware.
//! - **Guest workload**: `dirtier preset=compile-profile` (the kernel-compile stand-in), 1 vCPU,
//!   the guest's own elapsed time (TSC), same image and checksum under both. (Not at 2 vCPUs
//!   yet: the test guests count CPUs from the MP table, and QEMU's firmware provided none the
//!   guest found in this PVH boot path, so it ran on one CPU under QEMU.)
//! - **QEMU COLO** (the FT peer) protecting the same images: guest time under COLO vs plain
//!   QEMU, failover time and what the console shows across it (see [`crate::colo`]).
use crate::median_f64 as median;
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

#[derive(Serialize)]
struct Pair {
    what: String,
    ftvm: Vec<f64>,
    qemu: Vec<f64>,
    ratio_ftvm_to_qemu: f64,
}

#[derive(Serialize)]
struct Report {
    bench: &'static str,
    command: String,
    machine: crate::Machine,
    qemu: String,
    results: Vec<Pair>,
    colo: crate::colo::ColoReport,
}

fn image(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(format!("{name}.elf"));
    std::fs::write(&p, guests::by_name(name).context("guest")?.elf)?;
    Ok(p)
}

pub(crate) fn elapsed_ms(out: &str) -> Result<f64> {
    out.split_whitespace()
        .find_map(|w| w.strip_prefix("elapsed_ms="))
        .context(format!("no elapsed_ms in {out:?}"))?
        .parse()
        .context("elapsed_ms")
}

/// Runs `elf` under QEMU/KVM; returns (seconds, serial output).
pub(crate) fn qemu(elf: &Path, cmdline: &str, vcpus: u8) -> Result<(f64, String)> {
    let t = Instant::now();
    let o = qemu_command(elf, cmdline, vcpus)
        .args(["-serial", "stdio"])
        .output()
        .context("running qemu-system-x86_64 (Debian: qemu-system-x86)")?;
    let secs = t.elapsed().as_secs_f64();
    // isa-debug-exit: status = (code << 1) | 1; the guests exit 0.
    if o.status.code() != Some(1) {
        bail!(
            "QEMU ended with {}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok((secs, String::from_utf8_lossy(&o.stdout).to_string()))
}

/// QEMU/KVM booting the PVH image `elf` as ftvm does (128 MiB, no devices but the
/// `isa-debug-exit` at ftvm's exit port); the caller adds the serial console.
pub(crate) fn qemu_command(elf: &Path, cmdline: &str, vcpus: u8) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-accel", "kvm", "-m", "128", "-smp"])
        .arg(vcpus.to_string())
        .args([
            "-display",
            "none",
            "-nodefaults",
            "-no-reboot",
            "-nic",
            "none",
        ])
        .arg("-kernel")
        .arg(elf)
        .args(["-append", cmdline])
        .args(["-device", "isa-debug-exit,iobase=0x501,iosize=1"]);
    c
}

fn ftvm(bin: &Path, guest: &str, cmdline: &str, vcpus: u8) -> Result<(f64, String)> {
    let t = Instant::now();
    let o = Command::new(bin)
        .args(["run", "--guest", guest, "--cmdline", cmdline, "--vcpus"])
        .arg(vcpus.to_string())
        .output()?;
    let secs = t.elapsed().as_secs_f64();
    if !o.status.success() {
        bail!("ftvm run ended with {}", o.status);
    }
    Ok((secs, String::from_utf8_lossy(&o.stdout).to_string()))
}

pub fn run(args: &[String]) -> Result<()> {
    let mut runs = 5usize;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = it.next().context("--runs N")?.parse()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    let bin = std::env::current_exe()?
        .parent()
        .context("exe dir")?
        .join("ftvm");
    let dir = std::env::temp_dir().join(format!("ftvm-bench-peers-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let version = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_else(|e| format!("not available: {e}"));
    let counter = image(&dir, "counter")?;
    let dirtier = image(&dir, "dirtier")?;
    let mut boot = Pair {
        what: "counter count=1: process start → exit (ms)".into(),
        ftvm: vec![],
        qemu: vec![],
        ratio_ftvm_to_qemu: 0.0,
    };
    let mut work: Vec<Pair> = [1u8]
        .iter()
        .map(|n| Pair {
            what: format!("dirtier compile-profile jobs=100, {n} vCPU(s): guest ms"),
            ftvm: vec![],
            qemu: vec![],
            ratio_ftvm_to_qemu: 0.0,
        })
        .collect();
    let cl = "preset=compile-profile jobs=100";
    for r in 0..runs {
        eprintln!("peers run {r}");
        boot.ftvm.push(ftvm(&bin, "counter", "count=1", 1)?.0 * 1e3);
        boot.qemu.push(qemu(&counter, "count=1", 1)?.0 * 1e3);
        for (p, n) in work.iter_mut().zip([1u8]) {
            let (_, f) = ftvm(&bin, "dirtier", cl, n)?;
            let (_, q) = qemu(&dirtier, cl, n)?;
            let sum = |s: &str| {
                s.split_whitespace()
                    .find(|w| w.starts_with("checksum="))
                    .map(str::to_string)
            };
            if sum(&f) != sum(&q) {
                bail!("the guest's checksum differs: ftvm {f:?}, QEMU {q:?}");
            }
            p.ftvm.push(elapsed_ms(&f)?);
            p.qemu.push(elapsed_ms(&q)?);
        }
    }
    // (A COLO run of this workload takes about two minutes here: at most 2 of them.)
    let colo = crate::colo::measure(&dir, &counter, &dirtier, cl, runs.min(2));
    let _ = std::fs::remove_dir_all(&dir);
    let mut results = vec![boot];
    results.extend(work);
    for p in &mut results {
        p.ratio_ftvm_to_qemu = median(&p.ftvm) / median(&p.qemu);
    }
    let report = Report {
        bench: "peers",
        command: crate::command_line("peers", args),
        machine: crate::machine(),
        qemu: version,
        results,
        colo,
    };
    let out = crate::write_results("peers", &report)?;
    println!(
        "Machine: {}\nCommand: `{}`\nQEMU: {}\n",
        report.machine, report.command, report.qemu
    );
    println!("| same guest image (median of {runs}) | ftvm | QEMU/KVM | ftvm ÷ QEMU |");
    println!("|---|---|---|---|");
    for p in &report.results {
        println!(
            "| {} | {:.0} | {:.0} | {:.2} |",
            p.what,
            median(&p.ftvm),
            median(&p.qemu),
            p.ratio_ftvm_to_qemu
        );
    }
    let c = &report.colo;
    println!(
        "\nQEMU COLO ({} ms checkpoints), same dirtier image, process wall ms: QEMU {:?}, COLO {:?} → {:.2}×",
        c.checkpoint_delay_ms, c.wall_ms_qemu, c.wall_ms_colo, c.ratio_colo_vs_qemu
    );
    println!(
        "COLO failover (kill → secondary's next line, detection excluded): {:?} ms; console gap \
         lines (0 seamless, <0 repeated, >0 lost): {:?}",
        c.failover_ms, c.console_gap_lines
    );
    for n in &c.notes {
        println!("note: {n}");
    }
    eprintln!("wrote {}", out.display());
    Ok(())
}
