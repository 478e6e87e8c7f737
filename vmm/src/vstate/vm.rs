//! The KVM VM: memory slots, in-kernel irqchip and PIT, clock, and the dirty log.
use crate::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use crate::memory::{self, GuestMemory};
use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clock_data, kvm_enable_cap, kvm_irqchip, kvm_pit_config,
    kvm_pit_state2, kvm_userspace_memory_region, CpuId, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};

const KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: u64 = 1;
/// Dirty ring size per vCPU: 64 Ki entries of 16 bytes (KVM caps it; 1 MiB on the dev host).
pub const DIRTY_RING_BYTES: usize = 1 << 20;
vmm_sys_util::ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, kvm_bindings::KVMIO, 0xc7);

/// How guest writes are tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyTracking {
    /// Not tracked (plain runs).
    #[default]
    Off,
    /// KVM's dirty bitmap, cleared manually where the kernel supports it.
    Bitmap,
    /// KVM's per-vCPU dirty ring; must be harvested regularly (a full ring stalls the vCPU).
    Ring,
}
vmm_sys_util::ioctl_iowr_nr!(
    KVM_CLEAR_DIRTY_LOG,
    kvm_bindings::KVMIO,
    0xc0,
    kvm_clear_dirty_log
);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM VM setup failed: {0}")]
    Setup(&'static str, #[source] kvm_ioctls::Error),
    #[error("registering guest memory with KVM failed")]
    MemorySlot(#[source] kvm_ioctls::Error),
    #[error("KVM state {0} failed")]
    State(&'static str, #[source] kvm_ioctls::Error),
    #[error("reading the KVM dirty log failed")]
    DirtyLog(#[source] kvm_ioctls::Error),
    #[error("clearing the KVM dirty log failed")]
    ClearDirtyLog(#[source] kvm_ioctls::Error),
    #[error("this KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)")]
    NoDirtyRing,
    #[error("resetting the KVM dirty rings failed")]
    ResetDirtyRings(#[source] kvm_ioctls::Error),
}

/// Saved state of the in-kernel devices and the KVM clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmKvmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// A KVM VM with its memory registered.
pub struct KvmVm {
    pub kvm: Kvm,
    pub fd: VmFd,
    pub supported_cpuid: CpuId,
    tracking: DirtyTracking,
    /// Bytes of each vCPU's dirty ring (ring mode only).
    ring_bytes: usize,
    manual_clear: bool,
    /// (slot, guest address, size) of each memory slot.
    slots: Vec<(u32, u64, usize)>,
    /// The regions as registered (for turning the dirty log on and off).
    regions: Vec<kvm_userspace_memory_region>,
    /// Whether the bitmap dirty log is on now (see [`KvmVm::set_dirty_logging`]).
    logging: std::sync::atomic::AtomicBool,
}

impl KvmVm {
    /// Creates the VM, its in-kernel irqchip and PIT, and registers `mem`, logging guest
    /// writes as `tracking` says. (Ring mode must be chosen here, before any vCPU exists.)
    pub fn new(mem: &GuestMemory, tracking: DirtyTracking) -> Result<Self, Error> {
        let track_dirty = tracking != DirtyTracking::Off;
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let fd = kvm.create_vm().map_err(Error::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| Error::Setup("TSS address", e))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(|e| Error::Setup("identity map address", e))?;
        fd.create_irq_chip()
            .map_err(|e| Error::Setup("irqchip", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(|e| Error::Setup("PIT", e))?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::Setup("supported CPUID", e))?;
        let mut manual_clear = false;
        let mut ring_bytes = 0;
        if tracking == DirtyTracking::Ring {
            let max = fd.check_extension_raw(kvm_bindings::KVM_CAP_DIRTY_LOG_RING.into());
            if max <= 0 {
                return Err(Error::NoDirtyRing);
            }
            ring_bytes = DIRTY_RING_BYTES.min(max as usize);
            let mut cap = kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_DIRTY_LOG_RING,
                ..Default::default()
            };
            cap.args[0] = ring_bytes as u64;
            fd.enable_cap(&cap)
                .map_err(|e| Error::Setup("dirty ring", e))?;
        }
        if tracking == DirtyTracking::Bitmap
            && fd.check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into()) > 0
        {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                ..Default::default()
            };
            cap.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
            manual_clear = fd.enable_cap(&cap).is_ok();
        }
        let mut vm = KvmVm {
            kvm,
            fd,
            supported_cpuid,
            tracking,
            ring_bytes,
            manual_clear,
            slots: Vec::new(),
            regions: Vec::new(),
            logging: track_dirty.into(),
        };
        for (slot, (gpa, host, len)) in memory::host_regions(mem).into_iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: gpa,
                memory_size: len as u64,
                userspace_addr: host as u64,
                flags: if track_dirty {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
            };
            // SAFETY: the region is a live mmap owned by `mem`, which outlives the VM (the
            // Vmm holds both and drops the VM fd first).
            unsafe { vm.fd.set_user_memory_region(region) }.map_err(Error::MemorySlot)?;
            vm.slots.push((slot as u32, gpa, len));
            vm.regions.push(region);
        }
        Ok(vm)
    }

    /// Turns the bitmap dirty log on or off (`KVM_MEM_LOG_DIRTY_PAGES` on every slot), so a
    /// VM pays for write tracking only while something needs it: an FT primary with no
    /// secondary runs untracked. Turning it on starts from a clean log with every page
    /// write-protected. No effect unless the VM was created with bitmap tracking.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), Error> {
        use std::sync::atomic::Ordering;
        if self.tracking != DirtyTracking::Bitmap || self.logging.load(Ordering::SeqCst) == on {
            return Ok(());
        }
        for r in &self.regions {
            let region = kvm_userspace_memory_region {
                flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                ..*r
            };
            // SAFETY: the same live mapping registered in `new`; only the flags change.
            unsafe { self.fd.set_user_memory_region(region) }.map_err(Error::MemorySlot)?;
        }
        self.logging.store(on, Ordering::SeqCst);
        Ok(())
    }

    /// Whether dirty pages are cleared with `KVM_CLEAR_DIRTY_LOG` (manual protect).
    pub fn manual_clear(&self) -> bool {
        self.manual_clear
    }

    pub fn save(&self) -> Result<VmKvmState, Error> {
        let chip = |id| -> Result<kvm_irqchip, Error> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(|e| Error::State("get irqchip", e))?;
            Ok(c)
        };
        Ok(VmKvmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(|e| Error::State("get PIT", e))?,
            clock: self
                .fd
                .get_clock()
                .map_err(|e| Error::State("get clock", e))?,
        })
    }

    pub fn restore(&self, s: &VmKvmState) -> Result<(), Error> {
        for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
            self.fd
                .set_irqchip(c)
                .map_err(|e| Error::State("set irqchip", e))?;
        }
        self.fd
            .set_pit2(&s.pit)
            .map_err(|e| Error::State("set PIT", e))?;
        // Only the clock value is meaningful across processes; flags describe the source host.
        let clock = kvm_clock_data {
            clock: s.clock.clock,
            ..Default::default()
        };
        self.fd
            .set_clock(&clock)
            .map_err(|e| Error::State("set clock", e))?;
        Ok(())
    }

    /// How guest writes are tracked.
    pub fn tracking(&self) -> DirtyTracking {
        self.tracking
    }

    /// Bytes of each vCPU's dirty ring (0 unless in ring mode).
    pub fn ring_bytes(&self) -> usize {
        self.ring_bytes
    }

    /// Turns `(slot, page offset)` ring entries into guest-physical addresses and lets KVM
    /// reuse the harvested entries (re-protecting their pages).
    pub fn finish_ring_harvest(&self, entries: &[(u32, u64)]) -> Result<Vec<u64>, Error> {
        let pages = entries
            .iter()
            .filter_map(|&(slot, off)| {
                self.slots
                    .iter()
                    .find(|s| s.0 == slot)
                    .map(|s| s.1 + off * crate::layout::PAGE_SIZE)
            })
            .collect();
        // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and only touches KVM's own state.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl(&self.fd, KVM_RESET_DIRTY_RINGS()) };
        if ret < 0 {
            return Err(Error::ResetDirtyRings(kvm_ioctls::Error::last()));
        }
        Ok(pages)
    }

    /// Guest-physical addresses of pages the guest wrote since the last call according to the
    /// dirty bitmap; clears it. Call with the vCPUs paused for a consistent cut.
    pub fn harvest_dirty(&self) -> Result<Vec<u64>, Error> {
        let mut pages = Vec::new();
        if self.tracking != DirtyTracking::Bitmap
            || !self.logging.load(std::sync::atomic::Ordering::SeqCst)
        {
            return Ok(pages);
        }
        for &(slot, gpa, len) in &self.slots {
            let mut bitmap = self.fd.get_dirty_log(slot, len).map_err(Error::DirtyLog)?;
            crate::dirty::push_set_pages(gpa, &bitmap, &mut pages);
            if self.manual_clear && bitmap.iter().any(|w| *w != 0) {
                let mut clear = kvm_clear_dirty_log {
                    slot,
                    num_pages: (len / crate::layout::PAGE_SIZE as usize) as u32,
                    first_page: 0,
                    ..Default::default()
                };
                clear.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
                // SAFETY: `clear` describes a whole slot and points at a bitmap of exactly
                // that many bits, alive for the call.
                let ret = unsafe {
                    vmm_sys_util::ioctl::ioctl_with_ref(&self.fd, KVM_CLEAR_DIRTY_LOG(), &clear)
                };
                if ret < 0 {
                    return Err(Error::ClearDirtyLog(kvm_ioctls::Error::last()));
                }
            }
        }
        Ok(pages)
    }
}
