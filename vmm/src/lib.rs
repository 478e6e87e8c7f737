//! `vmm`: ftvm's KVM virtual machine.
//!
//! A [`Vmm`] is one VM: guest memory ([`memory`]), the KVM VM with its in-kernel irqchip and
//! PIT ([`vstate::vm`]), one thread per vCPU that owns its `VcpuFd` ([`vstate::vcpu`]), the
//! port devices ftvm emulates ([`devices`]), boot ([`boot`], [`arch`]), full state capture and
//! restore ([`persist`]) and dirty page tracking for the FT layer ([`dirty`]).
//!
//! ```no_run
//! # use vmm::{Vmm, VmConfig, boot::BootSource};
//! let elf = guests::by_name("counter").unwrap().elf.to_vec();
//! let src = BootSource::Kernel { image: elf, initrd: None, cmdline: "count=10".into() };
//! let mut vm = Vmm::boot(&VmConfig::default(), &src, Box::new(std::io::stdout()))?;
//! let code = vm.run()?;
//! # Ok::<(), vmm::Error>(())
//! ```
pub mod arch;
pub mod boot;
pub mod devices;
pub mod dirty;
pub mod layout;
pub mod memory;
pub mod persist;
pub mod vstate;
pub mod wp;

use devices::serial::{SerialDevice, SerialOut, COM1_GSI};
use devices::Devices;
use dirty::DirtyPages;
use memory::GuestMemory;
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;
use vstate::vcpu::{self, Vcpu, VcpuCmd, VcpuIo, VcpuReply, VcpuState};
use vstate::vm::KvmVm;

pub use boot::BootSource;
pub use vstate::vcpu::VmEvent;
pub use vstate::vm::DirtyTracking;

/// Most vCPUs a VM may have (vSphere FT's per-VM limit, which ftvm enforces for every VM).
pub const MAX_VCPUS: u8 = 8;

/// How long a vCPU may take to answer a command before the VMM calls it stuck.
const VCPU_REPLY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} vCPUs requested: a VM has 1 to {MAX_VCPUS} vCPUs (the FT limit is {MAX_VCPUS} vCPUs per VM)")]
    VcpuCount(u32),
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error(transparent)]
    Kvm(#[from] vstate::vm::Error),
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error(transparent)]
    Regs(#[from] arch::regs::Error),
    #[error(transparent)]
    Persist(#[from] persist::Error),
    #[error("serial device")]
    Serial(#[from] devices::serial::Error),
    #[error("setting up the serial interrupt")]
    SerialIrq(#[source] std::io::Error),
    #[error("setting up the disk interrupt")]
    DiskIrq(#[source] std::io::Error),
    #[error(transparent)]
    Disk(#[from] devices::virtio_blk::Error),
    #[error("setting up the network device")]
    NetIrq(#[source] std::io::Error),
    #[error("network device state")]
    Net(#[from] devices::virtio_mmio::Error),
    #[error("installing the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("starting vCPU thread {0}")]
    Thread(u8, #[source] std::io::Error),
    #[error("vCPU {0} did not answer {1:?} within {2:?}")]
    VcpuTimeout(u8, VcpuCmd, Duration),
    #[error("vCPU {0} failed: {1}")]
    VcpuFailed(u8, String),
    #[error("the guest shut down (triple fault or reset) on vCPU {0}")]
    GuestShutdown(u8),
    #[error("state file has {0} vCPUs; the VM has {1}")]
    StateMismatch(usize, usize),
    #[error("guest memory has {have} bytes; the state needs {expected}")]
    MemoryMismatch { have: u64, expected: u64 },
    #[error("flushing serial output")]
    Flush(#[source] std::io::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Shape of a VM.
#[derive(Debug, Clone, Copy)]
pub struct VmConfig {
    pub vcpus: u8,
    pub mem_mib: u64,
    /// How guest writes are logged (for FT and dirty-tracking tests).
    pub dirty: DirtyTracking,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            vcpus: 1,
            mem_mib: 128,
            dirty: DirtyTracking::Off,
        }
    }
}

/// Checks a vCPU count against ftvm's limits.
pub fn check_vcpus(n: u32) -> Result<u8> {
    if n == 0 || n > u32::from(MAX_VCPUS) {
        return Err(Error::VcpuCount(n));
    }
    Ok(n as u8)
}

struct VcpuHandle {
    id: u8,
    cmds: Sender<VcpuCmd>,
    replies: Receiver<VcpuReply>,
    thread: Option<JoinHandle<()>>,
}

/// One VM and its vCPU threads.
pub struct Vmm {
    vcpus: Vec<VcpuHandle>,
    devices: Arc<Mutex<Devices>>,
    events: Receiver<VmEvent>,
    rings: Vec<Mutex<vstate::dirty_ring::DirtyRing>>,
    kvm: KvmVm,
    mem: GuestMemory,
    mem_mib: u64,
    running: bool,
    /// The network device's receive thread: its stop signal and handle.
    net_rx: Option<(Arc<EventFd>, JoinHandle<()>)>,
}

impl Vmm {
    /// Creates a VM and loads `src` into it. The vCPUs start paused: call [`Vmm::resume`] or
    /// [`Vmm::run`].
    pub fn boot(cfg: &VmConfig, src: &BootSource, serial_out: SerialOut) -> Result<Self> {
        let nvcpus = check_vcpus(u32::from(cfg.vcpus))?;
        let mem = memory::create(cfg.mem_mib)?;
        let kvm = KvmVm::new(&mem, cfg.dirty)?;
        let entry = boot::load(&mem, src, cfg.mem_mib << 20, nvcpus)?;
        let devices = Self::devices(&kvm, serial_out, None)?;
        let mut vcpus = Vec::new();
        for id in 0..nvcpus {
            let v = Vcpu::new(&kvm, id)?;
            let boot_regs = if id == 0 {
                let sregs = v.sregs()?;
                Some(match entry {
                    boot::BootEntry::Pvh { entry, start_info } => {
                        arch::regs::pvh(&mem, sregs, entry, start_info)?
                    }
                    boot::BootEntry::Linux64 { entry, zero_page } => {
                        arch::regs::linux64(&mem, sregs, entry, zero_page)?
                    }
                })
            } else {
                None
            };
            v.configure(&kvm.supported_cpuid, nvcpus, boot_regs)?;
            vcpus.push(v);
        }
        Self::start(kvm, mem, cfg.mem_mib, devices, vcpus)
    }

    /// Recreates a VM from a state file written by [`Vmm::save`]. The vCPUs start paused.
    pub fn restore(path: &Path, serial_out: SerialOut, dirty: DirtyTracking) -> Result<Self> {
        let file = persist::open(path)?;
        let mem = memory::create(file.state.mem_mib)?;
        let state = file.load_memory(&mem)?;
        Self::from_state(mem, state, serial_out, dirty)
    }

    /// Recreates a VM from guest memory that already holds its contents and the rest of its
    /// state (a restored file, or an FT standby taking over). The vCPUs start paused.
    pub fn from_state(
        mem: GuestMemory,
        state: persist::VmState,
        serial_out: SerialOut,
        dirty: DirtyTracking,
    ) -> Result<Self> {
        let mem_mib = state.mem_mib;
        let expected: u64 = layout::ram_ranges(mem_mib << 20).iter().map(|r| r.1).sum();
        let have: u64 = memory::host_regions(&mem).iter().map(|r| r.2 as u64).sum();
        if state.vcpus.is_empty() || state.vcpus.len() > MAX_VCPUS as usize {
            return Err(Error::VcpuCount(state.vcpus.len() as u32));
        }
        if have != expected {
            return Err(Error::MemoryMismatch { have, expected });
        }
        let kvm = KvmVm::new(&mem, dirty)?;
        kvm.restore(&state.vm)?;
        let devices = Self::devices(&kvm, serial_out, Some(&state.devices.serial))?;
        {
            let mut d = devices.lock().unwrap();
            d.blk_saved = state.devices.blk.clone();
            d.net_saved = state.devices.net.clone();
        }
        let mut vcpus = Vec::new();
        for s in &state.vcpus {
            let v = Vcpu::new(&kvm, s.id)?;
            v.restore(s)?;
            vcpus.push(v);
        }
        Self::start(kvm, mem, mem_mib, devices, vcpus)
    }

    fn devices(
        kvm: &KvmVm,
        serial_out: SerialOut,
        state: Option<&devices::serial::SerialDeviceState>,
    ) -> Result<Arc<Mutex<Devices>>> {
        let irq = irqfd(kvm, COM1_GSI).map_err(Error::SerialIrq)?;
        let events = Arc::new(devices::events::EventLog::default());
        let serial = SerialDevice::new(irq, events.clone(), serial_out, state)?;
        Ok(Arc::new(Mutex::new(Devices::new(serial, events))))
    }

    fn start(
        kvm: KvmVm,
        mem: GuestMemory,
        mem_mib: u64,
        devices: Arc<Mutex<Devices>>,
        vcpus: Vec<Vcpu>,
    ) -> Result<Self> {
        vcpu::install_kick_handler().map_err(Error::Signal)?;
        let mut rings = Vec::new();
        if kvm.tracking() == DirtyTracking::Ring {
            for v in &vcpus {
                rings.push(Mutex::new(v.map_dirty_ring(kvm.ring_bytes())?));
            }
        }
        let candidates = kvm
            .kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
        let msr_indices = Arc::new(vcpus[0].savable_msrs(&candidates));
        let (ev_tx, events) = channel();
        let mut handles = Vec::new();
        for v in vcpus {
            let id = v.id;
            let (cmd_tx, cmd_rx) = channel();
            let (rep_tx, rep_rx) = channel();
            let io = VcpuIo {
                devices: devices.clone(),
                cmds: cmd_rx,
                replies: rep_tx,
                events: ev_tx.clone(),
                msr_indices: msr_indices.clone(),
            };
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || v.run_thread(io))
                .map_err(|e| Error::Thread(id, e))?;
            handles.push(VcpuHandle {
                id,
                cmds: cmd_tx,
                replies: rep_rx,
                thread: Some(thread),
            });
        }
        Ok(Vmm {
            vcpus: handles,
            devices,
            events,
            rings,
            kvm,
            mem,
            mem_mib,
            running: false,
            net_rx: None,
        })
    }

    /// Sends `cmd` to every vCPU, kicking running ones, and collects one reply from each.
    fn command(&mut self, cmd: VcpuCmd) -> Result<Vec<VcpuReply>> {
        self.send_command(cmd);
        self.collect_replies(cmd)
    }

    fn send_command(&self, cmd: VcpuCmd) {
        for v in &self.vcpus {
            let _ = v.cmds.send(cmd);
        }
    }

    /// Waits for every vCPU's reply to `cmd` (sent), kicking any that is still running.
    fn collect_replies(&self, cmd: VcpuCmd) -> Result<Vec<VcpuReply>> {
        let mut replies = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            let start = Instant::now();
            loop {
                if let Some(t) = &v.thread {
                    let _ = t.kill(vcpu::kick_signal());
                }
                match v.replies.recv_timeout(Duration::from_millis(20)) {
                    Ok(VcpuReply::Error(msg)) => return Err(Error::VcpuFailed(v.id, msg)),
                    Ok(r) => {
                        replies.push(r);
                        break;
                    }
                    Err(RecvTimeoutError::Timeout) if start.elapsed() < VCPU_REPLY_TIMEOUT => {
                        continue
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        return Err(Error::VcpuTimeout(v.id, cmd, VCPU_REPLY_TIMEOUT))
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(Error::VcpuFailed(v.id, "thread exited".into()))
                    }
                }
            }
        }
        Ok(replies)
    }

    /// Runs (or continues) the guest.
    pub fn resume(&mut self) -> Result<()> {
        self.command(VcpuCmd::Resume)?;
        self.running = true;
        if let Some(n) = self.devices.lock().unwrap().net.as_mut() {
            n.set_frozen(false);
        }
        Ok(())
    }

    /// Stops every vCPU at an instruction boundary (in-flight port I/O completed).
    pub fn pause(&mut self) -> Result<()> {
        // First: from here on no received frame is written into guest memory.
        if let Some(n) = self.devices.lock().unwrap().net.as_mut() {
            n.set_frozen(true);
        }
        self.command(VcpuCmd::Pause)?;
        self.running = false;
        Ok(())
    }

    /// Captures the whole VM (pausing it first if needed; it stays paused).
    pub fn capture(&mut self) -> Result<persist::VmState> {
        Ok(self.capture_with(|| ())?.0)
    }

    /// As [`Vmm::capture`], running `work` on this thread while the vCPU threads save their
    /// state (the FT primary protects or copies the epoch's pages meanwhile). `work` must not
    /// touch the vCPUs.
    pub fn capture_with<R>(&mut self, work: impl FnOnce() -> R) -> Result<(persist::VmState, R)> {
        if self.running {
            self.pause()?;
        }
        self.send_command(VcpuCmd::Save);
        let done = work();
        let mut vcpus: Vec<VcpuState> = Vec::new();
        for r in self.collect_replies(VcpuCmd::Save)? {
            if let VcpuReply::Saved(s) = r {
                vcpus.push(*s);
            }
        }
        if vcpus.len() != self.vcpus.len() {
            return Err(Error::StateMismatch(vcpus.len(), self.vcpus.len()));
        }
        let mut devices = self.devices.lock().unwrap();
        devices.flush().map_err(Error::Flush)?;
        let state = persist::VmState {
            mem_mib: self.mem_mib,
            vcpus,
            vm: self.kvm.save()?,
            devices: devices.save(),
        };
        Ok((state, done))
    }

    /// Writes the full VM state to `path` (pausing the VM first; it stays paused).
    pub fn save(&mut self, path: &Path) -> Result<()> {
        let state = self.capture()?;
        persist::save(path, &state, &self.mem)?;
        Ok(())
    }

    /// Waits up to `timeout` (forever if `None`) for something a vCPU reports.
    pub fn wait_event(&self, timeout: Option<Duration>) -> Option<VmEvent> {
        match timeout {
            None => self.events.recv().ok(),
            Some(t) => self.events.recv_timeout(t).ok(),
        }
    }

    /// Runs the guest until it asks to exit; returns its exit code.
    pub fn run(&mut self) -> Result<u8> {
        self.resume()?;
        let ev = self.wait_event(None).unwrap_or(VmEvent::Error {
            vcpu: 0,
            msg: "all vCPUs gone".into(),
        });
        self.finish(ev)
    }

    /// Ends the VM after `ev`: stops every vCPU, flushes output, maps the event to a result.
    pub fn finish(&mut self, ev: VmEvent) -> Result<u8> {
        self.stop();
        self.devices.lock().unwrap().flush().map_err(Error::Flush)?;
        match ev {
            VmEvent::Exit(code) => Ok(code),
            VmEvent::Shutdown { vcpu } => Err(Error::GuestShutdown(vcpu)),
            VmEvent::Error { vcpu, msg } => Err(Error::VcpuFailed(vcpu, msg)),
        }
    }

    /// Stops and joins every vCPU thread and the network receive thread (idempotent).
    pub fn stop(&mut self) {
        if let Some((stop, t)) = self.net_rx.take() {
            let _ = stop.write(1);
            let _ = t.join();
        }
        for v in &self.vcpus {
            let _ = v.cmds.send(VcpuCmd::Stop);
        }
        for v in &mut self.vcpus {
            if let Some(t) = v.thread.take() {
                let deadline = Instant::now() + VCPU_REPLY_TIMEOUT;
                while !t.is_finished() && Instant::now() < deadline {
                    let _ = t.kill(vcpu::kick_signal());
                    std::thread::sleep(Duration::from_millis(2));
                }
                if t.is_finished() {
                    let _ = t.join();
                }
            }
        }
        self.running = false;
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// Pages written since the last harvest, by the guest (needs dirty tracking) and by the
    /// VMM. Pause the VM first for a consistent cut.
    pub fn dirty_pages(&self) -> Result<DirtyPages> {
        let mut guest = if self.rings.is_empty() {
            self.kvm.harvest_dirty()?
        } else {
            let mut entries = Vec::new();
            for r in &self.rings {
                r.lock().unwrap().harvest(&mut entries);
            }
            self.kvm.finish_ring_harvest(&entries)?
        };
        guest.sort_unstable();
        guest.dedup();
        let mut vmm = dirty::harvest_vmm_writes(&self.mem);
        vmm.sort_unstable();
        Ok(DirtyPages { guest, vmm })
    }

    /// The VM's record of nondeterministic device inputs (off until
    /// [`devices::events::EventLog::set_recording`]).
    pub fn events(&self) -> Arc<devices::events::EventLog> {
        self.devices.lock().unwrap().events.clone()
    }

    /// Turns KVM's bitmap dirty log on or off (see [`vstate::vm::KvmVm::set_dirty_logging`]); pages the
    /// VMM writes are always tracked.
    pub fn set_dirty_logging(&self, on: bool) -> Result<()> {
        Ok(self.kvm.set_dirty_logging(on)?)
    }

    /// Attaches `disk` as the VM's virtio-blk disk (before the vCPUs first run; a restored
    /// VM continues its saved device state with it).
    pub fn attach_disk(&mut self, disk: std::fs::File) -> Result<()> {
        use devices::virtio_blk::{VirtioBlk, BLK_GSI};
        let irq = irqfd(&self.kvm, BLK_GSI).map_err(Error::DiskIrq)?;
        let mut d = self.devices.lock().unwrap();
        let events = d.events.clone();
        let saved = d.blk_saved.take();
        d.blk = Some(VirtioBlk::new(
            disk,
            self.mem.clone(),
            irq,
            events,
            saved.as_ref(),
        )?);
        Ok(())
    }

    /// Attaches `tap` (see [`devices::tap::open`]) as the VM's virtio-net device with MAC
    /// `mac` (a restored VM keeps its saved MAC and queues), and starts the thread that
    /// receives its frames. Before the vCPUs first run.
    pub fn attach_net(&mut self, tap: std::fs::File, mac: [u8; 6]) -> Result<()> {
        use devices::virtio_net::{VirtioNet, NET_GSI};
        let irq = irqfd(&self.kvm, NET_GSI).map_err(Error::NetIrq)?;
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(Error::NetIrq)?);
        let tap_rx = tap.try_clone().map_err(Error::NetIrq)?;
        {
            let mut d = self.devices.lock().unwrap();
            let events = d.events.clone();
            let saved = d.net_saved.take();
            let mut net = VirtioNet::new(tap, mac, self.mem.clone(), irq, events, saved.as_ref())?;
            net.set_frozen(!self.running);
            d.net = Some(net);
        }
        let (devs, stop2) = (self.devices.clone(), stop.clone());
        let t = std::thread::Builder::new()
            .name("net-rx".into())
            .spawn(move || net_rx_loop(devs, tap_rx, stop2))
            .map_err(Error::NetIrq)?;
        self.net_rx = Some((stop, t));
        Ok(())
    }

    /// A restored VM whose state has a network device still waiting for its tap.
    pub fn needs_net(&self) -> bool {
        self.devices.lock().unwrap().net_saved.is_some()
    }

    /// Runs `f` on the network device, if one is attached.
    pub fn with_net<T>(
        &self,
        f: impl FnOnce(&mut devices::virtio_net::VirtioNet) -> T,
    ) -> Option<T> {
        self.devices.lock().unwrap().net.as_mut().map(f)
    }

    /// A restored VM whose state has a disk device still waiting for its disk.
    pub fn needs_disk(&self) -> bool {
        self.devices.lock().unwrap().blk_saved.is_some()
    }

    /// Runs `f` on the disk device, if one is attached.
    pub fn with_disk<T>(
        &self,
        f: impl FnOnce(&mut devices::virtio_blk::VirtioBlk) -> T,
    ) -> Option<T> {
        self.devices.lock().unwrap().blk.as_mut().map(f)
    }

    /// Whether KVM's dirty log is cleared manually (`KVM_CLEAR_DIRTY_LOG`).
    pub fn dirty_log_manual_clear(&self) -> bool {
        self.kvm.manual_clear()
    }
}

/// An eventfd that raises interrupt line `gsi` when written (KVM's irqfd).
fn irqfd(kvm: &KvmVm, gsi: u32) -> std::io::Result<EventFd> {
    let fd = EventFd::new(libc::EFD_NONBLOCK)?;
    kvm.fd
        .register_irqfd(&fd, gsi)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    Ok(fd)
}

/// Reads frames from the tap and hands them to the network device until `stop` is signalled.
fn net_rx_loop(devices: Arc<Mutex<Devices>>, tap: std::fs::File, stop: Arc<EventFd>) {
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; 65536];
    let mut frames = Vec::new();
    let mut waiting = false;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: tap.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, if waiting { 1 } else { 1000 }) };
        if fds[1].revents != 0 {
            return;
        }
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::error!("network receive stopped: polling the tap failed: {e}; the guest receives nothing more");
                return;
            }
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            tracing::error!(
                "network receive stopped: the tap reports {} (detached or its interface deleted); the guest receives nothing more",
                if fds[0].revents & libc::POLLNVAL != 0 { "an invalid descriptor" } else { "an error" }
            );
            return;
        }
        while frames.len() < 64 {
            match devices::tap::read_frame(&tap, &mut buf) {
                Some(n) if n > 0 => frames.push(buf[..n].to_vec()),
                _ => break,
            }
        }
        if frames.is_empty() && !waiting {
            continue;
        }
        let mut d = devices.lock().unwrap();
        if let Some(net) = d.net.as_mut() {
            net.retry();
            for f in frames.drain(..) {
                net.receive(f);
            }
            waiting = net.backlogged();
        }
        frames.clear();
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop();
    }
}
