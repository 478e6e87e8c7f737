//! Devices the VMM emulates. (The PIC, IOAPIC, LAPIC and PIT are KVM's in-kernel ones.)
//!
//! | ports / MMIO  | device |
//! |---------------|--------|
//! | 0x3f8–0x3ff   | COM1 16550 UART ([`serial`]) → console |
//! | 0x501         | exit device ([`EXIT_PORT`]): a byte written ends the VM with that code |
//! | 0xd0000000 +4K | virtio-blk over virtio-mmio ([`virtio_blk`]), GSI 5, if a disk is attached |
//! | 0xd0001000 +4K | virtio-net over virtio-mmio ([`virtio_net`]), GSI 6, if a tap is attached |
//! | anything else | absent: reads return all-ones, writes are ignored |
pub mod events;
pub mod serial;
pub mod tap;
pub mod virtio_blk;
pub mod virtio_mmio;
pub mod virtio_net;

use events::{le_value, DeviceEvent, EventLog};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The exit device's port (QEMU's `isa-debug-exit` default, so the same guest ends under both).
pub const EXIT_PORT: u16 = 0x501;
pub const COM1_BASE: u16 = 0x3f8;

/// What a port write asks of the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioAction {
    None,
    /// The guest asked to end the VM with this code.
    Exit(u8),
}

/// All VMM-emulated port devices of one VM.
pub struct Devices {
    pub serial: serial::SerialDevice,
    /// Shared with the UART's interrupt trigger.
    pub events: Arc<EventLog>,
    /// The disk, once attached ([`crate::Vmm::attach_disk`]).
    pub blk: Option<virtio_blk::VirtioBlk>,
    /// A restored VM's disk-device state, until its disk is attached.
    pub blk_saved: Option<virtio_blk::VirtioBlkState>,
    /// The network device, once attached ([`crate::Vmm::attach_net`]).
    pub net: Option<virtio_net::VirtioNet>,
    /// A restored VM's network-device state, until its tap is attached.
    pub net_saved: Option<virtio_net::VirtioNetState>,
}

/// Saved state of [`Devices`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DevicesState {
    pub serial: serial::SerialDeviceState,
    /// Present when the VM has a disk (its contents are the disk file's, not in the state).
    pub blk: Option<virtio_blk::VirtioBlkState>,
    /// Present when the VM has a network device.
    pub net: Option<virtio_net::VirtioNetState>,
}

/// Cases per run of the virtqueue property tests (`hostile_queues_never_crash_or_escape`):
/// 300, or `FTVM_FUZZ_CASES` for a longer run.
#[cfg(test)]
pub(crate) fn fuzz_cases() -> u32 {
    std::env::var("FTVM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

fn in_blk(addr: u64) -> Option<u64> {
    addr.checked_sub(virtio_blk::BLK_MMIO_BASE)
        .filter(|o| *o < virtio_blk::BLK_MMIO_SIZE)
}

fn in_net(addr: u64) -> Option<u64> {
    addr.checked_sub(virtio_net::NET_MMIO_BASE)
        .filter(|o| *o < virtio_net::NET_MMIO_SIZE)
}

impl Devices {
    pub fn new(serial: serial::SerialDevice, events: Arc<EventLog>) -> Self {
        Devices {
            serial,
            events,
            blk: None,
            blk_saved: None,
            net: None,
            net_saved: None,
        }
    }

    /// Whether a guest write at `addr` went to a device (else: unmapped MMIO).
    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) -> bool {
        if let (Some(off), Some(blk)) = (in_blk(addr), self.blk.as_mut()) {
            blk.write(off, data);
            return true;
        }
        if let (Some(off), Some(net)) = (in_net(addr), self.net.as_mut()) {
            net.write(off, data);
            return true;
        }
        false
    }

    /// A guest `in` from `port` on `vcpu`; `data` is filled (and the result recorded).
    pub fn pio_read(&mut self, vcpu: u8, port: u16, data: &mut [u8]) {
        match port {
            COM1_BASE..=0x3ff if data.len() == 1 => {
                data[0] = self.serial.read((port - COM1_BASE) as u8)
            }
            _ => data.fill(0xff),
        }
        self.events.record(DeviceEvent::PioRead {
            vcpu,
            port,
            size: data.len() as u8,
            value: le_value(data) as u32,
        });
    }

    /// A guest MMIO read: the device's register, or all-ones where no device is (recorded
    /// either way). Returns whether a device claimed it.
    pub fn mmio_read(&mut self, vcpu: u8, addr: u64, data: &mut [u8]) -> bool {
        let claimed = match (
            in_blk(addr),
            self.blk.as_mut(),
            in_net(addr),
            self.net.as_mut(),
        ) {
            (Some(off), Some(blk), _, _) => {
                blk.read(off, data);
                true
            }
            (_, _, Some(off), Some(net)) => {
                net.read(off, data);
                true
            }
            _ => {
                data.fill(0xff);
                false
            }
        };
        self.events.record(DeviceEvent::MmioRead {
            vcpu,
            addr,
            size: data.len() as u8,
            value: le_value(data),
        });
        claimed
    }

    /// A guest `out` to `port`.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> PioAction {
        match port {
            COM1_BASE..=0x3ff if data.len() == 1 => {
                self.serial.write((port - COM1_BASE) as u8, data[0]);
                PioAction::None
            }
            EXIT_PORT if !data.is_empty() => PioAction::Exit(data[0]),
            _ => PioAction::None,
        }
    }

    pub fn save(&self) -> DevicesState {
        DevicesState {
            serial: self.serial.save(),
            blk: match &self.blk {
                Some(b) => Some(b.save()),
                None => self.blk_saved.clone(),
            },
            net: match &self.net {
                Some(n) => Some(n.save()),
                None => self.net_saved.clone(),
            },
        }
    }

    /// Flushes buffered device output (before a save, and at exit).
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.serial.flush()
    }
}
