//! The software machine: an RV64GC interpreter (harts, MMU, CLINT, PLIC, SBI) that needs no
//! hardware support. It does no I/O of its own: devices reach it through the MMIO bus trait.
