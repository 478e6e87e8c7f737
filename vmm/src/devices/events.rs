//! The nondeterministic inputs the VMM hands its guest, recorded for the FT log.
//!
//! Off by default (a plain `ftvm run` records nothing). An FT primary turns recording on and
//! takes each epoch's events when it closes the epoch; they travel as `Event` records in the
//! epoch, in the order they happened. Today's devices produce few: port reads of the UART
//! (and of absent ports), reads of unmapped MMIO, and the UART's interrupt.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// One input, as the guest saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceEvent {
    /// An `in` from `port` returned `value` (little-endian, `size` bytes).
    PioRead {
        vcpu: u8,
        port: u16,
        size: u8,
        value: u32,
    },
    /// A read of MMIO no device claims returned `value`.
    MmioRead {
        vcpu: u8,
        addr: u64,
        size: u8,
        value: u64,
    },
    /// The VMM raised interrupt line `gsi`.
    Interrupt { gsi: u32 },
    /// Data from outside entered the guest through `device` (a received network frame).
    DeviceInput { device: u16, data: Vec<u8> },
}

/// Events recorded since the last [`EventLog::take`].
#[derive(Debug, Default)]
pub struct EventLog {
    on: AtomicBool,
    len: AtomicUsize,
    events: Mutex<Vec<DeviceEvent>>,
}

impl EventLog {
    pub fn set_recording(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
    }

    pub fn is_recording(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    pub fn record(&self, e: DeviceEvent) {
        if self.on.load(Ordering::Relaxed) {
            let mut v = self.events.lock().unwrap();
            v.push(e);
            self.len.store(v.len(), Ordering::Relaxed);
        }
    }

    /// How many events wait to be taken (cheap: for closing an epoch early).
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn take(&self) -> Vec<DeviceEvent> {
        let mut v = self.events.lock().unwrap();
        self.len.store(0, Ordering::Relaxed);
        std::mem::take(&mut *v)
    }
}

/// Little-endian value of up to 8 bytes.
pub fn le_value(data: &[u8]) -> u64 {
    data.iter()
        .take(8)
        .enumerate()
        .fold(0, |v, (i, b)| v | (u64::from(*b) << (8 * i)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_when_on_and_take_empties() {
        let log = EventLog::default();
        log.record(DeviceEvent::Interrupt { gsi: 4 });
        assert!(log.is_empty());
        log.set_recording(true);
        log.record(DeviceEvent::Interrupt { gsi: 4 });
        log.record(DeviceEvent::PioRead {
            vcpu: 0,
            port: 0x3fd,
            size: 1,
            value: 0x60,
        });
        assert_eq!(log.len(), 2);
        let v = log.take();
        assert_eq!(v[0], DeviceEvent::Interrupt { gsi: 4 });
        assert!(log.is_empty() && log.take().is_empty());
        assert_eq!(le_value(&[0x34, 0x12]), 0x1234);
    }
}
