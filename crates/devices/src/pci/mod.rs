//! A conventional PCI bus 0 for the x86_64 machine: a host bridge at device 0, functions in
//! slots 1..31, configuration space through the type-1 ports 0xCF8/0xCFC ([`root::ConfigIo`])
//! and ECAM ([`root::Ecam`]), memory BARs decoded inside one 32-bit window
//! ([`root::BarWindow`]) and MSI-X ([`msix`]).
//!
//! What is not emulated: bridges and other buses (accesses to bus ≠ 0 read all-ones), I/O
//! BARs, 64-bit BARs, expansion ROMs, INTx (the interrupt pin reads 0: functions interrupt
//! only through MSI-X), PCI Express capabilities and the extended configuration space
//! (offsets 0x100.. read as zero).
//!
//! Every configuration access, BAR value and MSI-X table entry comes from the guest: widths
//! and offsets are checked, read-only bits stay read-only ([`config::ConfigSpace`] applies a
//! write mask), and a BAR the guest moves anywhere only changes where this bus decodes the
//! function: outside the BAR window it decodes nothing, over RAM the guest's RAM wins (KVM
//! maps RAM before any exit reaches us), over another BAR the lower slot wins.

pub mod config;
pub mod msix;
pub mod root;
#[cfg(test)]
pub(crate) mod test_sink;

pub use config::ConfigSpace;
pub use msix::{MsiMessage, MsiSink, Msix};
pub use root::{BarAllocator, BarWindow, ConfigIo, Ecam, HostBridge, PciBus, PciError};

/// Size of one function's configuration space as ECAM addresses it; the first 256 bytes are
/// the conventional space, the rest reads as zero.
pub const CONFIG_SPACE_SIZE: usize = 4096;

/// One PCI function as the bus sees it.
pub trait PciFunction: Send {
    /// Reads `data.len()` (1, 2 or 4) bytes at `offset` (below [`CONFIG_SPACE_SIZE`]).
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    /// Writes configuration space; read-only bits are kept.
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// The memory BARs that decode now (memory decoding on): (BAR index, base, size).
    fn bar_ranges(&self) -> Vec<(usize, u64, u64)>;
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// Told when the guest moves a BAR or turns memory decoding on or off, for whoever placed
/// fast paths at the BAR's addresses (ioeventfds): `base` is `None` while the BAR decodes
/// nothing.
pub trait BarWatcher: Send {
    fn bar_moved(&mut self, bar: usize, base: Option<u64>);
}

#[cfg(test)]
mod tests;
