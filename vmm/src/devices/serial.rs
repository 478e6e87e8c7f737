//! COM1: vm-superio's 16550 UART, its interrupt wired to GSI 4 through an irqfd.
use super::events::{DeviceEvent, EventLog};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// ISA IRQ of COM1.
pub const COM1_GSI: u32 = 4;

/// Where console bytes go.
pub type SerialOut = Box<dyn Write + Send>;

/// Raises the UART's interrupt line by signalling an irqfd (and records it).
pub struct IrqTrigger(pub EventFd, pub Arc<EventLog>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.1.record(DeviceEvent::Interrupt { gsi: COM1_GSI });
        self.0.write(1)
    }
}

/// The console UART.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, SerialOut>,
    errors: AtomicU64,
}

/// Saved UART registers (mirrors vm-superio's `SerialState`, which has no serde).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialDeviceState {
    fn from(s: SerialState) -> Self {
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialDeviceState> for SerialState {
    fn from(s: &SerialDeviceState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("saved serial state is invalid")]
    State,
}

impl SerialDevice {
    pub fn new(
        irq: EventFd,
        events: Arc<EventLog>,
        out: SerialOut,
        state: Option<&SerialDeviceState>,
    ) -> Result<Self, Error> {
        let trigger = IrqTrigger(irq, events);
        let uart = match state {
            None => Serial::new(trigger, out),
            Some(s) => {
                Serial::from_state(&s.into(), trigger, NoEvents, out).map_err(|_| Error::State)?
            }
        };
        Ok(SerialDevice {
            uart,
            errors: AtomicU64::new(0),
        })
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.uart.write(offset, value) {
            // Guest-triggerable: log the first few only.
            if self.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                tracing::warn!("serial output failed: {e:?}");
            }
        }
    }

    pub fn save(&self) -> SerialDeviceState {
        self.uart.state().into()
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.uart.writer_mut().flush()
    }
}
