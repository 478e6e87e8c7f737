//! `ftvm-bench`: benchmark harnesses. Results are JSON under `benches/results/` plus a
//! Markdown table on stdout, each with the machine it ran on and the command that made it.
//!
//! `cargo run --release -p ftvm-benches -- foundation [--runs N] [--sizes 64,256,1024]`
//!
//! measures, per guest size:
//! - **start to first guest instruction**: from `Vmm::boot` (KVM VM creation, memory, loading,
//!   vCPU setup) to the guest's first port write, which a synthetic 64-bit boot payload makes
//!   with its second instruction; also for a whole `ftvm run` process, and to the first
//!   console byte of the PVH `counter` guest (which includes the guest's own CPL0 stub);
//! - **save / restore** of the full VM state, for a VM as booted (mostly zero pages, which
//!   the state file does not store) and one whose RAM was filled with data (worst case);
//!   save includes the final fsync; restore ends when the VM is ready to run;
//! - **dirty-page harvest**, KVM dirty bitmap (`KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG`)
//!   against the dirty ring (collect + `KVM_RESET_DIRTY_RINGS`), side by side, with the guest
//!   idle or dirtying 5 000 / 50 000 pages/s.
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::{BootSource, DirtyTracking, VmConfig, VmEvent, Vmm};

/// mov $0x501,%dx; xor %al,%al; out %al,(%dx); 1: hlt; jmp 1b
const EXIT_AT_ENTRY: &[u8] = &[0x66, 0xba, 0x01, 0x05, 0x30, 0xc0, 0xee, 0xf4, 0xeb, 0xfd];

#[derive(Serialize)]
struct Stats {
    runs: usize,
    p50_ms: f64,
    p90_ms: f64,
    min_ms: f64,
    max_ms: f64,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let pick = |q: f64| ms(v[((v.len() - 1) as f64 * q).round() as usize]);
    Stats {
        runs: v.len(),
        p50_ms: pick(0.5),
        p90_ms: pick(0.9),
        min_ms: ms(v[0]),
        max_ms: ms(*v.last().unwrap()),
    }
}

#[derive(Serialize)]
struct SizeResult {
    mem_mib: u64,
    start_to_first_instruction: Stats,
    start_to_first_instruction_process: Stats,
    start_to_first_console_byte_pvh: Stats,
    save_as_booted: Stats,
    restore_as_booted: Stats,
    state_file_as_booted_bytes: u64,
    save_full: Stats,
    restore_full: Stats,
    state_file_full_bytes: u64,
    dirty_harvest: Vec<DirtyResult>,
    dirty_log_manual_clear: bool,
}

#[derive(Serialize)]
struct DirtyResult {
    backend: &'static str,
    guest_pages_per_sec: u64,
    mean_pages_per_harvest: f64,
    harvest: Stats,
}

#[derive(Serialize)]
struct Report {
    bench: &'static str,
    command: String,
    machine: Machine,
    results: Vec<SizeResult>,
}

#[derive(Serialize)]
pub(crate) struct Machine {
    cpu: String,
    cores: usize,
    kernel: String,
    kvm_flavour: String,
}

impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "{} cores of {}, kernel {}, {}",
            self.cores, self.cpu, self.kernel, self.kvm_flavour
        )
    }
}

pub(crate) fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?");
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let kvm_flavour = if Path::new("/sys/module/kvm_pvm").exists() {
        "kvm_pvm (software PVM: guest kernel mode emulated)"
    } else if Path::new("/sys/module/kvm_intel").exists() {
        "kvm_intel"
    } else if Path::new("/sys/module/kvm_amd").exists() {
        "kvm_amd"
    } else {
        "unknown"
    };
    Machine {
        cpu: cpu.trim().to_string(),
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        kernel: kernel.trim().to_string(),
        kvm_flavour: kvm_flavour.to_string(),
    }
}

/// Console sink that records when its first byte arrived.
#[derive(Clone, Default)]
struct FirstByte(Arc<Mutex<Option<Instant>>>);

impl Write for FirstByte {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut t = self.0.lock().unwrap();
        if t.is_none() {
            *t = Some(Instant::now());
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn synthetic_kernel() -> BootSource {
    BootSource::Kernel {
        image: vmm::boot::synthetic_bzimage(EXIT_AT_ENTRY),
        initrd: None,
        cmdline: String::new(),
    }
}

fn counter(cmdline: &str) -> BootSource {
    BootSource::Kernel {
        image: guests::by_name("counter").unwrap().elf.to_vec(),
        initrd: None,
        cmdline: cmdline.into(),
    }
}

fn start_to_first_instruction(mem_mib: u64) -> Result<Duration> {
    let t = Instant::now();
    let cfg = VmConfig {
        vcpus: 1,
        mem_mib,
        dirty: DirtyTracking::Off,
    };
    let mut vm = Vmm::boot(&cfg, &synthetic_kernel(), Box::new(std::io::sink()))?;
    vm.resume()?;
    match vm.wait_event(Some(Duration::from_secs(30))) {
        Some(VmEvent::Exit(0)) => Ok(t.elapsed()),
        other => bail!("synthetic kernel did not exit 0: {other:?}"),
    }
}

fn start_to_first_instruction_process(
    ftvm: &Path,
    kernel: &Path,
    mem_mib: u64,
) -> Result<Duration> {
    let t = Instant::now();
    let st = Command::new(ftvm)
        .args(["run", "--kernel"])
        .arg(kernel)
        .args(["--mem-mib", &mem_mib.to_string()])
        .status()?;
    let d = t.elapsed();
    if st.code() != Some(0) {
        bail!("ftvm run of the synthetic kernel exited {st}");
    }
    Ok(d)
}

fn start_to_first_console_byte(mem_mib: u64) -> Result<Duration> {
    let sink = FirstByte::default();
    let t = Instant::now();
    let cfg = VmConfig {
        vcpus: 1,
        mem_mib,
        dirty: DirtyTracking::Off,
    };
    let mut vm = Vmm::boot(&cfg, &counter("count=1 rate=0"), Box::new(sink.clone()))?;
    vm.resume()?;
    let ev = vm.wait_event(Some(Duration::from_secs(30)));
    if ev != Some(VmEvent::Exit(0)) {
        bail!("counter did not exit 0: {ev:?}");
    }
    let first = sink.0.lock().unwrap().context("no console output")?;
    Ok(first - t)
}

/// Boots a counter VM of `mem_mib`, lets it run 100 ms and pauses it; with `fill`, writes
/// non-zero data into all RAM above 16 MiB (the counter does not use it).
fn paused_vm(mem_mib: u64, fill: bool) -> Result<Vmm> {
    let cfg = VmConfig {
        vcpus: 1,
        mem_mib,
        dirty: DirtyTracking::Off,
    };
    let mut vm = Vmm::boot(
        &cfg,
        &counter("count=1000000000 rate=1000"),
        Box::new(std::io::sink()),
    )?;
    vm.resume()?;
    std::thread::sleep(Duration::from_millis(100));
    vm.pause()?;
    if fill {
        let page: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8 + 1).collect();
        let mut gpa = 16u64 << 20;
        let end = (mem_mib << 20).min(vmm::layout::MMIO_GAP_START);
        while gpa < end {
            vmm::memory::write_bytes(vm.memory(), gpa, &page)?;
            gpa += 4096;
        }
    }
    Ok(vm)
}

fn save_restore(dir: &Path, mem_mib: u64, fill: bool, runs: usize) -> Result<(Stats, Stats, u64)> {
    let path = dir.join(format!("bench-{mem_mib}-{fill}.state"));
    let (mut saves, mut restores) = (Vec::new(), Vec::new());
    let mut size = 0;
    for _ in 0..runs {
        let mut vm = paused_vm(mem_mib, fill)?;
        let t = Instant::now();
        vm.save(&path)?;
        saves.push(t.elapsed());
        drop(vm);
        size = std::fs::metadata(&path)?.len();
        let t = Instant::now();
        let mut vm = Vmm::restore(&path, Box::new(std::io::sink()), DirtyTracking::Off)?;
        restores.push(t.elapsed());
        // The restored guest must really run on.
        vm.resume()?;
        std::thread::sleep(Duration::from_millis(20));
        vm.stop();
    }
    let _ = std::fs::remove_file(&path);
    Ok((stats(saves), stats(restores), size))
}

/// Harvest cost of one tracking backend while the `dirtier` writes `rate` pages/s over the
/// guest's RAM above 8 MiB (0 = the idle `counter` guest): harvests every 20 ms, `runs` times.
fn dirty_harvest(
    mem_mib: u64,
    backend: DirtyTracking,
    rate: u64,
    runs: usize,
) -> Result<(DirtyResult, bool)> {
    let cfg = VmConfig {
        vcpus: 1,
        mem_mib,
        dirty: backend,
    };
    let src = if rate == 0 {
        counter("count=1000000000 rate=1000")
    } else {
        let mib = mem_mib.saturating_sub(16).max(1);
        BootSource::Kernel {
            image: guests::by_name("dirtier").unwrap().elf.to_vec(),
            initrd: None,
            cmdline: format!("mib={mib} pages_per_sec={rate} secs=100000"),
        }
    };
    let mut vm = Vmm::boot(&cfg, &src, Box::new(std::io::sink()))?;
    vm.resume()?;
    std::thread::sleep(Duration::from_millis(100));
    vm.pause()?;
    vm.dirty_pages()?; // start from a clean log
    vm.resume()?;
    let (mut times, mut pages) = (Vec::new(), 0usize);
    for _ in 0..runs {
        std::thread::sleep(Duration::from_millis(20));
        vm.pause()?;
        let t = Instant::now();
        let d = vm.dirty_pages()?;
        times.push(t.elapsed());
        pages += d.guest.len();
        vm.resume()?;
    }
    let manual = vm.dirty_log_manual_clear();
    vm.stop();
    let name = match backend {
        DirtyTracking::Ring => "ring",
        _ => "bitmap",
    };
    let r = DirtyResult {
        backend: name,
        guest_pages_per_sec: rate,
        mean_pages_per_harvest: pages as f64 / runs as f64,
        harvest: stats(times),
    };
    Ok((r, manual))
}

pub(crate) fn ftvm_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("exe dir")?.join("ftvm");
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --release` first",
            bin.display()
        );
    }
    Ok(bin)
}

/// The command that reproduces a benchmark run, as its report records it.
pub(crate) fn command_line(bench: &str, args: &[String]) -> String {
    format!(
        "cargo run --release -p ftvm-benches -- {bench}{}",
        args.iter().map(|a| format!(" {a}")).collect::<String>()
    )
}

/// Writes `report` to `benches/results/NAME.json`; returns the path.
pub(crate) fn write_results(name: &str, report: &impl Serialize) -> Result<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(report)?)?;
    Ok(path)
}

/// Runs a command (`args[0]` with the rest as arguments); an error carries its stderr.
pub(crate) fn sh(args: &[&str]) -> Result<()> {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    anyhow::ensure!(
        o.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr).trim()
    );
    Ok(())
}

/// Median of samples (the upper one of an even count).
pub(crate) fn median_f64(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn foundation(args: &[String]) -> Result<()> {
    let mut runs = 10usize;
    let mut sizes = vec![64u64, 256, 1024];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = it.next().context("--runs N")?.parse()?,
            "--sizes" => {
                sizes = it
                    .next()
                    .context("--sizes A,B")?
                    .split(',')
                    .map(|s| s.parse())
                    .collect::<Result<_, _>>()?
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    let ftvm = ftvm_binary()?;
    let dir = std::env::temp_dir().join(format!("ftvm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let kernel = dir.join("synthetic-bzImage");
    std::fs::write(&kernel, vmm::boot::synthetic_bzimage(EXIT_AT_ENTRY))?;
    let mut results = Vec::new();
    for &mem in &sizes {
        eprintln!("== {mem} MiB");
        let sfi = (0..runs)
            .map(|_| start_to_first_instruction(mem))
            .collect::<Result<Vec<_>>>()?;
        let sfp = (0..runs)
            .map(|_| start_to_first_instruction_process(&ftvm, &kernel, mem))
            .collect::<Result<Vec<_>>>()?;
        let sfc = (0..runs)
            .map(|_| start_to_first_console_byte(mem))
            .collect::<Result<Vec<_>>>()?;
        let sr_runs = runs.min(5);
        let (sb, rb, zb) = save_restore(&dir, mem, false, sr_runs)?;
        let (sf, rf, zf) = save_restore(&dir, mem, true, sr_runs)?;
        let mut dh = Vec::new();
        let mut manual = false;
        for rate in [0u64, 5_000, 50_000] {
            for backend in [DirtyTracking::Bitmap, DirtyTracking::Ring] {
                let (r, m) = dirty_harvest(mem, backend, rate, runs.max(20))?;
                manual |= m;
                dh.push(r);
            }
        }
        results.push(SizeResult {
            mem_mib: mem,
            start_to_first_instruction: stats(sfi),
            start_to_first_instruction_process: stats(sfp),
            start_to_first_console_byte_pvh: stats(sfc),
            save_as_booted: sb,
            restore_as_booted: rb,
            state_file_as_booted_bytes: zb,
            save_full: sf,
            restore_full: rf,
            state_file_full_bytes: zf,
            dirty_harvest: dh,
            dirty_log_manual_clear: manual,
        });
    }
    let _ = std::fs::remove_dir_all(&dir);
    let report = Report {
        bench: "foundation",
        command: command_line("foundation", args),
        machine: machine(),
        results,
    };
    let json = write_results("foundation", &report)?;
    print_table(&report);
    eprintln!("wrote {}", json.display());
    Ok(())
}

fn print_table(r: &Report) {
    println!(
        "Machine: {} ({} cores), kernel {}, {}",
        r.machine.cpu, r.machine.cores, r.machine.kernel, r.machine.kvm_flavour
    );
    println!("Command: `{}`\n", r.command);
    println!("| guest RAM | start → 1st instruction (in-process) | `ftvm run` process, start → exit | start → 1st console byte (PVH counter) | save / restore, as booted | save / restore, RAM full | state file as booted / full |");
    println!("|---|---|---|---|---|---|---|");
    for s in &r.results {
        println!(
            "| {} MiB | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} / {:.1} ms | {:.0} / {:.0} ms | {:.1} MiB / {:.0} MiB |",
            s.mem_mib,
            s.start_to_first_instruction.p50_ms,
            s.start_to_first_instruction_process.p50_ms,
            s.start_to_first_console_byte_pvh.p50_ms,
            s.save_as_booted.p50_ms,
            s.restore_as_booted.p50_ms,
            s.save_full.p50_ms,
            s.restore_full.p50_ms,
            s.state_file_as_booted_bytes as f64 / (1 << 20) as f64,
            s.state_file_full_bytes as f64 / (1 << 20) as f64,
        );
    }
    println!("\nDirty-page harvest, harvesting every 20 ms (p50 / p90):\n");
    println!("| guest RAM | guest dirty rate | pages per harvest | bitmap | ring |");
    println!("|---|---|---|---|---|");
    for s in &r.results {
        for pair in s.dirty_harvest.chunks(2) {
            let (b, g) = (&pair[0], &pair[1]);
            println!(
                "| {} MiB | {} pages/s | {:.0} | {:.3} / {:.3} ms | {:.3} / {:.3} ms |",
                s.mem_mib,
                b.guest_pages_per_sec,
                b.mean_pages_per_harvest,
                b.harvest.p50_ms,
                b.harvest.p90_ms,
                g.harvest.p50_ms,
                g.harvest.p90_ms
            );
        }
    }
    println!("\n(p50 of the runs; p90, min and max are in the JSON)");
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("foundation") => foundation(&args[1..]),
        Some("ft") => ft::run(&args[1..]),
        Some("ft-cost") => ftcost::run(&args[1..]),
        Some("detect") => detect::run(&args[1..]),
        Some("link") => link::run(&args[1..]),
        Some("peers") => peers::run(&args[1..]),
        Some("netserve") => netserve::run(&args[1..]),
        Some("kernel-compile") => kernel::run(&args[1..]),
        Some("plots") => plots::run(&args[1..]),
        Some("all") => all(&args[1..]),
        _ => {
            eprintln!(
                "usage: ftvm-bench all [--quick]     every benchmark below, then the plots\n       \
                 ftvm-bench foundation [--runs N] [--sizes 64,256,1024]\n       \
                 ftvm-bench ft [--runs N] [--jobs J] [--vcpus 1,2,4,8] [--kills K]\n       \
                 ftvm-bench ft-cost [--runs N] [--jobs J] [--epoch-ms MS] [--vcpus 1,2]\n       \
                 ftvm-bench detect [--minutes M] [--failovers N] [--spinners S] [--no-load]\n       \
                 ftvm-bench link [--runs N] [--mib M] [--rtt-us R]\n       \
                 ftvm-bench peers [--runs N]\n       \
                 ftvm-bench netserve [--runs N] [--mib M] [--rr K] [--min-epoch-ms E]\n       \
                 ftvm-bench kernel-compile [--kernel BZIMAGE --initrd INITRAMFS] [--vcpus N] [--runs N]\n       \
                 ftvm-bench plots                  redraw benches/results/plots/*.svg from the JSON\n\
                 micro-benchmarks (criterion): cargo bench -p ftvm-benches --bench micro"
            );
            std::process::exit(2);
        }
    }
}

/// Every benchmark, one after the other (each writes its JSON), then the plots. `--quick`
/// runs each with fewer repetitions (a smoke run, minutes instead of the better part of an
/// hour on a 2-core machine).
fn all(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let runs = |full: &str, q: &str| {
        vec![
            "--runs".to_string(),
            (if quick { q } else { full }).to_string(),
        ]
    };
    let steps: Vec<(&str, Vec<String>)> = vec![
        ("foundation", runs("10", "2")),
        ("ft", {
            let mut a = runs("3", "1");
            if quick {
                a.extend(["--kills".into(), "5".into()]);
            }
            a
        }),
        ("ft-cost", runs("3", "1")),
        ("link", runs("5", "1")),
        ("peers", runs("5", "1")),
        ("netserve", runs("3", "1")),
        ("kernel-compile", runs("3", "1")),
    ];
    let mut failed = Vec::new();
    for (name, a) in &steps {
        eprintln!("==> ftvm-bench {name} {}", a.join(" "));
        let r = match *name {
            "foundation" => foundation(a),
            "ft" => ft::run(a),
            "ft-cost" => ftcost::run(a),
            "link" => link::run(a),
            "peers" => peers::run(a),
            "netserve" => netserve::run(a),
            _ => kernel::run(a),
        };
        if let Err(e) = r {
            eprintln!("ftvm-bench {name} failed: {e:#}");
            failed.push(*name);
        }
    }
    eprintln!("==> micro-benchmarks: cargo bench -p ftvm-benches --bench micro");
    let micro = std::process::Command::new(env!("CARGO"))
        .args([
            "bench",
            "-p",
            "ftvm-benches",
            "--bench",
            "micro",
            "--",
            "--noplot",
        ])
        .args(if quick { vec!["--quick"] } else { vec![] })
        .output();
    match micro {
        Ok(o) if o.status.success() => {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("results/micro.txt");
            std::fs::write(&p, &o.stdout)?;
            eprintln!("wrote {}", p.display());
        }
        Ok(o) => {
            eprintln!(
                "micro-benchmarks failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            failed.push("micro");
        }
        Err(e) => {
            eprintln!("micro-benchmarks could not start: {e}");
            failed.push("micro");
        }
    }
    plots::run(&[])?;
    if !failed.is_empty() {
        bail!("these benchmarks failed: {}", failed.join(", "));
    }
    Ok(())
}

mod colo;
mod delay;
mod detect;
mod ft;
mod ftcost;
mod kernel;
mod link;
mod netserve;
mod peers;
mod plots;
