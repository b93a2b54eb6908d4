//! Boots a Linux Image on the software machine with a 16550 console on stdio.
//!
//! `cargo run --release -p vme-riscv --example boot -- KERNEL INITRD CMDLINE [HARTS] [MEMORY_MIB]`
//!
//! Prints to stderr the host time until the guest's `VME-GUEST-READY` marker line and the
//! machine's speed (millions of guest instructions per second, all harts together).

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use vm_superio::{Serial, Trigger};
use vme_riscv::{ExitReason, IrqLine, Machine, MachineConfig, MmioDevice, UART_BASE, UART_IRQ};

struct Irq(IrqLine);
impl Trigger for Irq {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.pulse();
        Ok(())
    }
}

/// Console output: forwarded to stdout, watched for the readiness marker.
struct Console {
    start: Instant,
    line: Vec<u8>,
    ready: Arc<Mutex<Option<Duration>>>,
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            if b == b'\n' {
                if self.line.windows(15).any(|w| w == b"VME-GUEST-READY") {
                    let mut r = self.ready.lock().unwrap_or_else(|e| e.into_inner());
                    r.get_or_insert(self.start.elapsed());
                }
                self.line.clear();
            } else if self.line.len() < 4096 {
                self.line.push(b);
            }
        }
        let mut out = std::io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

struct Uart(Mutex<Serial<Irq, vm_superio::serial::NoEvents, Console>>);
impl MmioDevice for Uart {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        data.fill(0);
        if offset < 8 {
            data[0] = s.read(offset as u8);
        }
    }
    fn write(&self, offset: u64, data: &[u8]) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if offset < 8 {
            // A console write error (closed stdout) must not stop the guest.
            let _ = s.write(offset as u8, data[0]);
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        anyhow::bail!("usage: boot KERNEL INITRD CMDLINE [HARTS] [MEMORY_MIB]");
    }
    let harts: usize = args
        .get(4)
        .map_or(Ok(1), |s| s.parse())
        .context("HARTS must be a number")?;
    let mem_mib: u64 = args
        .get(5)
        .map_or(Ok(256), |s| s.parse())
        .context("MEMORY_MIB must be a number")?;
    let kernel = std::fs::read(&args[1]).with_context(|| format!("reading kernel {}", args[1]))?;
    let initrd = std::fs::read(&args[2]).with_context(|| format!("reading initrd {}", args[2]))?;
    let mut m = Machine::new(MachineConfig {
        harts,
        memory_bytes: mem_mib << 20,
        cmdline: args[3].clone(),
        ..MachineConfig::default()
    })?;
    let start = Instant::now();
    let ready = Arc::new(Mutex::new(None));
    let console = Console {
        start,
        line: Vec::new(),
        ready: ready.clone(),
    };
    let uart = Arc::new(Uart(Mutex::new(Serial::new(
        Irq(m.irq_line(UART_IRQ)?),
        console,
    ))));
    m.add_mmio_device(UART_BASE, 0x100, uart.clone())?;
    m.load_kernel(&kernel)?;
    m.load_initrd(&initrd)?;
    // Forward stdin to the UART (until EOF).
    let input = uart.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut rest = &buf[..n];
            while !rest.is_empty() {
                let took = input
                    .0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .enqueue_raw_bytes(rest)
                    .unwrap_or(0);
                rest = &rest[took..];
                if took == 0 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    });
    let handle = m.handle();
    let why = m.run()?;
    let elapsed = start.elapsed();
    let retired: u64 = handle.stats().retired.iter().sum();
    eprintln!();
    eprintln!("exit: {why:?}");
    match *ready.lock().unwrap_or_else(|e| e.into_inner()) {
        Some(t) => eprintln!("VME-GUEST-READY after {:.2} s", t.as_secs_f64()),
        None => eprintln!("VME-GUEST-READY never seen"),
    }
    eprintln!(
        "{} instructions in {:.2} s: {:.1} MIPS ({harts} hart(s))",
        retired,
        elapsed.as_secs_f64(),
        retired as f64 / elapsed.as_secs_f64() / 1e6
    );
    if let Some(cpu) = cpu_seconds() {
        eprintln!(
            "host CPU time {cpu:.2} s: {:.1} MIPS per CPU-second",
            retired as f64 / cpu / 1e6
        );
    }
    if let ExitReason::Fault(msg) = why {
        anyhow::bail!("guest fault: {msg}");
    }
    Ok(())
}

/// User + system CPU time of this process (Linux /proc), to report speed independent of how
/// busy the host is.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}
