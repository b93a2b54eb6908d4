//! The machine: configuration, loading, hart threads and the control handle.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::Error;
use crate::clint::{CLINT_BASE, CLINT_SIZE, Clint};
use crate::csr::{MENVCFG_STCE, MSTATUS_FS};
use crate::fdt::{self, FdtParams, MAX_VIRTIO_SLOTS};
use crate::hart::{Hart, PRV_M, PRV_S};
use crate::memory::{GuestRam, MmioDevice, RAM_BASE};
use crate::plic::{IrqLine, PLIC_BASE, PLIC_NDEV, PLIC_SIZE, Plic};
use crate::shared::{HSM_STARTED, HSM_STOPPED, Shared, lock};

/// Most harts a machine may have (PLIC contexts and hart masks stay within 64 bits).
pub const MAX_HARTS: usize = 32;
/// Guest physical address of the test finisher (SiFive "test" device, as on QEMU virt):
/// writing 0x5555 powers off, 0x7777 reboots, (code << 16) | 0x3333 fails with `code`.
pub const FINISHER_BASE: u64 = 0x10_0000;
/// Kernel load offset from the start of RAM when the Image header gives none.
const DEFAULT_TEXT_OFFSET: u64 = 0x20_0000;
/// Room reserved at the top of RAM for the device tree.
const FDT_ROOM: u64 = 2 << 20;

/// How to build a machine.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    /// Number of harts (1..=32), one host thread each.
    pub harts: usize,
    /// Guest RAM at 0x8000_0000, a multiple of 2 MiB.
    pub memory_bytes: u64,
    /// Kernel command line (device tree `/chosen/bootargs`).
    pub cmdline: String,
    /// virtio-mmio slots to describe in the device tree (0..=8).
    pub virtio_mmio_slots: usize,
    /// `time` CSR / mtime frequency in Hz.
    pub timebase_hz: u64,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            harts: 1,
            memory_bytes: 256 << 20,
            cmdline: String::new(),
            virtio_mmio_slots: 0,
            timebase_hz: 10_000_000,
        }
    }
}

/// Why `Machine::run` returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked to power off (SBI SRST shutdown, or the test finisher's pass code).
    PowerOff,
    /// The guest asked to reboot.
    Reboot,
    /// `MachineHandle::stop` was called.
    Stopped,
    /// The guest did something the machine cannot continue from (message says what).
    Fault(String),
}

struct Finisher(Weak<Shared>);

impl MmioDevice for Finisher {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        let Some(s) = self.0.upgrade() else { return };
        if offset != 0 || data.len() < 4 {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match v & 0xffff {
            0x5555 => s.finish(ExitReason::PowerOff),
            0x7777 => s.finish(ExitReason::Reboot),
            0x3333 => s.finish(ExitReason::Fault(format!(
                "guest reported failure code {}",
                v >> 16
            ))),
            _ => {}
        }
    }
}

/// An RV64GC machine (see the crate documentation).
pub struct Machine {
    pub(crate) shared: Arc<Shared>,
    pub(crate) harts: Mutex<Vec<Hart>>,
    pub(crate) plic: Arc<Plic>,
    pub(crate) cfg: MachineConfig,
    kernel_end: Option<u64>,
    initrd: Option<(u64, u64)>,
    /// The device tree still has to be written into RAM (a kernel was loaded and has not
    /// run yet); a restored machine has its own in RAM already.
    pub(crate) fdt_pending: AtomicBool,
    running: AtomicBool,
}

impl Machine {
    /// Creates a machine with RAM, CLINT, PLIC and the test finisher; no kernel yet.
    pub fn new(cfg: MachineConfig) -> Result<Machine, Error> {
        let ram = GuestRam::new(cfg.memory_bytes)?;
        Self::with_ram(cfg, ram)
    }

    /// Like [`Machine::new`], on RAM the caller made (a snapshot's memory file:
    /// [`GuestRam::from_file`]); it must be `cfg.memory_bytes` long.
    pub fn with_ram(cfg: MachineConfig, ram: GuestRam) -> Result<Machine, Error> {
        if ram.size() != cfg.memory_bytes {
            return Err(Error::Config(format!(
                "the RAM given is {} bytes but the configuration says {}",
                ram.size(),
                cfg.memory_bytes
            )));
        }
        if cfg.harts == 0 || cfg.harts > MAX_HARTS {
            return Err(Error::Config(format!(
                "{} harts requested; use 1 to {MAX_HARTS}",
                cfg.harts
            )));
        }
        if cfg.virtio_mmio_slots > MAX_VIRTIO_SLOTS {
            return Err(Error::Config(format!(
                "{} virtio-mmio slots requested; use at most {MAX_VIRTIO_SLOTS}",
                cfg.virtio_mmio_slots
            )));
        }
        if !(1_000..=1_000_000_000).contains(&cfg.timebase_hz) {
            return Err(Error::Config(format!(
                "timebase {} Hz is out of range; use 1 kHz to 1 GHz (10 MHz is typical)",
                cfg.timebase_hz
            )));
        }
        let shared = Arc::new(Shared::new(ram, cfg.harts, cfg.timebase_hz));
        let plic = Arc::new(Plic::new(Arc::downgrade(&shared), cfg.harts));
        {
            let mut bus = lock(&shared.bus);
            let sz = cfg.memory_bytes;
            bus.add(
                CLINT_BASE,
                CLINT_SIZE,
                Arc::new(Clint::new(Arc::downgrade(&shared))),
                sz,
            )?;
            bus.add(PLIC_BASE, PLIC_SIZE, plic.clone(), sz)?;
            bus.add(
                FINISHER_BASE,
                0x1000,
                Arc::new(Finisher(Arc::downgrade(&shared))),
                sz,
            )?;
        }
        let harts = (0..cfg.harts)
            .map(|h| Hart::new(Arc::clone(&shared), h))
            .collect();
        for l in &shared.links {
            l.hsm.store(HSM_STARTED, Ordering::SeqCst);
        }
        Ok(Machine {
            shared,
            harts: Mutex::new(harts),
            plic,
            cfg,
            kernel_end: None,
            initrd: None,
            fdt_pending: AtomicBool::new(false),
            running: AtomicBool::new(false),
        })
    }

    /// Guest RAM (for loaders, DMA-capable devices and tests).
    pub fn ram(&self) -> &GuestRam {
        &self.shared.ram
    }

    /// Adds an external device at `[base, base+size)`; must not overlap RAM or another device.
    pub fn add_mmio_device(
        &mut self,
        base: u64,
        size: u64,
        dev: Arc<dyn MmioDevice>,
    ) -> Result<(), Error> {
        if self.running.load(Ordering::SeqCst) {
            return Err(Error::AlreadyRunning);
        }
        lock(&self.shared.bus).add(base, size, dev, self.cfg.memory_bytes)
    }

    /// The PLIC source `irq` (1..=63) as a line devices can drive from any thread.
    pub fn irq_line(&self, irq: u32) -> Result<IrqLine, Error> {
        if irq == 0 || irq > PLIC_NDEV {
            return Err(Error::Config(format!(
                "interrupt {irq} does not exist; the PLIC has sources 1 to {PLIC_NDEV}"
            )));
        }
        Ok(IrqLine::new(self.plic.clone(), irq))
    }

    /// Loads a RISC-V Linux `Image` (header at offset 0) and prepares a firmware-less boot:
    /// hart 0 starts in S-mode at the image with a0 = 0, a1 = device tree; other harts wait
    /// for SBI HSM hart_start.
    pub fn load_kernel(&mut self, image: &[u8]) -> Result<(), Error> {
        if image.len() < 64 {
            return Err(Error::Kernel("file is shorter than the 64-byte RISC-V Image header; pass an arch/riscv/boot/Image".into()));
        }
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&image[o..o + 8]);
            u64::from_le_bytes(b)
        };
        if &image[0x38..0x3c] != b"RSC\x05" {
            return Err(Error::Kernel("no RISC-V Image magic (\"RSC\\x05\" at offset 0x38); pass an uncompressed arch/riscv/boot/Image".into()));
        }
        let text_offset = match u64_at(8) {
            0 => DEFAULT_TEXT_OFFSET,
            t => t,
        };
        let image_size = u64_at(16).max(image.len() as u64);
        let load = RAM_BASE.checked_add(text_offset).filter(|a| a % 4096 == 0);
        let Some(load) = load else {
            return Err(Error::Kernel(format!(
                "text offset {text_offset:#x} is not page aligned"
            )));
        };
        let end = load.saturating_add(image_size);
        if end > RAM_BASE + self.cfg.memory_bytes - FDT_ROOM {
            return Err(Error::Kernel(format!(
                "kernel needs {image_size} bytes at {load:#x}; more than the {} MiB of RAM allows, raise the memory size",
                self.cfg.memory_bytes >> 20
            )));
        }
        self.shared.ram.write_bytes(load, image)?;
        self.kernel_end = Some(end);
        self.fdt_pending.store(true, Ordering::SeqCst);
        self.shared.firmware.store(true, Ordering::SeqCst);
        let mut harts = lock(&self.harts);
        for h in harts.iter_mut() {
            // What an SBI firmware leaves behind: traps delegated to S, counters and the
            // Sstc timer open to S, the FPU on.
            h.csr.medeleg = 0xb1ff;
            h.csr.mideleg = 0x222;
            h.csr.mcounteren = 7;
            // The time CSR open to user mode too: Linux's vDSO clock_gettime reads it there
            // (a kernel without the SBI PMU driver never sets this itself, and ping or wget
            // then die of SIGILL). Only time, as Linux's PMU driver does: cycle and instret
            // stay closed to user space.
            h.csr.scounteren = 2;
            h.csr.menvcfg = MENVCFG_STCE;
            h.csr.mstatus |= (1 << 13) & MSTATUS_FS;
            h.csr.satp = 0;
            h.set_prv(PRV_S);
            h.pc = load;
            h.x[10] = h.hartid as u64;
        }
        for (i, l) in self.shared.links.iter().enumerate() {
            l.hsm.store(
                if i == 0 { HSM_STARTED } else { HSM_STOPPED },
                Ordering::SeqCst,
            );
        }
        Ok(())
    }

    /// Places an initramfs high in RAM (below the device tree) and records it for the kernel.
    pub fn load_initrd(&mut self, initrd: &[u8]) -> Result<(), Error> {
        let top = RAM_BASE + self.cfg.memory_bytes - FDT_ROOM;
        let len = initrd.len() as u64;
        let start = top.checked_sub(len).map(|s| s & !0xfff);
        let floor = self.kernel_end.unwrap_or(RAM_BASE);
        match start {
            Some(start) if start >= floor => {
                self.shared.ram.write_bytes(start, initrd)?;
                self.initrd = Some((start, start + len));
                Ok(())
            }
            _ => Err(Error::Initrd(format!(
                "initrd of {len} bytes does not fit between the kernel and the device tree in {} MiB of RAM; raise the memory size",
                self.cfg.memory_bytes >> 20
            ))),
        }
    }

    /// Loads a bare-metal program at RAM base: every hart starts there in M-mode with
    /// a0 = hartid, and ecalls trap to the program itself (no built-in SBI).
    pub fn load_program(&mut self, program: &[u8]) -> Result<(), Error> {
        self.shared.ram.write_bytes(RAM_BASE, program)?;
        self.shared.firmware.store(false, Ordering::SeqCst);
        for h in lock(&self.harts).iter_mut() {
            h.pc = RAM_BASE;
            h.set_prv(PRV_M);
            h.x[10] = h.hartid as u64;
        }
        for l in &self.shared.links {
            l.hsm.store(HSM_STARTED, Ordering::SeqCst);
        }
        Ok(())
    }

    /// The device tree this machine passes to a kernel.
    pub fn device_tree(&self) -> Result<Vec<u8>, Error> {
        fdt::build(&FdtParams {
            harts: self.cfg.harts,
            memory_bytes: self.cfg.memory_bytes,
            cmdline: &self.cfg.cmdline,
            initrd: self.initrd,
            virtio_slots: self.cfg.virtio_mmio_slots,
            timebase: self.cfg.timebase_hz,
        })
    }

    /// Runs every hart on its own thread until the guest powers off, reboots, faults, or
    /// `MachineHandle::stop` is called.
    pub fn run(&self) -> Result<ExitReason, Error> {
        if self.running.swap(true, Ordering::SeqCst) {
            return Err(Error::AlreadyRunning);
        }
        let result = self.run_inner();
        self.running.store(false, Ordering::SeqCst);
        result
    }

    fn run_inner(&self) -> Result<ExitReason, Error> {
        let mut harts = lock(&self.harts);
        // Once, before the kernel's first instruction: a machine run again (or restored)
        // continues with the registers and RAM it has.
        if self.fdt_pending.swap(false, Ordering::SeqCst) {
            let dtb = self.device_tree()?;
            let dtb_addr = RAM_BASE + self.cfg.memory_bytes - FDT_ROOM;
            if dtb.len() as u64 > FDT_ROOM {
                return Err(Error::Fdt(format!(
                    "device tree of {} bytes exceeds its {FDT_ROOM}-byte area",
                    dtb.len()
                )));
            }
            self.shared.ram.write_bytes(dtb_addr, &dtb)?;
            for h in harts.iter_mut() {
                h.x[11] = dtb_addr;
            }
        }
        // A stop requested before this run (say, over the control socket while the monitor
        // was still setting up) is kept: the harts see it at their first poll. The flag is
        // cleared when a run ends instead, so that a machine can be run again.
        let bus = lock(&self.shared.bus).clone();
        let shared = &self.shared;
        std::thread::scope(|s| -> Result<(), Error> {
            let mut handles = Vec::new();
            for h in harts.iter_mut() {
                h.bus = bus.clone();
                h.halted = false;
                lock(&shared.control).running += 1;
                let builder = std::thread::Builder::new().name(format!("hart{}", h.hartid));
                let spawned = builder.spawn_scoped(s, move || {
                    crate::thread_started();
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.run()));
                    if r.is_err() {
                        h.shared.finish(ExitReason::Fault(format!(
                            "hart {} thread panicked (interpreter bug)",
                            h.hartid
                        )));
                    }
                    let mut c = lock(&h.shared.control);
                    c.running -= 1;
                    h.shared.cv.notify_all();
                });
                match spawned {
                    Ok(j) => handles.push(j),
                    Err(e) => {
                        lock(&shared.control).running -= 1;
                        shared.finish(ExitReason::Stopped);
                        return Err(Error::Thread(e.to_string()));
                    }
                }
            }
            Ok(())
        })?;
        let mut c = lock(&self.shared.control);
        c.stop = false;
        Ok(c.exit.take().unwrap_or(ExitReason::Stopped))
    }

    /// A cloneable control handle usable from other threads.
    pub fn handle(&self) -> MachineHandle {
        MachineHandle {
            shared: Arc::clone(&self.shared),
            plic: Arc::clone(&self.plic),
        }
    }

    /// Architectural state of hart `h` while the machine is not running (for tests and
    /// debugging); `None` while running or for a bad index.
    pub fn with_hart<R>(&self, h: usize, f: impl FnOnce(&Hart) -> R) -> Option<R> {
        let harts = self.harts.try_lock().ok()?;
        harts.get(h).map(f)
    }
}

/// Controls a machine from other threads.
#[derive(Clone)]
pub struct MachineHandle {
    pub(crate) shared: Arc<Shared>,
    pub(crate) plic: Arc<Plic>,
}

/// Per-hart counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Instructions retired by each hart (updated every few thousand instructions).
    pub retired: Vec<u64>,
}

impl MachineHandle {
    /// Stops every hart at its next poll and waits until all are parked (they block on a
    /// condition variable and use no CPU). Guest time stops too.
    pub fn pause(&self) {
        {
            let mut c = lock(&self.shared.control);
            if c.paused {
                return;
            }
            c.paused = true;
        }
        self.shared.clock.freeze();
        self.shared.kick_all();
        let mut c = lock(&self.shared.control);
        while c.parked < c.running && !c.stop {
            c = self.shared.cv.wait(c).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Lets paused harts continue exactly where they stopped.
    pub fn resume(&self) {
        let mut c = lock(&self.shared.control);
        if !c.paused {
            return;
        }
        c.paused = false;
        self.shared.clock.thaw();
        self.shared.cv.notify_all();
    }

    /// Ends `run` with `ExitReason::Stopped`.
    pub fn stop(&self) {
        self.shared.finish(ExitReason::Stopped);
    }

    /// True while paused.
    pub fn is_paused(&self) -> bool {
        lock(&self.shared.control).paused
    }

    pub fn stats(&self) -> Stats {
        Stats {
            retired: self
                .shared
                .links
                .iter()
                .map(|l| l.retired.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
