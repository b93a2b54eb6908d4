//! One virtual CPU: running it, its exits as owned values, and its architectural state.

use crate::kick::{KickTarget, install_kick_handler};
use crate::{HypervisorError, Kicker, Result, StateCaps, ioctl};
use kvm_bindings::{
    CpuId, Msrs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events,
};
use kvm_ioctls::{VcpuExit as KvmExit, VcpuFd};
use std::sync::Arc;

/// Why `KVM_RUN` returned. Owned, so the caller can hold it while it calls back into the vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExit {
    /// `in`: answer with [`Vcpu::complete_io_in`] (`size * count` bytes) before the next run.
    IoIn {
        port: u16,
        size: u8,
        count: u32,
    },
    /// `out`: `data` holds `count` accesses of `size` bytes each.
    IoOut {
        port: u16,
        size: u8,
        data: Vec<u8>,
    },
    /// A read of unbacked guest-physical memory: answer with [`Vcpu::complete_mmio_read`].
    MmioRead {
        addr: u64,
        len: u8,
    },
    MmioWrite {
        addr: u64,
        len: u8,
        data: [u8; 8],
    },
    Hlt,
    /// Triple fault: the guest cannot continue.
    Shutdown,
    /// KVM could not handle something; suberror 1 is an instruction its emulator gave up on.
    InternalError {
        suberror: u32,
        data: Vec<u64>,
    },
    /// The hardware refused to enter the guest.
    FailEntry {
        reason: u64,
        cpu: u32,
    },
    /// A guest-initiated system event (reset, shutdown, crash) from in-kernel devices.
    SystemEvent {
        kind: u32,
        data: Vec<u64>,
    },
    /// A kick (or another signal) made `KVM_RUN` return; nothing happened in the guest.
    Interrupted,
    Debug,
    /// Any exit this layer does not decode, with KVM's exit reason.
    Unknown(u32),
}

/// The exit KVM's emulator reports when it cannot complete an instruction.
pub const INTERNAL_ERROR_EMULATION: u32 = kvm_bindings::KVM_INTERNAL_ERROR_EMULATION;

#[derive(Clone, Copy, Debug)]
enum Pending {
    None,
    IoIn { len: usize },
    MmioRead { len: usize },
}

pub struct Vcpu {
    id: u32,
    pub(crate) fd: VcpuFd,
    run_size: usize,
    pending: Pending,
    kick: Arc<KickTarget>,
    caps: StateCaps,
}

impl Vcpu {
    pub(crate) fn new(id: u32, mut fd: VcpuFd, run_size: usize, caps: StateCaps) -> Result<Self> {
        install_kick_handler()?;
        let immediate_exit = std::ptr::addr_of_mut!(fd.get_kvm_run().immediate_exit);
        Ok(Vcpu {
            id,
            fd,
            run_size,
            pending: Pending::None,
            kick: KickTarget::new(immediate_exit),
            caps,
        })
    }

    pub(crate) fn caps(&self) -> StateCaps {
        self.caps
    }

    pub(crate) fn kick_target(&self) -> &KickTarget {
        &self.kick
    }

    /// Forgets the exit whose completion was pending (KVM completed it).
    pub(crate) fn pending_done(&mut self) {
        self.pending = Pending::None;
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// A handle other threads use to make this vCPU's `run` return promptly.
    pub fn kicker(&self) -> Kicker {
        Kicker::new(self.kick.clone())
    }

    /// Runs the guest until the next exit.
    pub fn run(&mut self) -> Result<VcpuExit> {
        self.pending = Pending::None;
        self.kick.entering();
        let raw = self.fd.run();
        self.kick.left();
        let exit = match raw {
            Ok(exit) => convert(exit),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Decoded::Exit(VcpuExit::Interrupted)
            }
            Err(e) => return Err(ioctl("KVM_RUN")(e)),
        };
        let exit = match exit {
            Decoded::Exit(e) => e,
            Decoded::NeedsRun(f) => f(self.fd.get_kvm_run()),
        };
        match &exit {
            VcpuExit::Interrupted => self.kick.clear(),
            VcpuExit::IoIn { size, count, .. } => {
                let len = usize::from(*size) * (*count as usize);
                self.pending = Pending::IoIn { len };
            }
            VcpuExit::MmioRead { len, .. } => {
                self.pending = Pending::MmioRead {
                    len: usize::from(*len),
                };
            }
            _ => {}
        }
        Ok(exit)
    }

    /// Supplies the data of the `in` the last exit asked for.
    pub fn complete_io_in(&mut self, data: &[u8]) -> Result<()> {
        let Pending::IoIn { len } = self.pending else {
            return Err(HypervisorError::NothingPending { what: "port read" });
        };
        if data.len() != len {
            return Err(HypervisorError::InDataSize {
                what: "port read",
                got: data.len(),
                want: len,
            });
        }
        let run_size = self.run_size;
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_IO (pending is IoIn and no run happened since),
        // so `io` is the active union member.
        let offset = unsafe { run.__bindgen_anon_1.io.data_offset };
        let end = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(len).map(|e| (o, e)));
        let Some((start, end)) = end.filter(|&(_, e)| e <= run_size) else {
            return Err(HypervisorError::InDataSize {
                what: "port read",
                got: len,
                want: 0,
            });
        };
        let base = std::ptr::from_mut(run).cast::<u8>();
        // SAFETY: the kvm_run mapping is `run_size` bytes long and [start, end) lies inside it
        // (checked above); the source is a distinct Rust slice of exactly `end - start` bytes.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), base.add(start), end - start) };
        self.pending = Pending::None;
        Ok(())
    }

    /// Supplies the data of the MMIO read the last exit asked for.
    pub fn complete_mmio_read(&mut self, data: &[u8]) -> Result<()> {
        let Pending::MmioRead { len } = self.pending else {
            return Err(HypervisorError::NothingPending { what: "MMIO read" });
        };
        if data.len() != len || len > 8 {
            return Err(HypervisorError::InDataSize {
                what: "MMIO read",
                got: data.len(),
                want: len,
            });
        }
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_MMIO (pending is MmioRead), so `mmio` is the
        // active union member; writing plain bytes into it is sound.
        let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
        mmio.data[..len].copy_from_slice(data);
        self.pending = Pending::None;
        Ok(())
    }

    pub fn regs(&self) -> Result<kvm_regs> {
        self.fd.get_regs().map_err(ioctl("KVM_GET_REGS"))
    }

    pub fn set_regs(&self, regs: &kvm_regs) -> Result<()> {
        self.fd.set_regs(regs).map_err(ioctl("KVM_SET_REGS"))
    }

    pub fn sregs(&self) -> Result<kvm_sregs> {
        self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))
    }

    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<()> {
        self.fd.set_sregs(sregs).map_err(ioctl("KVM_SET_SREGS"))
    }

    pub fn fpu(&self) -> Result<kvm_fpu> {
        self.fd.get_fpu().map_err(ioctl("KVM_GET_FPU"))
    }

    pub fn set_fpu(&self, fpu: &kvm_fpu) -> Result<()> {
        self.fd.set_fpu(fpu).map_err(ioctl("KVM_SET_FPU"))
    }

    pub fn lapic(&self) -> Result<kvm_lapic_state> {
        self.fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))
    }

    pub fn set_lapic(&self, lapic: &kvm_lapic_state) -> Result<()> {
        self.fd.set_lapic(lapic).map_err(ioctl("KVM_SET_LAPIC"))
    }

    /// The guest TSC's frequency in kHz (the host's unless it was scaled).
    pub fn tsc_khz(&self) -> Result<u32> {
        self.fd.get_tsc_khz().map_err(ioctl("KVM_GET_TSC_KHZ"))
    }

    pub fn set_cpuid2(&self, cpuid: &CpuId) -> Result<()> {
        self.fd.set_cpuid2(cpuid).map_err(ioctl("KVM_SET_CPUID2"))
    }

    /// The CPUID KVM reports for this vCPU (on PVM hosts the host's own, whatever was set).
    pub fn cpuid(&self) -> Result<CpuId> {
        self.fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_CPUID2"))
    }

    pub fn mp_state(&self) -> Result<kvm_mp_state> {
        self.fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))
    }

    pub fn vcpu_events(&self) -> Result<kvm_vcpu_events> {
        self.fd
            .get_vcpu_events()
            .map_err(ioctl("KVM_GET_VCPU_EVENTS"))
    }

    pub fn set_vcpu_events(&self, events: &kvm_vcpu_events) -> Result<()> {
        self.fd
            .set_vcpu_events(events)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))
    }

    /// Delivers exception `vector` on the next entry, with the current RIP as the return
    /// address (for a trap such as #BP, advance RIP past the instruction first). For #PF, set
    /// CR2 through [`Vcpu::set_sregs`] before.
    pub fn inject_exception(&self, vector: u8, error_code: Option<u32>) -> Result<()> {
        let mut events = self.vcpu_events()?;
        events.exception.injected = 1;
        events.exception.pending = 0;
        events.exception.nr = vector;
        events.exception.has_error_code = u8::from(error_code.is_some());
        events.exception.error_code = error_code.unwrap_or(0);
        self.set_vcpu_events(&events)
    }

    /// Reads the given MSRs; each comes back as (index, value).
    pub fn msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>> {
        let entries: Vec<kvm_msr_entry> = indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| HypervisorError::MsrRejected {
            accepted: 0,
            requested: indices.len(),
            first_rejected: indices.first().copied().unwrap_or(0),
        })?;
        let read = self.fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        if read != indices.len() {
            return Err(HypervisorError::MsrRejected {
                accepted: read,
                requested: indices.len(),
                first_rejected: indices.get(read).copied().unwrap_or(0),
            });
        }
        Ok(msrs.as_slice().iter().map(|e| (e.index, e.data)).collect())
    }

    /// Writes every MSR or reports the first one KVM refused.
    pub fn set_msrs(&self, values: &[(u32, u64)]) -> Result<()> {
        let entries: Vec<kvm_msr_entry> = values
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let rejected = |accepted: usize| HypervisorError::MsrRejected {
            accepted,
            requested: values.len(),
            first_rejected: values.get(accepted).map_or(0, |v| v.0),
        };
        let msrs = Msrs::from_entries(&entries).map_err(|_| rejected(0))?;
        let written = self.fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
        if written != values.len() {
            return Err(rejected(written));
        }
        Ok(())
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        // Before the kvm_run mapping goes away with `fd`.
        self.kick.detach();
    }
}

/// Most exits decode from kvm-ioctls' view; a few need fields only `kvm_run` has.
enum Decoded {
    Exit(VcpuExit),
    NeedsRun(fn(&mut kvm_bindings::kvm_run) -> VcpuExit),
}

fn convert(exit: KvmExit<'_>) -> Decoded {
    use Decoded::{Exit, NeedsRun};
    match exit {
        KvmExit::IoOut(..) => NeedsRun(io_out),
        KvmExit::IoIn(..) => NeedsRun(io_in),
        KvmExit::MmioRead(addr, data) => Exit(VcpuExit::MmioRead {
            addr,
            len: data.len().min(8) as u8,
        }),
        KvmExit::MmioWrite(addr, data) => {
            let mut buf = [0u8; 8];
            let len = data.len().min(8);
            buf[..len].copy_from_slice(&data[..len]);
            Exit(VcpuExit::MmioWrite {
                addr,
                len: len as u8,
                data: buf,
            })
        }
        KvmExit::Hlt => Exit(VcpuExit::Hlt),
        KvmExit::Shutdown => Exit(VcpuExit::Shutdown),
        KvmExit::InternalError => NeedsRun(internal_error),
        KvmExit::FailEntry(reason, cpu) => Exit(VcpuExit::FailEntry { reason, cpu }),
        KvmExit::SystemEvent(kind, data) => Exit(VcpuExit::SystemEvent {
            kind,
            data: data.to_vec(),
        }),
        KvmExit::Intr => Exit(VcpuExit::Interrupted),
        KvmExit::Debug(_) => Exit(VcpuExit::Debug),
        _ => NeedsRun(unknown),
    }
}

fn io_out(run: &mut kvm_bindings::kvm_run) -> VcpuExit {
    // SAFETY: called only for KVM_EXIT_IO, where `io` is the active union member.
    let io = unsafe { run.__bindgen_anon_1.io };
    let len = usize::from(io.size) * io.count as usize;
    let base = std::ptr::from_mut(run).cast::<u8>();
    // SAFETY: KVM places the `out` data at data_offset inside the kvm_run mapping, and
    // kvm-ioctls already built a slice of exactly this range for this exit (so it is in bounds).
    let data = unsafe { std::slice::from_raw_parts(base.add(io.data_offset as usize), len) };
    VcpuExit::IoOut {
        port: io.port,
        size: io.size,
        data: data.to_vec(),
    }
}

fn io_in(run: &mut kvm_bindings::kvm_run) -> VcpuExit {
    // SAFETY: called only for KVM_EXIT_IO, where `io` is the active union member.
    let io = unsafe { run.__bindgen_anon_1.io };
    VcpuExit::IoIn {
        port: io.port,
        size: io.size,
        count: io.count,
    }
}

fn internal_error(run: &mut kvm_bindings::kvm_run) -> VcpuExit {
    // SAFETY: called only for KVM_EXIT_INTERNAL_ERROR, where `internal` is the active member.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    VcpuExit::InternalError {
        suberror: internal.suberror,
        data: internal.data[..n].to_vec(),
    }
}

fn unknown(run: &mut kvm_bindings::kvm_run) -> VcpuExit {
    VcpuExit::Unknown(run.exit_reason)
}
