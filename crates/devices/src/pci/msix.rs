//! MSI-X (PCI Local Bus 3.0 §6.8.2): the capability, the vector table and the pending bit
//! array of one function.
//!
//! A vector is deliverable while MSI-X is enabled, the function is not masked and the
//! vector's own mask bit is clear; its message then goes to the [`MsiSink`] as a route, and
//! signalling it fires the route. A vector signalled while masked sets its pending bit and
//! fires when unmasked. The sink hears of a route only when the deliverable message changes
//! (the guest writes address and data while the vector is masked), so a route is
//! reprogrammed once per real change, not per dword.

use serde::{Deserialize, Serialize};

/// Capability ID of MSI-X.
pub const CAP_ID: u8 = 0x11;
/// Message control: MSI-X enable and function mask.
pub const CTRL_ENABLE: u16 = 1 << 15;
pub const CTRL_MASK: u16 = 1 << 14;
/// Size of one table entry: address low, address high, data, vector control.
pub const ENTRY_SIZE: u64 = 16;
/// Vector control: the vector is masked.
const VECTOR_MASKED: u32 = 1;
/// The most vectors a table can have.
pub const MAX_VECTORS: u16 = 2048;

/// A function's MSI-X vectors in a snapshot (enable and function mask live in the
/// capability's message control register, saved with the configuration space).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// Per vector: address low, address high, data, vector control.
    pub table: Vec<[u32; 4]>,
    pub pending: Vec<bool>,
}

/// One MSI message: where the device writes and what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// Where a function's MSI-X vectors go (on x86 KVM: a GSI route and an irqfd per vector).
pub trait MsiSink: Send + Sync {
    /// Vector `vector` now delivers `msg`, or nothing (`None`: disabled or masked).
    fn route(&self, vector: u16, msg: Option<MsiMessage>);
    /// Fires vector `vector` with its current route. Called on the device's hot path: it
    /// must not block for long.
    fn signal(&self, vector: u16);
}

pub struct Msix {
    /// Per vector: address low, address high, data, vector control.
    table: Vec<[u32; 4]>,
    pending: Vec<bool>,
    /// What the sink was last told per vector.
    routed: Vec<Option<MsiMessage>>,
    enabled: bool,
    function_masked: bool,
    sink: std::sync::Arc<dyn MsiSink>,
}

impl Msix {
    /// A table of `vectors` (1 to [`MAX_VECTORS`]) vectors, all masked, MSI-X disabled.
    pub fn new(vectors: u16, sink: std::sync::Arc<dyn MsiSink>) -> Self {
        let n = usize::from(vectors.clamp(1, MAX_VECTORS));
        Msix {
            table: vec![[0, 0, 0, VECTOR_MASKED]; n],
            pending: vec![false; n],
            routed: vec![None; n],
            enabled: false,
            function_masked: false,
            sink,
        }
    }

    pub fn vectors(&self) -> u16 {
        self.table.len() as u16
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Bytes the table occupies in its BAR.
    pub fn table_size(&self) -> u64 {
        self.table.len() as u64 * ENTRY_SIZE
    }

    /// Bytes the pending bit array occupies (whole qwords).
    pub fn pba_size(&self) -> u64 {
        (self.table.len() as u64).div_ceil(64) * 8
    }

    /// The capability body after ID and next pointer, and its write mask: message control
    /// (table size - 1; enable and function mask writable), table and PBA offset/BIR.
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> ([u8; 10], [u8; 10]) {
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(self.vectors() - 1).to_le_bytes());
        body[2..6].copy_from_slice(&(table_offset | u32::from(bar & 7)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_offset | u32::from(bar & 7)).to_le_bytes());
        let mut wmask = [0u8; 10];
        wmask[0..2].copy_from_slice(&(CTRL_ENABLE | CTRL_MASK).to_le_bytes());
        (body, wmask)
    }

    /// The message control register now reads `ctrl` (after any configuration write).
    pub fn set_control(&mut self, ctrl: u16) {
        let enabled = ctrl & CTRL_ENABLE != 0;
        let masked = ctrl & CTRL_MASK != 0;
        if (enabled, masked) == (self.enabled, self.function_masked) {
            return;
        }
        self.enabled = enabled;
        self.function_masked = masked;
        if !enabled {
            // Pending bits mean nothing without MSI-X.
            self.pending.iter_mut().for_each(|p| *p = false);
        }
        for v in 0..self.table.len() {
            self.sync(v);
        }
    }

    fn deliverable(&self, v: usize) -> bool {
        self.enabled && !self.function_masked && self.table[v][3] & VECTOR_MASKED == 0
    }

    /// Tells the sink about vector `v`'s route if it changed, then fires it if it became
    /// deliverable with its pending bit set.
    fn sync(&mut self, v: usize) {
        let e = self.table[v];
        let msg = self.deliverable(v).then_some(MsiMessage {
            address: u64::from(e[0]) | (u64::from(e[1]) << 32),
            data: e[2],
        });
        if msg != self.routed[v] {
            self.routed[v] = msg;
            self.sink.route(v as u16, msg);
        }
        if msg.is_some() && self.pending[v] {
            self.pending[v] = false;
            self.sink.signal(v as u16);
        }
    }

    /// The device raises vector `vector` (a vector past the table does nothing).
    pub fn signal(&mut self, vector: u16) {
        let v = usize::from(vector);
        if v >= self.table.len() || !self.enabled {
            return;
        }
        if self.deliverable(v) {
            self.sink.signal(vector);
        } else {
            self.pending[v] = true;
        }
    }

    /// Reads the table: dword or qword accesses, naturally aligned; anything else (or past
    /// the table) reads as zero.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if !matches!(data.len(), 4 | 8) || offset % data.len() as u64 != 0 {
            return;
        }
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let Some(o) = offset.checked_add(4 * i as u64) else {
                return;
            };
            let Some(e) = usize::try_from(o / ENTRY_SIZE)
                .ok()
                .and_then(|v| self.table.get(v))
            else {
                return;
            };
            chunk.copy_from_slice(&e[((o % ENTRY_SIZE) / 4) as usize].to_le_bytes());
        }
    }

    /// Writes the table, with the same access rules as reads. Vector control keeps only its
    /// mask bit (the rest is reserved).
    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        if !matches!(data.len(), 4 | 8) || offset % data.len() as u64 != 0 {
            return;
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            let Some(o) = offset.checked_add(4 * i as u64) else {
                return;
            };
            let v = usize::try_from(o / ENTRY_SIZE).unwrap_or(usize::MAX);
            if v >= self.table.len() {
                return;
            }
            let word = ((o % ENTRY_SIZE) / 4) as usize;
            let mut b = [0; 4];
            b.copy_from_slice(chunk);
            let val = u32::from_le_bytes(b);
            self.table[v][word] = if word == 3 { val & VECTOR_MASKED } else { val };
            self.sync(v);
        }
    }

    /// Reads the pending bit array (any width, aligned or not; past its end: zero).
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            // Vector numbers of this byte's bits; a byte past the array has none.
            let first = offset
                .checked_add(i as u64)
                .filter(|&byte| byte < self.pba_size())
                .map(|byte| byte as usize * 8);
            *b = first.map_or(0, |first| {
                (0..8)
                    .filter(|bit| self.pending.get(first + bit).copied().unwrap_or(false))
                    .fold(0u8, |acc, bit| acc | (1 << bit))
            });
        }
    }

    /// The state for a snapshot.
    pub fn state(&self) -> MsixState {
        MsixState {
            table: self.table.clone(),
            pending: self.pending.clone(),
        }
    }

    /// Takes a snapshot's vectors into this fresh table, with `ctrl` the message control
    /// register the configuration space was restored with; the sink hears every route that
    /// is deliverable (so the routes are rebuilt) and a pending deliverable vector fires.
    pub fn restore(&mut self, s: &MsixState, ctrl: u16) -> Result<(), String> {
        let n = self.table.len();
        if s.table.len() != n || s.pending.len() != n {
            return Err(format!(
                "{} MSI-X vectors and {} pending bits saved, the function has {n} vectors",
                s.table.len(),
                s.pending.len()
            ));
        }
        for (v, e) in s.table.iter().enumerate() {
            self.table[v] = [e[0], e[1], e[2], e[3] & VECTOR_MASKED];
        }
        self.enabled = ctrl & CTRL_ENABLE != 0;
        self.function_masked = ctrl & CTRL_MASK != 0;
        // Without MSI-X nothing is pending (set_control clears the bits when it goes off).
        let enabled = self.enabled;
        self.pending = s.pending.iter().map(|&p| p && enabled).collect();
        for v in 0..n {
            self.sync(v);
        }
        Ok(())
    }

    /// Whether vector `vector` is pending (for tests and diagnostics).
    pub fn pending(&self, vector: u16) -> bool {
        self.pending
            .get(usize::from(vector))
            .copied()
            .unwrap_or(false)
    }
}
