//! Guest-physical memory as the completer sees it: a trait the monitor implements over its
//! guest RAM mapping. The implementer bounds-checks every access; the completer never touches
//! host memory directly.

/// Why a guest-physical access could not be performed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// The range is not (entirely) backed by guest RAM: MMIO, a hole or beyond the end.
    #[error(
        "guest-physical range {gpa:#x}+{len} is not guest RAM (MMIO, a hole or beyond the end of memory)"
    )]
    NotRam { gpa: u64, len: usize },
    /// An atomic operation was asked for at an address not aligned to its size.
    #[error("atomic access of {len} bytes at guest-physical {gpa:#x} is not naturally aligned")]
    Unaligned { gpa: u64, len: usize },
}

/// Guest RAM access. All methods must refuse (with `Err`) any byte outside guest RAM, and must
/// never panic on any address or length.
pub trait GuestPhysMemory {
    /// Reads `buf.len()` bytes at `gpa`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError>;
    /// Writes `buf` at `gpa`.
    fn write(&mut self, gpa: u64, buf: &[u8]) -> Result<(), MemError>;
    /// Atomically: if the 8 bytes at `gpa` (8-aligned) equal `expected`, store `new`.
    /// Returns the value found (equal to `expected` exactly when the store happened).
    /// Must be a real atomic operation on the shared mapping (other vCPUs run concurrently);
    /// used for `cmpxchg8b` and for page-table accessed/dirty bits.
    fn compare_exchange_u64(&mut self, gpa: u64, expected: u64, new: u64) -> Result<u64, MemError>;
    /// Atomically: as [`Self::compare_exchange_u64`] for the 16 bytes at `gpa` (16-aligned),
    /// e.g. with the host's `lock cmpxchg16b`. Used for `cmpxchg16b`.
    fn compare_exchange_u128(
        &mut self,
        gpa: u64,
        expected: u128,
        new: u128,
    ) -> Result<u128, MemError>;
}
