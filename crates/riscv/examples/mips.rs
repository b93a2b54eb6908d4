//! Runs a flat bare-metal RV64 program (loaded at 0x8000_0000, M-mode) on one hart and prints
//! the interpreter's speed: a quick, low-noise way to compare interpreter changes.
//! Usage: `cargo run --release -p vme-riscv --example mips -- program.bin`

use std::time::Instant;

use vme_riscv::{Machine, MachineConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: mips <flat program binary>")?;
    let program = std::fs::read(&path)?;
    let mut m = Machine::new(MachineConfig {
        harts: 1,
        memory_bytes: 64 << 20,
        ..MachineConfig::default()
    })?;
    m.load_program(&program)?;
    let handle = m.handle();
    let start = Instant::now();
    let why = m.run()?;
    let secs = start.elapsed().as_secs_f64();
    let n: u64 = handle.stats().retired.iter().sum();
    println!(
        "{why:?}: {n} instructions in {secs:.3} s = {:.1} MIPS",
        n as f64 / secs / 1e6
    );
    Ok(())
}
