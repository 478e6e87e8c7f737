//! The virtio-mmio transport (virtio 1.x, "modern" MMIO version 2) shared by ftvm's virtio
//! devices: the register file, feature negotiation, the device status and the split
//! virtqueues (`virtio-queue`), saved and restored with the VM.
//!
//! Everything the guest writes is checked: registers are 32-bit (other sizes are ignored),
//! queue layout may change only while the queue is not ready, `QueueSel` beyond the device's
//! queues selects nothing, the driver's features are masked to the offered ones, and
//! `FEATURES_OK` is refused without `VIRTIO_F_VERSION_1`. A queue is served only once the
//! driver is `DRIVER_OK`, not `FAILED`, and the queue's rings lie inside guest memory.
use super::events::{DeviceEvent, EventLog};
use crate::memory::GuestMemory;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

pub const MAGIC: u32 = 0x7472_6976; // "virt"
pub const VENDOR: u32 = 0x4d56_5446; // "FTVM"
pub const F_VERSION_1: u64 = 1 << 32;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_FAILED: u32 = 128;
/// Offset of the device-specific configuration space.
pub const CONFIG: u64 = 0x100;

/// One queue's saved layout and position.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueSave {
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

/// The transport's saved registers and queues.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TransportState {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub status: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queue_sel: u32,
    pub queues: Vec<QueueSave>,
}

/// What a register write asks of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Nothing,
    /// The driver notified queue `n`.
    Notify(u16),
    /// The driver reset the device (the transport is already reset).
    Reset,
}

/// A saved transport that does not fit the device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("saved virtio queue state is invalid: {0:?}")]
    Queue(virtio_queue::Error),
    #[error("saved virtio state has {0} queues; the device has {1}")]
    QueueCount(usize, usize),
}

/// A device's interrupt: the irqfd KVM raises line `gsi` from, and the log each raise is
/// recorded in (an input the guest sees).
pub struct Irq {
    pub fd: EventFd,
    pub gsi: u32,
    pub events: Arc<EventLog>,
}

pub struct Transport {
    device_id: u32,
    features: u64,
    max_size: u16,
    pub s: TransportState,
    pub queues: Vec<Queue>,
    irq: Irq,
}

impl Transport {
    /// A transport for device `device_id` offering `features` with `nqueues` queues of at
    /// most `max_size` entries, continuing `saved` if given.
    pub fn new(
        device_id: u32,
        features: u64,
        nqueues: usize,
        max_size: u16,
        irq: Irq,
        saved: Option<&TransportState>,
    ) -> Result<Self, Error> {
        let s = saved.cloned().unwrap_or_else(|| TransportState {
            queues: vec![QueueSave::default(); nqueues],
            ..Default::default()
        });
        if s.queues.len() != nqueues {
            return Err(Error::QueueCount(s.queues.len(), nqueues));
        }
        let queues = s
            .queues
            .iter()
            .map(|q| {
                Queue::try_from(QueueState {
                    max_size,
                    next_avail: q.next_avail,
                    next_used: q.next_used,
                    event_idx_enabled: false,
                    size: if q.size == 0 { max_size } else { q.size },
                    ready: q.ready,
                    desc_table: q.desc_table,
                    avail_ring: q.avail_ring,
                    used_ring: q.used_ring,
                })
                .map_err(Error::Queue)
            })
            .collect::<Result<_, _>>()?;
        Ok(Transport {
            device_id,
            features,
            max_size,
            s,
            queues,
            irq,
        })
    }

    pub fn save(&self) -> TransportState {
        let mut s = self.s.clone();
        s.queues = self
            .queues
            .iter()
            .map(|q| QueueSave {
                size: q.size(),
                ready: q.ready(),
                desc_table: q.desc_table(),
                avail_ring: q.avail_ring(),
                used_ring: q.used_ring(),
                next_avail: q.next_avail(),
                next_used: q.next_used(),
            })
            .collect();
        s
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.s.queue_sel as usize)
    }

    /// A guest read at `offset`; `config` is the device's configuration space.
    pub fn read(&mut self, offset: u64, data: &mut [u8], config: &[u8]) {
        if offset >= CONFIG {
            let o = (offset - CONFIG) as usize;
            for (i, b) in data.iter_mut().enumerate() {
                *b = o
                    .checked_add(i)
                    .and_then(|at| config.get(at))
                    .copied()
                    .unwrap_or(0);
            }
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v: u32 = match offset {
            0x000 => MAGIC,
            0x004 => 2,
            0x008 => self.device_id,
            0x00c => VENDOR,
            0x010 => match self.s.device_features_sel {
                0 => self.features as u32,
                1 => (self.features >> 32) as u32,
                _ => 0,
            },
            0x034 => {
                let max = u32::from(self.max_size);
                self.selected().map_or(0, |_| max)
            }
            0x044 => self.selected().map_or(0, |q| u32::from(q.ready())),
            0x060 => self.s.interrupt_status,
            0x070 => self.s.status,
            0x0fc => self.s.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A guest write at `offset` (the configuration space is read-only).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Written {
        if data.len() != 4 || offset >= CONFIG {
            return Written::Nothing;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let hi = |old: u64, v: u32| (old & 0xffff_ffff) | (u64::from(v) << 32);
        let lo = |old: u64, v: u32| (old & !0xffff_ffff) | u64::from(v);
        match offset {
            0x014 => self.s.device_features_sel = v,
            0x020 => {
                let offered = self.features;
                let f = &mut self.s.driver_features;
                match self.s.driver_features_sel {
                    0 => *f = lo(*f, v) & offered,
                    1 => *f = hi(*f, v) & offered,
                    _ => {}
                }
            }
            0x024 => self.s.driver_features_sel = v,
            0x030 => self.s.queue_sel = v,
            0x044 => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1)
                }
            }
            0x050 => return Written::Notify(v.min(u32::from(u16::MAX)) as u16),
            0x064 => self.s.interrupt_status &= !v,
            0x070 => {
                if v == 0 {
                    self.reset();
                    return Written::Reset;
                } else if v & STATUS_FEATURES_OK != 0 && self.s.driver_features & F_VERSION_1 == 0 {
                    // A modern device needs VERSION_1: refuse FEATURES_OK.
                    self.s.status = v & !STATUS_FEATURES_OK;
                } else {
                    self.s.status = v;
                }
            }
            _ => {
                // Queue layout: only while the selected queue is not ready.
                let Some(q) = self.selected().filter(|q| !q.ready()) else {
                    return Written::Nothing;
                };
                match offset {
                    0x038 => q.set_size(v.min(0xffff) as u16),
                    0x080 => q.set_desc_table_address(Some(v), None),
                    0x084 => q.set_desc_table_address(None, Some(v)),
                    0x090 => q.set_avail_ring_address(Some(v), None),
                    0x094 => q.set_avail_ring_address(None, Some(v)),
                    0x0a0 => q.set_used_ring_address(Some(v), None),
                    0x0a4 => q.set_used_ring_address(None, Some(v)),
                    _ => {}
                }
            }
        }
        Written::Nothing
    }

    fn reset(&mut self) {
        let n = self.queues.len();
        self.s = TransportState {
            queues: vec![QueueSave::default(); n],
            ..Default::default()
        };
        for q in &mut self.queues {
            q.reset();
        }
    }

    /// Whether queue `n` may be served now.
    pub fn usable(&self, n: usize, mem: &GuestMemory) -> bool {
        self.s.status & STATUS_DRIVER_OK != 0
            && self.s.status & STATUS_FAILED == 0
            && self
                .queues
                .get(n)
                .is_some_and(|q| q.ready() && q.is_valid(mem))
    }

    /// The driver broke a queue (its used ring is outside guest memory): stop serving.
    pub fn fail(&mut self) {
        self.s.status |= STATUS_FAILED;
    }

    /// Raises the used-buffer interrupt (and records it).
    pub fn signal(&mut self) {
        self.s.interrupt_status |= 1;
        self.irq
            .events
            .record(DeviceEvent::Interrupt { gsi: self.irq.gsi });
        let _ = self.irq.fd.write(1);
    }
}
