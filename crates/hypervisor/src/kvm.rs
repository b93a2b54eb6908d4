//! The KVM system handle: opening `/dev/kvm` with errors that say what to fix, and host facts.

use crate::{HypervisorError, Result, StateCaps, Vm, ioctl};
use kvm_bindings::{CpuId, KVM_API_VERSION, KVM_MAX_CPUID_ENTRIES};
use std::path::Path;

const KVM_PATH: &str = "/dev/kvm";
/// Present when the host's KVM is PVM (virtualization without VMX/SVM, shadow paging).
const PVM_MODULE: &str = "/sys/module/kvm_pvm";

pub struct Kvm {
    kvm: kvm_ioctls::Kvm,
}

impl Kvm {
    /// Opens `/dev/kvm` and checks the API version.
    pub fn open() -> Result<Self> {
        Self::open_path(KVM_PATH)
    }

    pub fn open_path(path: &str) -> Result<Self> {
        if !Path::new(path).exists() {
            return Err(HypervisorError::NoKvm { path: path.into() });
        }
        let cpath = std::ffi::CString::new(path).map_err(|_| HypervisorError::KvmOpen {
            path: path.into(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL byte in path"),
        })?;
        let kvm = kvm_ioctls::Kvm::new_with_path(cpath).map_err(|e| {
            let source = std::io::Error::from_raw_os_error(e.errno());
            match source.kind() {
                std::io::ErrorKind::PermissionDenied => {
                    HypervisorError::KvmAccess { path: path.into() }
                }
                _ => HypervisorError::KvmOpen {
                    path: path.into(),
                    source,
                },
            }
        })?;
        let found = kvm.get_api_version();
        if found != KVM_API_VERSION as i32 {
            return Err(HypervisorError::ApiVersion { found });
        }
        Ok(Kvm { kvm })
    }

    /// True on PVM hosts, whose emulator gives up on some instructions and whose guests need
    /// the `pvm` CPU template.
    pub fn is_pvm(&self) -> bool {
        Path::new(PVM_MODULE).exists()
    }

    /// The most vCPUs one VM may have on this host.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    /// The CPUID leaves KVM can present to a guest (the starting point of every template).
    pub fn supported_cpuid(&self) -> Result<CpuId> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))
    }

    /// The MSRs KVM saves and restores for a vCPU.
    pub fn msr_index_list(&self) -> Result<Vec<u32>> {
        let list = self
            .kvm
            .get_msr_index_list()
            .map_err(ioctl("KVM_GET_MSR_INDEX_LIST"))?;
        Ok(list.as_slice().to_vec())
    }

    pub fn check_extension(&self, cap: kvm_ioctls::Cap) -> bool {
        self.kvm.check_extension(cap)
    }

    /// What this host's KVM offers for saving and restoring vCPU state.
    pub fn state_caps(&self) -> StateCaps {
        use kvm_ioctls::Cap;
        let xsave2 = self.kvm.check_extension_int(Cap::Xsave2);
        StateCaps {
            xsave: self.kvm.check_extension(Cap::Xsave),
            xcrs: self.kvm.check_extension(Cap::Xcrs),
            xsave2_size: usize::try_from(xsave2).unwrap_or(0),
            tsc_control: self.kvm.check_extension(Cap::TscControl),
            adjust_clock: self.kvm.check_extension(Cap::AdjustClock),
        }
    }

    pub fn create_vm(&self) -> Result<Vm> {
        let fd = self.kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        Ok(Vm::new(fd, self.state_caps()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_names_the_modules() {
        let err = Kvm::open_path("/nonexistent/kvm")
            .err()
            .map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(err.contains("kvm_intel") && err.contains("VT-x"), "{err}");
    }

    #[test]
    fn not_a_kvm_device_is_an_error_not_a_panic() {
        // /dev/null opens but answers no KVM ioctl: the API version check must refuse it.
        assert!(Kvm::open_path("/dev/null").is_err());
    }
}
