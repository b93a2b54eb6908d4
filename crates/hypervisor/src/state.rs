//! What KVM holds of a VM and its vCPUs, saved for a snapshot and set back on restore.
//!
//! Each KVM structure is kept as its bytes: the kernel's ABI, which KVM keeps stable across
//! versions. A snapshot is untrusted input, so every blob must have exactly its structure's
//! size and every list a bounded length; the values themselves are checked by KVM, which
//! must refuse whatever user space gives it that a vCPU cannot hold (a bad value can only
//! hurt the guest it is set in).
//!
//! Order matters on restore (the same as Firecracker's and QEMU's): CPUID, then registers,
//! special registers (they hold the APIC base), FPU or XSAVE state and XCRs, debug
//! registers, the local APIC, then MSRs (the TSC before the TSC deadline, which KVM only
//! takes once the APIC timer is in deadline mode), the multiprocessing state and the
//! pending events last.

use crate::{HypervisorError, Result, Vcpu, Vm, ioctl};
use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SIPI_VECTOR,
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// `MSR_IA32_TSC`: set before every other MSR, so the TSC deadline is relative to it.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `MSR_IA32_TSC_DEADLINE`: set last.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// More MSRs than KVM reports for any vCPU: a longer list is not ours.
const MAX_MSRS: usize = 1024;
/// The in-kernel irqchips as KVM_GET_IRQCHIP names them.
const CHIPS: [(u32, &str); 3] = [(0, "PIC master"), (1, "PIC slave"), (2, "IOAPIC")];

/// The FPU as KVM_GET_FPU returns it, for hosts without XSAVE.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuRegs {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuRegs {
    fn from(f: &kvm_fpu) -> Self {
        FpuRegs {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuRegs> for kvm_fpu {
    fn from(f: &FpuRegs) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// The floating-point and vector state: the whole XSAVE area with the XCRs where the host
/// has KVM_CAP_XSAVE, the legacy FPU/SSE state otherwise.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FpuState {
    Xsave {
        area: Vec<u8>,
        xcrs: Option<Vec<u8>>,
    },
    Legacy(Box<FpuRegs>),
}

/// One vCPU as KVM holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    /// The CPUID the guest was given (`kvm_cpuid_entry2` each).
    pub cpuid: Vec<Vec<u8>>,
    pub regs: Vec<u8>,
    pub sregs: Vec<u8>,
    pub fpu: FpuState,
    pub debugregs: Vec<u8>,
    pub lapic: Vec<u8>,
    /// Every MSR KVM reports as saved that this vCPU could read, as (index, value).
    pub msrs: Vec<(u32, u64)>,
    pub mp_state: u32,
    pub events: Vec<u8>,
    /// The guest TSC's frequency.
    pub tsc_khz: u32,
}

impl VcpuState {
    /// The CPUID the guest was given, checked entry by entry.
    pub fn cpuid_entries(&self) -> Result<Vec<kvm_cpuid_entry2>> {
        if self.cpuid.is_empty() || self.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(bad(
                "CPUID",
                format!(
                    "{} entries (1 to {KVM_MAX_CPUID_ENTRIES})",
                    self.cpuid.len()
                ),
            ));
        }
        self.cpuid
            .iter()
            .map(|e| parse::<kvm_cpuid_entry2>("a CPUID entry", e))
            .collect()
    }
}

/// The VM-wide in-kernel devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC (`kvm_irqchip` each).
    pub irqchips: Vec<Vec<u8>>,
    pub pit: Vec<u8>,
    /// kvmclock's base, where KVM has it (KVM_CAP_ADJUST_CLOCK; not on PVM hosts).
    pub clock: Option<Vec<u8>>,
}

/// What this host's KVM offers for saving vCPU state.
#[derive(Clone, Copy, Debug, Default)]
pub struct StateCaps {
    pub xsave: bool,
    pub xcrs: bool,
    /// KVM_CAP_XSAVE2's size; more than 4096 means dynamically enabled XSTATE features.
    pub xsave2_size: usize,
    pub tsc_control: bool,
    pub adjust_clock: bool,
}

fn blob<T: IntoBytes + Immutable + ?Sized>(v: &T) -> Vec<u8> {
    v.as_bytes().to_vec()
}

fn parse<T: FromBytes>(what: &'static str, b: &[u8]) -> Result<T> {
    T::read_from_bytes(b).map_err(|_| HypervisorError::BadState {
        what,
        why: format!(
            "{} bytes where KVM's structure has {}",
            b.len(),
            std::mem::size_of::<T>()
        ),
    })
}

fn bad(what: &'static str, why: impl Into<String>) -> HypervisorError {
    HypervisorError::BadState {
        what,
        why: why.into(),
    }
}

/// MSRs grouped for setting: the TSC alone first, the TSC deadline alone last, the rest
/// between.
fn msr_groups(msrs: &[(u32, u64)]) -> [Vec<(u32, u64)>; 3] {
    let pick = |f: &dyn Fn(u32) -> bool| -> Vec<(u32, u64)> {
        msrs.iter().copied().filter(|(i, _)| f(*i)).collect()
    };
    [
        pick(&|i| i == MSR_IA32_TSC),
        pick(&|i| i != MSR_IA32_TSC && i != MSR_IA32_TSC_DEADLINE),
        pick(&|i| i == MSR_IA32_TSC_DEADLINE),
    ]
}

impl Vcpu {
    /// Completes an exit KVM has not finished (the data of an `in` or MMIO read goes into
    /// the registers, the instruction retires) without entering the guest, so the state read
    /// next is the state between two instructions. Call after handling an exit, before
    /// saving state.
    pub fn finish_pending_exit(&mut self) -> Result<()> {
        self.kick_target().arm();
        let r = self.fd.run().map(drop).map_err(|e| e.errno());
        self.kick_target().clear();
        self.pending_done();
        match r {
            Err(libc::EINTR | libc::EAGAIN) => Ok(()),
            Err(errno) => Err(ioctl("KVM_RUN (completing the last exit)")(
                kvm_ioctls::Error::new(errno),
            )),
            // It exited for another reason before entering: nothing was left pending.
            Ok(()) => Ok(()),
        }
    }

    /// Reads the vCPU's whole state. `msrs` lists the MSRs to save (see
    /// [`crate::Kvm::msr_index_list`]); those this vCPU cannot read are left out.
    pub fn save_state(&self, msrs: &[u32]) -> Result<VcpuState> {
        let fd = &self.fd;
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_CPUID2"))?;
        let caps = self.caps();
        let fpu = if caps.xsave {
            let area = fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?;
            let xcrs = if caps.xcrs {
                Some(blob(&fd.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?))
            } else {
                None
            };
            FpuState::Xsave {
                area: blob(&area),
                xcrs,
            }
        } else {
            FpuState::Legacy(Box::new(FpuRegs::from(
                &fd.get_fpu().map_err(ioctl("KVM_GET_FPU"))?,
            )))
        };
        Ok(VcpuState {
            cpuid: cpuid.as_slice().iter().map(blob).collect(),
            regs: blob(&fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?),
            sregs: blob(&fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?),
            fpu,
            debugregs: blob(&fd.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?),
            lapic: blob(&fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?),
            msrs: self.readable_msrs(msrs)?,
            mp_state: fd
                .get_mp_state()
                .map_err(ioctl("KVM_GET_MP_STATE"))?
                .mp_state,
            events: blob(&fd.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?),
            tsc_khz: self.tsc_khz()?,
        })
    }

    /// Reads every MSR of `indices` this vCPU can read: KVM stops a batch at the first MSR
    /// it cannot read, which is then left out and the rest read on.
    fn readable_msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>> {
        let mut out = Vec::with_capacity(indices.len());
        let mut rest = indices;
        while !rest.is_empty() {
            let batch = &rest[..rest.len().min(64)];
            match self.msrs(batch) {
                Ok(values) => {
                    out.extend(values);
                    rest = &rest[batch.len()..];
                }
                Err(HypervisorError::MsrRejected {
                    accepted,
                    first_rejected,
                    ..
                }) => {
                    out.extend(self.msrs(&batch[..accepted])?);
                    log::debug!(
                        "vCPU {}: MSR {first_rejected:#x} cannot be read; not saved",
                        self.id()
                    );
                    rest = &rest[accepted + 1..];
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Sets a saved state into this freshly created vCPU (see the module's note on order).
    /// Returns the MSRs KVM refused whose saved value differs from what the fresh vCPU
    /// holds (not an error here: the caller says what that means for the guest).
    pub fn restore_state(&self, s: &VcpuState) -> Result<Vec<(u32, u64)>> {
        let caps = self.caps();
        if s.msrs.len() > MAX_MSRS {
            return Err(bad("MSRs", format!("{} of them", s.msrs.len())));
        }
        let entries = s.cpuid_entries()?;
        let cpuid = CpuId::from_entries(&entries).map_err(|_| bad("CPUID", "too many entries"))?;
        if s.tsc_khz == 0 {
            return Err(bad("the TSC frequency", "0 kHz"));
        }
        let here = self.tsc_khz()?;
        if here != s.tsc_khz {
            if !caps.tsc_control {
                return Err(HypervisorError::TscFrequency {
                    saved: s.tsc_khz,
                    here,
                });
            }
            self.fd
                .set_tsc_khz(s.tsc_khz)
                .map_err(ioctl("KVM_SET_TSC_KHZ"))?;
        }
        let fd = &self.fd;
        fd.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        fd.set_regs(&parse::<kvm_regs>("the registers", &s.regs)?)
            .map_err(ioctl("KVM_SET_REGS"))?;
        fd.set_sregs(&parse::<kvm_sregs>("the special registers", &s.sregs)?)
            .map_err(ioctl("KVM_SET_SREGS"))?;
        match &s.fpu {
            FpuState::Xsave { area, xcrs } => {
                if !caps.xsave {
                    return Err(bad(
                        "the FPU",
                        "saved as XSAVE state, but this host's KVM has no KVM_SET_XSAVE",
                    ));
                }
                if caps.xsave2_size > std::mem::size_of::<kvm_xsave>() {
                    return Err(bad(
                        "the FPU",
                        "this host's KVM wants an XSAVE area larger than 4 KiB",
                    ));
                }
                let area = parse::<kvm_xsave>("the XSAVE area", area)?;
                // SAFETY: KVM reads the guest FPU's user ABI size from the pointer, which is
                // at most 4096 bytes (the size of `kvm_xsave`) unless the process enabled
                // dynamic XSTATE features for guests (arch_prctl), which this monitor never
                // does; KVM_CAP_XSAVE2 confirmed it above.
                unsafe { fd.set_xsave(&area) }.map_err(ioctl("KVM_SET_XSAVE"))?;
                if let Some(x) = xcrs {
                    if caps.xcrs {
                        fd.set_xcrs(&parse::<kvm_xcrs>("the XCRs", x)?)
                            .map_err(ioctl("KVM_SET_XCRS"))?;
                    }
                }
            }
            FpuState::Legacy(f) => fd
                .set_fpu(&kvm_fpu::from(&**f))
                .map_err(ioctl("KVM_SET_FPU"))?,
        }
        fd.set_debug_regs(&parse::<kvm_debugregs>(
            "the debug registers",
            &s.debugregs,
        )?)
        .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&parse::<kvm_lapic_state>("the local APIC", &s.lapic)?)
            .map_err(ioctl("KVM_SET_LAPIC"))?;
        // What a fresh vCPU holds: a refused MSR already at its saved value loses nothing.
        let indices: Vec<u32> = s.msrs.iter().map(|m| m.0).collect();
        let fresh = self.readable_msrs(&indices)?;
        let mut refused = Vec::new();
        for group in msr_groups(&s.msrs) {
            let mut rest: &[(u32, u64)] = &group;
            while !rest.is_empty() {
                let batch = &rest[..rest.len().min(64)];
                match self.set_msrs(batch) {
                    Ok(()) => rest = &rest[batch.len()..],
                    Err(HypervisorError::MsrRejected { accepted, .. }) => {
                        if !fresh.contains(&batch[accepted]) {
                            refused.push(batch[accepted]);
                        }
                        rest = &rest[accepted + 1..];
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let fd = &self.fd;
        fd.set_mp_state(kvm_mp_state {
            mp_state: s.mp_state,
        })
        .map_err(ioctl("KVM_SET_MP_STATE"))?;
        let mut events = parse::<kvm_vcpu_events>("the pending events", &s.events)?;
        // KVM_GET_VCPU_EVENTS fills these in without flagging them; setting them needs the
        // flags.
        events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
        fd.set_vcpu_events(&events)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
        Ok(refused)
    }
}

impl Vm {
    /// Reads the in-kernel PICs, IOAPIC and PIT, and kvmclock's base where KVM has one.
    pub fn save_state(&self) -> Result<VmState> {
        let fd = self.fd();
        let mut irqchips = Vec::new();
        for (chip_id, _) in CHIPS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            fd.get_irqchip(&mut chip)
                .map_err(ioctl("KVM_GET_IRQCHIP"))?;
            irqchips.push(blob(&chip));
        }
        let clock = if self.caps().adjust_clock {
            let mut c: kvm_clock_data = fd.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?;
            // KVM_SET_CLOCK takes no flag but KVM_CLOCK_REALTIME, and only the clock is kept.
            c.flags = 0;
            Some(blob(&c))
        } else {
            None
        };
        Ok(VmState {
            irqchips,
            pit: blob(&fd.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?),
            clock,
        })
    }

    /// Sets a saved state into this VM's freshly created irqchip and PIT.
    pub fn restore_state(&self, s: &VmState) -> Result<()> {
        let fd = self.fd();
        if s.irqchips.len() != CHIPS.len() {
            return Err(bad(
                "the interrupt controllers",
                format!(
                    "{} saved, the machine has {}",
                    s.irqchips.len(),
                    CHIPS.len()
                ),
            ));
        }
        for ((chip_id, name), data) in CHIPS.iter().zip(&s.irqchips) {
            let chip = parse::<kvm_irqchip>("an interrupt controller", data)?;
            if chip.chip_id != *chip_id {
                return Err(bad(
                    "the interrupt controllers",
                    format!("the {name}'s place holds chip {}", chip.chip_id),
                ));
            }
            fd.set_irqchip(&chip).map_err(ioctl("KVM_SET_IRQCHIP"))?;
        }
        fd.set_pit2(&parse::<kvm_pit_state2>("the PIT", &s.pit)?)
            .map_err(ioctl("KVM_SET_PIT2"))?;
        match &s.clock {
            Some(c) if self.caps().adjust_clock => {
                let mut c = parse::<kvm_clock_data>("kvmclock", c)?;
                c.flags = 0;
                fd.set_clock(&c).map_err(ioctl("KVM_SET_CLOCK"))?;
            }
            // Saved where the host had it; without it here a guest using kvmclock sees
            // kvmclock restart from this host's count.
            Some(_) => log::warn!(
                "the snapshot holds kvmclock's base, but this host's KVM cannot set it: a \
                 guest using kvmclock sees its clock jump"
            ),
            None => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msrs_are_set_tsc_first_and_deadline_last() {
        let msrs = [(0x6e0, 5), (0x174, 1), (0x10, 7), (0xc000_0080, 2)];
        let [first, mid, last] = msr_groups(&msrs);
        assert_eq!(first, vec![(0x10, 7)]);
        assert_eq!(mid, vec![(0x174, 1), (0xc000_0080, 2)]);
        assert_eq!(last, vec![(0x6e0, 5)]);
    }

    #[test]
    fn blobs_of_the_wrong_size_are_refused() {
        let regs = kvm_regs {
            rip: 0x1234,
            ..Default::default()
        };
        let b = blob(&regs);
        assert_eq!(parse::<kvm_regs>("r", &b).unwrap().rip, 0x1234);
        let e = parse::<kvm_regs>("the registers", &b[1..]).unwrap_err();
        assert!(e.to_string().contains("the registers"), "{e}");
        assert!(parse::<kvm_regs>("r", &[b.clone(), vec![0]].concat()).is_err());
    }
}
