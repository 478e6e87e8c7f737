//! Port-I/O devices the VMM emulates. (The PIC, IOAPIC, LAPIC and PIT are KVM's in-kernel ones.)
//!
//! | ports         | device |
//! |---------------|--------|
//! | 0x3f8–0x3ff   | COM1 16550 UART ([`serial`]) → console |
//! | 0x501         | exit device ([`EXIT_PORT`]): a byte written ends the VM with that code |
//! | anything else | absent: reads return all-ones, writes are ignored |
pub mod events;
pub mod serial;

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
}

/// Saved state of [`Devices`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DevicesState {
    pub serial: serial::SerialDeviceState,
}

impl Devices {
    pub fn new(serial: serial::SerialDevice, events: Arc<EventLog>) -> Self {
        Devices { serial, events }
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

    /// A guest read of MMIO no device claims: all-ones (recorded).
    pub fn mmio_read(&mut self, vcpu: u8, addr: u64, data: &mut [u8]) {
        data.fill(0xff);
        self.events.record(DeviceEvent::MmioRead {
            vcpu,
            addr,
            size: data.len() as u8,
            value: le_value(data),
        });
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
        }
    }

    /// Flushes buffered device output (before a save, and at exit).
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.serial.flush()
    }
}
