//! vCPUs: configuration, state capture/restore, and the vCPU thread.
//!
//! A vCPU thread owns its `VcpuFd` and runs an explicit state machine:
//!
//! ```text
//!            Resume                 Pause (completes in-flight I/O first)
//!   Paused ─────────▶ Running ─────────────────────────────▶ Paused
//!     │  ▲ Save → state                 │ guest wrote the exit port / fatal exit
//!     │  └──────────                    ▼
//!     └─── Stop ──▶ Exited         (self-paused, event sent to the VMM)
//! ```
//!
//! Commands arrive on a channel and replies go back on another. A command sent to a running
//! vCPU is followed by a *kick*: a real-time signal whose handler sets `kvm_run.immediate_exit`,
//! so `KVM_RUN` returns `EINTR` now or the next time it is entered (no lost wake-ups).
use crate::arch::{cpuid, msr};
use crate::devices::{Devices, PioAction};
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_run, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating vCPU {0} failed")]
    Create(u8, #[source] kvm_ioctls::Error),
    #[error("vCPU {0}: {1} failed")]
    Ioctl(u8, &'static str, #[source] kvm_ioctls::Error),
    #[error("vCPU {0}: only {1} of {2} MSRs could be set")]
    PartialMsrs(u8, usize, usize),
    #[error("vCPU {0}: mapping its dirty ring failed")]
    DirtyRing(u8, #[source] std::io::Error),
    #[error("vCPU {0}: saved state is malformed: {1}")]
    BadState(u8, &'static str),
}

/// Everything KVM holds for one vCPU, in the order it is captured.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
    pub tsc_khz: u32,
}

/// One vCPU before it is moved into its thread.
/// Niceness of vCPU threads relative to the VMM's other threads.
const VCPU_NICE: i32 = 5;

pub struct Vcpu {
    pub id: u8,
    fd: VcpuFd,
}

fn set_lvt(lapic: &mut kvm_lapic_state, reg: usize, mode: u32) {
    let b = &mut lapic.regs[reg..reg + 4];
    let v = u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8]);
    let v = (v & !0x700) | (mode << 8);
    for (i, byte) in v.to_le_bytes().iter().enumerate() {
        b[i] = *byte as _;
    }
}

impl Vcpu {
    pub fn new(vm: &super::vm::KvmVm, id: u8) -> Result<Self, Error> {
        let fd = vm
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| Error::Create(id, e))?;
        Ok(Vcpu { id, fd })
    }

    /// Maps this vCPU's dirty ring (the VM must be in ring mode).
    pub fn map_dirty_ring(&self, bytes: usize) -> Result<super::dirty_ring::DirtyRing, Error> {
        super::dirty_ring::DirtyRing::map(&self.fd, bytes).map_err(|e| Error::DirtyRing(self.id, e))
    }

    fn ioctl<T>(&self, what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, Error> {
        r.map_err(|e| Error::Ioctl(self.id, what, e))
    }

    /// Fresh-boot configuration: CPUID, boot MSRs, FPU, LAPIC LINT0/LINT1, and for the boot
    /// vCPU the entry registers.
    pub fn configure(
        &self,
        supported: &CpuId,
        count: u8,
        boot: Option<(kvm_regs, kvm_sregs)>,
    ) -> Result<(), Error> {
        let cpuid = cpuid::for_vcpu(supported, self.id, count);
        self.ioctl("set CPUID", self.fd.set_cpuid2(&cpuid))?;
        let entries = msr::boot_msrs();
        let msrs = Msrs::from_entries(&entries).expect("boot MSR list fits");
        let n = self.ioctl("set MSRs", self.fd.set_msrs(&msrs))?;
        if n != entries.len() {
            return Err(Error::PartialMsrs(self.id, n, entries.len()));
        }
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.ioctl("set FPU", self.fd.set_fpu(&fpu))?;
        let mut lapic = self.ioctl("get LAPIC", self.fd.get_lapic())?;
        set_lvt(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
        self.ioctl("set LAPIC", self.fd.set_lapic(&lapic))?;
        if let Some((regs, sregs)) = boot {
            self.ioctl("set sregs", self.fd.set_sregs(&sregs))?;
            self.ioctl("set regs", self.fd.set_regs(&regs))?;
        }
        Ok(())
    }

    /// The special registers as KVM initialised them (the base for boot sregs).
    pub fn sregs(&self) -> Result<kvm_sregs, Error> {
        self.ioctl("get sregs", self.fd.get_sregs())
    }

    /// Of `candidates` (KVM's MSR index list), those this vCPU can read: the MSRs to save.
    pub fn savable_msrs(&self, candidates: &[u32]) -> Vec<u32> {
        candidates
            .iter()
            .copied()
            .filter(|&index| {
                let mut m = Msrs::from_entries(&[kvm_msr_entry {
                    index,
                    ..Default::default()
                }])
                .unwrap();
                matches!(self.fd.get_msrs(&mut m), Ok(1))
            })
            .collect()
    }

    /// Captures the vCPU (must not be running). Order: mp_state first (it flushes pending
    /// LAPIC events), vcpu_events last.
    pub fn save(&self, msr_indices: &[u32]) -> Result<VcpuState, Error> {
        let mp_state = self.ioctl("get MP state", self.fd.get_mp_state())?;
        let regs = self.ioctl("get regs", self.fd.get_regs())?;
        let sregs = self.ioctl("get sregs", self.fd.get_sregs())?;
        let xsave = self.ioctl("get xsave", self.fd.get_xsave())?;
        let xcrs = self.ioctl("get xcrs", self.fd.get_xcrs())?;
        let debugregs = self.ioctl("get debugregs", self.fd.get_debug_regs())?;
        let lapic = self.ioctl("get LAPIC", self.fd.get_lapic())?;
        let mut msrs = Vec::with_capacity(msr_indices.len());
        for chunk in msr_indices.chunks(64) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut m = Msrs::from_entries(&entries).unwrap();
            let n = self.ioctl("get MSRs", self.fd.get_msrs(&mut m))?;
            msrs.extend_from_slice(&m.as_slice()[..n]);
        }
        let vcpu_events = self.ioctl("get vcpu events", self.fd.get_vcpu_events())?;
        let tsc_khz = self.fd.get_tsc_khz().unwrap_or(0);
        let cpuid = self.ioctl(
            "get CPUID",
            self.fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES),
        )?;
        Ok(VcpuState {
            id: self.id,
            cpuid: cpuid.as_slice().to_vec(),
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            vcpu_events,
            tsc_khz,
        })
    }

    /// Restores a captured vCPU: TSC frequency and CPUID first, LAPIC before MSRs, TSC before
    /// TSC_DEADLINE, vcpu_events last.
    pub fn restore(&self, s: &VcpuState) -> Result<(), Error> {
        if s.id != self.id {
            return Err(Error::BadState(self.id, "vCPU id does not match"));
        }
        if s.tsc_khz != 0 && self.fd.get_tsc_khz().ok() != Some(s.tsc_khz) {
            if let Err(e) = self.fd.set_tsc_khz(s.tsc_khz) {
                tracing::warn!(
                    vcpu = self.id,
                    "cannot set TSC frequency to {} kHz: {e}",
                    s.tsc_khz
                );
            }
        }
        if s.cpuid.is_empty() || s.cpuid.len() > kvm_bindings::KVM_MAX_CPUID_ENTRIES {
            return Err(Error::BadState(self.id, "CPUID entry count"));
        }
        let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| Error::BadState(self.id, "CPUID"))?;
        self.ioctl("set CPUID", self.fd.set_cpuid2(&cpuid))?;
        self.ioctl("set MP state", self.fd.set_mp_state(s.mp_state))?;
        self.ioctl("set sregs", self.fd.set_sregs(&s.sregs))?;
        self.ioctl("set regs", self.fd.set_regs(&s.regs))?;
        // SAFETY: `s.xsave` is a full legacy kvm_xsave region, the size KVM_SET_XSAVE reads.
        self.ioctl("set xsave", unsafe { self.fd.set_xsave(&s.xsave) })?;
        self.ioctl("set xcrs", self.fd.set_xcrs(&s.xcrs))?;
        self.ioctl("set debugregs", self.fd.set_debug_regs(&s.debugregs))?;
        self.ioctl("set LAPIC", self.fd.set_lapic(&s.lapic))?;
        let ordered = msr::restore_order(&s.msrs);
        for chunk in ordered.chunks(64) {
            let m = Msrs::from_entries(chunk).map_err(|_| Error::BadState(self.id, "MSR list"))?;
            let n = self.ioctl("set MSRs", self.fd.set_msrs(&m))?;
            if n != chunk.len() {
                return Err(Error::PartialMsrs(self.id, n, chunk.len()));
            }
        }
        self.ioctl("set vcpu events", self.fd.set_vcpu_events(&s.vcpu_events))?;
        Ok(())
    }
}

/// Commands to a vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuCmd {
    Resume,
    Pause,
    Save,
    Stop,
}

/// Replies from a vCPU thread.
#[derive(Debug)]
pub enum VcpuReply {
    Resumed,
    Paused,
    Saved(Box<VcpuState>),
    Stopped,
    Error(String),
}

/// Things a vCPU reports on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest wrote the exit device.
    Exit(u8),
    /// Triple fault / reset request.
    Shutdown { vcpu: u8 },
    /// KVM failed or the guest did something ftvm cannot handle.
    Error { vcpu: u8, msg: String },
}

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal: `SIGRTMIN`.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set while its VcpuFd
            // lives; a byte store is async-signal-safe.
            unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
    });
    res
}

static MMIO_WARNINGS: AtomicU64 = AtomicU64::new(0);
static RING_FULL_WARNINGS: AtomicU64 = AtomicU64::new(0);
const KVM_EXIT_DIRTY_RING_FULL: u32 = 31;

/// The channels and shared devices a vCPU thread works with.
pub struct VcpuIo {
    pub devices: Arc<Mutex<Devices>>,
    pub cmds: Receiver<VcpuCmd>,
    pub replies: Sender<VcpuReply>,
    pub events: Sender<VmEvent>,
    pub msr_indices: Arc<Vec<u32>>,
}

enum State {
    Paused,
    Running,
}

impl Vcpu {
    /// Completes an in-flight I/O instruction without running more guest code, so a paused
    /// vCPU's registers describe an instruction boundary.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    /// The vCPU thread body. Starts paused.
    pub fn run_thread(mut self, io: VcpuIo) {
        KVM_RUN.with(|p| p.set(self.fd.get_kvm_run() as *mut kvm_run));
        // Guest execution yields to the VMM's own threads (FT heartbeats, epoch control,
        // device work) when the host's CPUs are overcommitted: with 8 vCPUs spinning on 2
        // cores, heartbeats starved past the failure-detection timeout caused false
        // failovers. Lowering one's own priority needs no privilege; it only matters under
        // contention.
        // SAFETY: nice() changes only this thread's scheduling priority (per-thread on Linux).
        unsafe { libc::nice(VCPU_NICE) };
        let mut state = State::Paused;
        let reply = |r| {
            let _ = io.replies.send(r);
        };
        loop {
            match state {
                State::Paused => match io.cmds.recv() {
                    Ok(VcpuCmd::Resume) => {
                        self.fd.set_kvm_immediate_exit(0);
                        state = State::Running;
                        reply(VcpuReply::Resumed);
                    }
                    Ok(VcpuCmd::Pause) => reply(VcpuReply::Paused),
                    Ok(VcpuCmd::Save) => match self.save(&io.msr_indices) {
                        Ok(s) => reply(VcpuReply::Saved(Box::new(s))),
                        Err(e) => reply(VcpuReply::Error(e.to_string())),
                    },
                    Ok(VcpuCmd::Stop) | Err(_) => break,
                },
                State::Running => {
                    match io.cmds.try_recv() {
                        Ok(VcpuCmd::Pause) => {
                            self.complete_pending_io();
                            state = State::Paused;
                            reply(VcpuReply::Paused);
                            continue;
                        }
                        Ok(VcpuCmd::Resume) => reply(VcpuReply::Resumed),
                        Ok(VcpuCmd::Save) => {
                            reply(VcpuReply::Error("save requested while running".into()))
                        }
                        Ok(VcpuCmd::Stop) | Err(TryRecvError::Disconnected) => break,
                        Err(TryRecvError::Empty) => {}
                    }
                    if let Some(ev) = self.run_once(&io) {
                        // The guest ended or cannot go on: park and tell the VMM.
                        self.complete_pending_io();
                        state = State::Paused;
                        let _ = io.events.send(ev);
                    }
                }
            }
        }
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        reply(VcpuReply::Stopped);
    }

    fn run_once(&mut self, io: &VcpuIo) -> Option<VmEvent> {
        let id = self.id;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                io.devices.lock().unwrap().pio_read(id, port, data);
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                match io.devices.lock().unwrap().pio_write(port, data) {
                    PioAction::None => None,
                    PioAction::Exit(code) => Some(VmEvent::Exit(code)),
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !io.devices.lock().unwrap().mmio_read(id, addr, data)
                    && MMIO_WARNINGS.fetch_add(1, Ordering::Relaxed) < 5
                {
                    tracing::warn!(vcpu = id, "read of unmapped MMIO {addr:#x}");
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !io.devices.lock().unwrap().mmio_write(addr, data)
                    && MMIO_WARNINGS.fetch_add(1, Ordering::Relaxed) < 5
                {
                    tracing::warn!(vcpu = id, "write to unmapped MMIO {addr:#x}");
                }
                None
            }
            Ok(VcpuExit::Hlt) => None,
            Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => {
                // The VMM harvests rings at its own pace; wait for it rather than spin.
                if RING_FULL_WARNINGS.fetch_add(1, Ordering::Relaxed) < 5 {
                    tracing::warn!(vcpu = id, "dirty ring full; waiting for a harvest");
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
                None
            }
            Ok(VcpuExit::Shutdown) => Some(VmEvent::Shutdown { vcpu: id }),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VmEvent::Error {
                vcpu: id,
                msg: format!("KVM entry failed (hardware reason {reason:#x}, cpu {cpu})"),
            }),
            Ok(VcpuExit::InternalError) => Some(VmEvent::Error {
                vcpu: id,
                msg: "KVM internal error".into(),
            }),
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(VmEvent::Error {
                vcpu: id,
                msg: format!("system event {kind}"),
            }),
            Ok(other) => Some(VmEvent::Error {
                vcpu: id,
                msg: format!("unhandled exit {other:?}"),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(VmEvent::Error {
                vcpu: id,
                msg: format!("KVM_RUN failed: {e}"),
            }),
        }
    }
}
