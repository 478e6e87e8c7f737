//! `ftvm-bench kernel-compile`: `make -jN` of a Linux kernel inside a Linux guest, FT on vs
//! off — the figure vSphere FT published (5 % for a kernel compile).
//!
//! The guest is built by `guests/linux/build-kcompile.sh` (Debian's kernel + an initramfs with
//! gcc, make and the `linux-source` tree); its init prints `KCOMPILE elapsed_ms=T` on the
//! serial console after the build and ends the VM through ftvm's exit device.
//!
//! **It cannot run on a PVM host** (this project's development machines): PVM emulates guest
//! kernel-mode code ~5000× slower, so the guest kernel would not even finish booting in useful
//! time. There the benchmark says so, records why in `results/kernel-compile.json`, and runs
//! its stand-in instead: `dirtier preset=compile-profile` (a user-mode workload with a
//! compile's memory-dirtying profile), labelled as the stand-in everywhere.
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Serialize)]
struct Report {
    bench: &'static str,
    command: String,
    machine: crate::Machine,
    /// Whether the real kernel compile ran.
    ran_kernel_compile: bool,
    /// Why not, if it did not.
    why_not: Option<String>,
    /// What was measured: "linux make -jN" or the stand-in's name.
    workload: String,
    vcpus: u8,
    guest_ms_off: Vec<u64>,
    guest_ms_ft: Vec<u64>,
    ratio_ft_vs_off: f64,
}

pub fn run(args: &[String]) -> Result<()> {
    let (mut kernel, mut initrd) = (None::<PathBuf>, None::<PathBuf>);
    let (mut vcpus, mut runs, mut mem_mib) = (4u8, 3usize, 4096u64);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--kernel" => kernel = Some(it.next().context("--kernel BZIMAGE")?.into()),
            "--initrd" => initrd = Some(it.next().context("--initrd INITRAMFS")?.into()),
            "--vcpus" => vcpus = it.next().context("--vcpus N")?.parse()?,
            "--runs" => runs = it.next().context("--runs N")?.parse()?,
            "--mem-mib" => mem_mib = it.next().context("--mem-mib M")?.parse()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    let bin = crate::ft::ftvm()?;
    let machine = crate::machine();
    let pvm = machine.kvm_flavour.starts_with("kvm_pvm");
    let mut report = Report {
        bench: "kernel-compile",
        command: crate::command_line("kernel-compile", args),
        machine,
        ran_kernel_compile: false,
        why_not: None,
        workload: String::new(),
        vcpus,
        guest_ms_off: vec![],
        guest_ms_ft: vec![],
        ratio_ft_vs_off: 0.0,
    };
    let real = match (&kernel, &initrd) {
        (Some(k), Some(i)) if !pvm => Some((k.clone(), i.clone())),
        (Some(_), Some(_)) => {
            report.why_not = Some(
                "this host's KVM is PVM (kvm_pvm): guest kernel-mode code is emulated ~5000x \
                 slower, so a Linux guest cannot boot, let alone compile, in useful time"
                    .into(),
            );
            None
        }
        _ => {
            report.why_not = Some(if pvm {
                "this host's KVM is PVM (kvm_pvm): a Linux guest cannot run here in useful time; \
                 no --kernel/--initrd given either (guests/linux/build-kcompile.sh builds them)"
                    .into()
            } else {
                "no --kernel/--initrd given (guests/linux/build-kcompile.sh builds them)".into()
            });
            None
        }
    };
    if let Some((k, i)) = real {
        report.ran_kernel_compile = true;
        report.workload = format!("linux make -j{vcpus} (guests/linux/build-kcompile.sh)");
        let boot: Vec<String> = vec![
            "--kernel".into(),
            k.display().to_string(),
            "--initrd".into(),
            i.display().to_string(),
            "--cmdline".into(),
            format!("console=ttyS0 quiet kcompile_jobs={vcpus}"),
            "--vcpus".into(),
            vcpus.to_string(),
            "--mem-mib".into(),
            mem_mib.to_string(),
        ];
        for r in 0..runs {
            eprintln!("kernel compile run {r}: FT off");
            report.guest_ms_off.push(kcompile_off(&bin, &boot)?);
            eprintln!("kernel compile run {r}: FT on");
            let (console, _, _) = crate::ft::ft_run_boot(&bin, &boot, &[])?;
            report.guest_ms_ft.push(kcompile_ms(&console)?);
        }
    } else {
        let why = report.why_not.clone().unwrap_or_default();
        eprintln!("kernel compile: cannot run here: {why}");
        eprintln!(
            "kernel compile: running the STAND-IN instead: dirtier preset=compile-profile \
             ({vcpus} vCPUs), FT on vs off"
        );
        report.workload = "STAND-IN: dirtier preset=compile-profile (not a kernel compile)".into();
        let cmdline = "preset=compile-profile".to_string();
        let vc = ["--vcpus".to_string(), vcpus.to_string()];
        for r in 0..runs {
            eprintln!("stand-in run {r}");
            report
                .guest_ms_off
                .push(crate::ft::off(&bin, vcpus, &cmdline)?);
            let boot: Vec<String> = ["--guest", "dirtier", "--cmdline", &cmdline]
                .map(String::from)
                .to_vec();
            let (console, _, _) = crate::ft::ft_run_boot(&bin, &boot, &vc)?;
            report.guest_ms_ft.push(crate::ft::guest_ms(&console)?);
        }
    }
    let med = |v: &[u64]| crate::median_f64(&v.iter().map(|x| *x as f64).collect::<Vec<_>>());
    report.ratio_ft_vs_off = med(&report.guest_ms_ft) / med(&report.guest_ms_off).max(1.0);
    let path = crate::write_results("kernel-compile", &report)?;
    println!(
        "{}: FT on / off = {:.2}x (median of {runs}; off {:?} ms, on {:?} ms){}",
        report.workload,
        report.ratio_ft_vs_off,
        report.guest_ms_off,
        report.guest_ms_ft,
        report
            .why_not
            .as_ref()
            .map_or(String::new(), |w| format!("\nkernel compile not run: {w}"))
    );
    println!("wrote {}", path.display());
    Ok(())
}

/// `ftvm run` of the kernel-compile guest: the build's time as the guest reports it.
fn kcompile_off(bin: &Path, boot: &[String]) -> Result<u64> {
    let out = Command::new(bin).arg("run").args(boot).output()?;
    let console = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "the kernel-compile guest failed ({}); console tail: {}",
            out.status,
            console.chars().rev().take(2000).collect::<String>()
        );
    }
    kcompile_ms(&console)
}

/// `KCOMPILE elapsed_ms=T` from the guest's console.
fn kcompile_ms(console: &str) -> Result<u64> {
    console
        .lines()
        .find_map(|l| l.trim().strip_prefix("KCOMPILE elapsed_ms="))
        .and_then(|v| v.trim().parse().ok())
        .context("the guest never printed `KCOMPILE elapsed_ms=` (did the build fail?)")
}
