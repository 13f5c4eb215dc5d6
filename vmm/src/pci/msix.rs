//! MSI-X (PCI Local Bus 3.0, 6.8.2): the capability in configuration space, the
//! vector table and the pending bit array in a BAR, and delivery through the
//! device's [`MsiInterruptGroup`]. Every change the guest makes to a vector's message
//! or to a mask is handed to the group at once ([`MsiInterruptGroup::program`]), so
//! the group's own delivery path (a KVM irqfd, which a vhost-user backend may write
//! without us) follows the table. A vector fires with [`MsixConfig::trigger`]; while
//! the function or the vector is masked the message is held as a pending bit and sent
//! on unmask.
//!
//! The state is meant to be shared (`Arc<Mutex<MsixConfig>>`) between the device's
//! BAR and config handlers (vCPU threads) and its worker thread (interrupts).

use std::sync::Arc;

use crate::interrupt::{MsiInterruptGroup, MsiMessage};

use super::config::{ConfigError, ConfigSpace};

pub const CAP_ID_MSIX: u8 = 0x11;
/// Bytes per table entry: address low, address high, data, vector control.
pub const TABLE_ENTRY_SIZE: u64 = 16;
/// The most vectors a function may have.
pub const MAX_VECTORS: u16 = 2048;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

/// Adds the MSI-X capability for `vectors` vectors whose table and PBA lie in BAR
/// `bar` at the given offsets (8-byte aligned). Returns the capability's offset; the
/// message control register is at `offset + 2`.
pub fn add_capability(config: &mut ConfigSpace, vectors: u16, bar: u8, table_offset: u32, pba_offset: u32) -> Result<usize, ConfigError> {
    add_capability_at(config, vectors, (bar, table_offset), (bar, pba_offset))
}

/// [`add_capability`] with the table and the PBA each in a BAR of its own choosing
/// (`(bar, offset)`), as a passed-through device may have them.
pub fn add_capability_at(config: &mut ConfigSpace, vectors: u16, table: (u8, u32), pba: (u8, u32)) -> Result<usize, ConfigError> {
    let control = vectors.clamp(1, MAX_VECTORS) - 1;
    let mut body = Vec::with_capacity(10);
    body.extend_from_slice(&control.to_le_bytes());
    body.extend_from_slice(&((table.1 & !7) | u32::from(table.0 & 7)).to_le_bytes());
    body.extend_from_slice(&((pba.1 & !7) | u32::from(pba.0 & 7)).to_le_bytes());
    // Only the enable and function mask bits are writable.
    let wmask = [0x00, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0];
    config.add_capability(CAP_ID_MSIX, &body, &wmask)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    address_lo: u32,
    address_hi: u32,
    data: u32,
    control: u32,
}

impl Default for Entry {
    fn default() -> Self {
        // Vectors come out of reset masked.
        Self { address_lo: 0, address_hi: 0, data: 0, control: VECTOR_MASKED }
    }
}

/// The MSI-X state of one function.
pub struct MsixConfig {
    entries: Vec<Entry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    group: Arc<dyn MsiInterruptGroup>,
}

impl MsixConfig {
    /// `group` delivers the vectors (at least `vectors` of them).
    pub fn new(vectors: u16, group: Arc<dyn MsiInterruptGroup>) -> Self {
        let n = usize::from(vectors.clamp(1, MAX_VECTORS));
        Self { entries: vec![Entry::default(); n], pending: vec![false; n], enabled: false, function_masked: false, group }
    }

    /// The group delivering the vectors (e.g. for a vector's eventfd).
    pub fn group(&self) -> &Arc<dyn MsiInterruptGroup> {
        &self.group
    }

    pub fn vectors(&self) -> u16 {
        u16::try_from(self.entries.len()).expect("at most MAX_VECTORS")
    }

    /// Bytes the table takes in its BAR.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * TABLE_ENTRY_SIZE
    }

    /// Bytes the PBA takes (whole qwords).
    pub fn pba_size(&self) -> u64 {
        self.entries.len().div_ceil(64) as u64 * 8
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    /// The guest wrote the capability's message control register.
    pub fn set_control(&mut self, control: u16) {
        let (enabled, function_masked) = (control & CONTROL_ENABLE != 0, control & CONTROL_FUNCTION_MASK != 0);
        if (enabled, function_masked) == (self.enabled, self.function_masked) {
            return;
        }
        self.enabled = enabled;
        self.function_masked = function_masked;
        for v in 0..self.entries.len() {
            self.reprogram(v);
        }
        self.deliver_pending();
    }

    /// Back to the power-on state (all vectors masked, disabled).
    pub fn reset(&mut self) {
        self.entries.fill(Entry::default());
        self.pending.fill(false);
        self.enabled = false;
        self.function_masked = false;
        for v in 0..self.entries.len() {
            self.reprogram(v);
        }
    }

    /// Hands vector `v`'s message and whether it may be delivered to the group.
    fn reprogram(&self, v: usize) {
        let deliverable = self.enabled && !self.masked(v);
        let vector = u16::try_from(v).expect("at most MAX_VECTORS");
        if let Err(e) = self.group.program(vector, self.message(v), deliverable) {
            crate::guest_warn!("MSI-X vector {v}: {e}");
        }
    }

    fn message(&self, vector: usize) -> MsiMessage {
        let e = self.entries[vector];
        MsiMessage { address: u64::from(e.address_hi) << 32 | u64::from(e.address_lo), data: e.data }
    }

    fn masked(&self, vector: usize) -> bool {
        self.function_masked || self.entries[vector].control & VECTOR_MASKED != 0
    }

    fn send(&self, vector: usize) {
        if let Err(e) = self.group.fire(u16::try_from(vector).expect("at most MAX_VECTORS")) {
            crate::guest_warn!("MSI-X vector {vector}: {e}");
        }
    }

    /// Raises `vector`: sent now, or held pending while masked. Ignored while MSI-X is
    /// disabled (there is no INTx to fall back on) or for a vector out of range.
    pub fn trigger(&mut self, vector: u16) {
        let v = usize::from(vector);
        if !self.enabled || v >= self.entries.len() {
            return;
        }
        if self.masked(v) {
            self.pending[v] = true;
        } else {
            self.send(v);
        }
    }

    /// Whether `vector` is pending (the PBA bit).
    pub fn pending(&self, vector: u16) -> bool {
        self.pending.get(usize::from(vector)).copied().unwrap_or(false)
    }

    fn deliver_pending(&mut self) {
        if !self.enabled {
            return;
        }
        for v in 0..self.entries.len() {
            if self.pending[v] && !self.masked(v) {
                self.pending[v] = false;
                self.send(v);
            }
        }
    }

    fn entry_dword(&self, vector: usize, dword: usize) -> u32 {
        let e = &self.entries[vector];
        match dword {
            0 => e.address_lo,
            1 => e.address_hi,
            2 => e.data,
            _ => e.control,
        }
    }

    /// A guest read of the table at `offset` (4 or 8 bytes, aligned; others read 0).
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !matches!(data.len(), 4 | 8) || offset % data.len() as u64 != 0 || offset >= self.table_size() {
            return;
        }
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let dw = (offset / 4) as usize + i;
            let (vector, dword) = (dw / 4, dw % 4);
            chunk.copy_from_slice(&self.entry_dword(vector, dword).to_le_bytes());
        }
    }

    /// A guest write of the table (4 or 8 bytes, aligned; others are dropped).
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        if !matches!(data.len(), 4 | 8) || offset % data.len() as u64 != 0 || offset >= self.table_size() {
            return;
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            let dw = (offset / 4) as usize + i;
            let (vector, dword) = (dw / 4, dw % 4);
            let v = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let before = self.entries[vector];
            let e = &mut self.entries[vector];
            match dword {
                0 => e.address_lo = v & !3,
                1 => e.address_hi = v,
                2 => e.data = v,
                _ => e.control = v & VECTOR_MASKED,
            }
            if self.entries[vector] != before {
                self.reprogram(vector);
            }
            if dword == 3 && self.enabled && self.pending[vector] && !self.masked(vector) {
                self.pending[vector] = false;
                self.send(vector);
            }
        }
    }

    /// A guest read of the PBA (read-only; writes are ignored by the caller).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        // Offsets past the PBA read zeros, like the bits past the last vector.
        let offset = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, byte) in data.iter_mut().enumerate() {
            let first = offset.saturating_add(i).saturating_mul(8);
            *byte = (0..8).fold(0u8, |b, bit| b | (u8::from(self.pending.get(first.saturating_add(bit)) == Some(&true)) << bit));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::interrupt::InterruptError;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    /// Records what reaches the guest: each fire of a deliverable vector, as the
    /// message the vector holds then (a fire of an undeliverable one would be a bug).
    #[derive(Default)]
    pub struct RecordingGroup {
        vectors: Mutex<BTreeMap<u16, (MsiMessage, bool)>>,
        delivered: Mutex<Vec<MsiMessage>>,
    }

    impl MsiInterruptGroup for RecordingGroup {
        fn program(&self, vector: u16, msg: MsiMessage, deliverable: bool) -> Result<(), InterruptError> {
            self.vectors.lock().unwrap().insert(vector, (msg, deliverable));
            Ok(())
        }
        fn fire(&self, vector: u16) -> Result<(), InterruptError> {
            let (msg, deliverable) = self.vectors.lock().unwrap().get(&vector).copied().unwrap_or_default();
            assert!(deliverable, "vector {vector} fired while it may not be delivered");
            self.delivered.lock().unwrap().push(msg);
            Ok(())
        }
        fn notifier(&self, _vector: u16) -> Option<vmm_sys_util::eventfd::EventFd> {
            None
        }
    }

    impl RecordingGroup {
        pub fn take(&self) -> Vec<MsiMessage> {
            std::mem::take(&mut *self.delivered.lock().unwrap())
        }
        /// Whether the group was told the vector may be delivered.
        pub fn deliverable(&self, vector: u16) -> bool {
            self.vectors.lock().unwrap().get(&vector).is_some_and(|&(_, d)| d)
        }
    }

    fn program(m: &mut MsixConfig, vector: u64, address: u64, data: u32, masked: bool) {
        let base = vector * 16;
        m.write_table(base, &address.to_le_bytes());
        m.write_table(base + 8, &data.to_le_bytes());
        m.write_table(base + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn masking_holds_messages_pending_and_unmasking_delivers_them() {
        let sink = Arc::new(RecordingGroup::default());
        let mut m = MsixConfig::new(3, sink.clone());
        assert_eq!((m.table_size(), m.pba_size()), (48, 8));
        // Disabled: nothing happens, nothing pends.
        m.trigger(0);
        assert!(!m.pending(0));
        m.set_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        program(&mut m, 0, 0xfee0_0000, 0x41, false);
        program(&mut m, 1, 0xfee0_1000, 0x42, true);
        let mut b = [0u8; 8];
        m.read_table(0, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0xfee0_0000);
        m.read_table(16 + 12, &mut b[..4]);
        assert_eq!(b[..4], [1, 0, 0, 0]);
        // Function mask: both pend.
        m.trigger(0);
        m.trigger(1);
        m.trigger(7); // out of range: ignored
        assert!(sink.take().is_empty());
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b11);
        assert!(!sink.deliverable(0), "function-masked vectors are not deliverable");
        // Function unmask: vector 0 goes out, vector 1 (masked itself) still pends.
        m.set_control(CONTROL_ENABLE);
        assert!(sink.deliverable(0) && !sink.deliverable(1));
        assert_eq!(sink.take(), [MsiMessage { address: 0xfee0_0000, data: 0x41 }]);
        assert!(!m.pending(0) && m.pending(1));
        // Vector unmask delivers it; reprogramming the message reaches the group.
        m.write_table(16 + 12, &0u32.to_le_bytes());
        assert!(sink.deliverable(1));
        assert_eq!(sink.take(), [MsiMessage { address: 0xfee0_1000, data: 0x42 }]);
        assert!(!m.pending(1));
        // Unmasked: straight through.
        m.trigger(1);
        assert_eq!(sink.take().len(), 1);
        // Odd sizes and offsets are dropped.
        m.write_table(2, &[1, 2]);
        m.write_table(100, &[0; 4]);
        m.read_table(1, &mut b[..4]);
        assert_eq!(b[..4], [0; 4]);
        m.reset();
        assert!(!m.enabled());
        assert!(!sink.deliverable(0) && !sink.deliverable(1), "reset masks every vector at the group");
        m.read_table(12, &mut b[..4]);
        assert_eq!(b[..4], [1, 0, 0, 0], "masked after reset");
    }

    #[test]
    fn capability_layout() {
        let mut c = ConfigSpace::new(Default::default());
        let at = add_capability(&mut c, 3, 0, 0x4000, 0x5000).unwrap();
        assert_eq!(c.u16_at(at), 0x0011 | (c.u16_at(at) & 0xff00));
        assert_eq!(c.u16_at(at + 2), 2);
        assert_eq!(c.u32_at(at + 4), 0x4000);
        assert_eq!(c.u32_at(at + 8), 0x5000);
        c.write(at + 2, &0xffffu16.to_le_bytes());
        assert_eq!(c.u16_at(at + 2), 0xc002, "table size is read-only");
    }
}
