//! CPU templates: the CPUID a guest sees. Every template starts from what KVM supports, adds
//! the per-vCPU topology and the hypervisor bit, then hides features.
//!
//! `Pvm` hides what PVM's instruction emulator cannot complete (PVM.md): after a trap PVM
//! emulates up to 1024 further guest instructions, so any instruction the kernel may use has
//! to be one its emulator knows. Measured failures: `cmpxchg16b` (CX16), the XSAVE family,
//! `popcnt`. The guest-side `clearcpuid` list that got Debian's kernel furthest also cleared
//! RDTSCP, RDRAND, RDSEED, FSGSBASE, INVPCID, SMAP, PCID and PKU; we hide those too, and AVX*
//! (which needs XSAVE anyway).

use crate::ArchError;
use kvm_bindings::{CpuId, kvm_cpuid_entry2};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuTemplate {
    /// Everything KVM supports.
    Host,
    /// A conservative x86-64-v2-like set that any recent host provides.
    Baseline,
    /// Host minus what PVM's emulator cannot complete.
    Pvm,
}

impl CpuTemplate {
    /// Parses `host`, `baseline` or `pvm`.
    pub fn parse(name: &str) -> Result<Self, ArchError> {
        match name {
            "host" => Ok(CpuTemplate::Host),
            "baseline" => Ok(CpuTemplate::Baseline),
            "pvm" => Ok(CpuTemplate::Pvm),
            _ => Err(ArchError::CpuTemplate(format!(
                "unknown CPU template {name:?}: use auto, host, baseline or pvm"
            ))),
        }
    }

    /// The name [`Self::parse`] takes.
    pub fn name(self) -> &'static str {
        match self {
            CpuTemplate::Host => "host",
            CpuTemplate::Baseline => "baseline",
            CpuTemplate::Pvm => "pvm",
        }
    }

    /// Like [`Self::parse`], and `auto` picks `pvm` on PVM hosts, `host` elsewhere.
    pub fn resolve(name: &str, is_pvm_host: bool) -> Result<Self, ArchError> {
        match name {
            "auto" if is_pvm_host => Ok(CpuTemplate::Pvm),
            "auto" => Ok(CpuTemplate::Host),
            other => Self::parse(other),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// (leaf, subleaf, register, bit) of a feature flag.
type Feature = (u32, u32, Reg, u32);

const CX16: Feature = (1, 0, Reg::Ecx, 13);
const PCID: Feature = (1, 0, Reg::Ecx, 17);
const POPCNT: Feature = (1, 0, Reg::Ecx, 23);
const XSAVE: Feature = (1, 0, Reg::Ecx, 26);
const OSXSAVE: Feature = (1, 0, Reg::Ecx, 27);
const AVX: Feature = (1, 0, Reg::Ecx, 28);
const F16C: Feature = (1, 0, Reg::Ecx, 29);
const RDRAND: Feature = (1, 0, Reg::Ecx, 30);
const FMA: Feature = (1, 0, Reg::Ecx, 12);
const HYPERVISOR: Feature = (1, 0, Reg::Ecx, 31);
const HTT: Feature = (1, 0, Reg::Edx, 28);
const FSGSBASE: Feature = (7, 0, Reg::Ebx, 0);
const AVX2: Feature = (7, 0, Reg::Ebx, 5);
const INVPCID: Feature = (7, 0, Reg::Ebx, 10);
const RDSEED: Feature = (7, 0, Reg::Ebx, 18);
const SMAP: Feature = (7, 0, Reg::Ebx, 20);
const PKU: Feature = (7, 0, Reg::Ecx, 3);
const RDTSCP: Feature = (0x8000_0001, 0, Reg::Edx, 27);

const PVM_HIDDEN: &[Feature] = &[
    CX16, PCID, POPCNT, XSAVE, OSXSAVE, AVX, F16C, FMA, RDRAND, FSGSBASE, AVX2, INVPCID, RDSEED,
    SMAP, PKU, RDTSCP,
];

/// Baseline keeps only these bits of leaf 1 ECX/EDX and 0x8000_0001 ECX/EDX, and no leaf-7
/// features: SSE3, SSSE3, CX16, SSE4.1/4.2, POPCNT, x2APIC, TSC-deadline, hypervisor; the
/// classic EDX set; LAHF; syscall, NX, 1 GiB pages, RDTSCP, long mode.
const BASELINE_1_ECX: u32 = (1 << 0)
    | (1 << 9)
    | (1 << 13)
    | (1 << 19)
    | (1 << 20)
    | (1 << 21)
    | (1 << 23)
    | (1 << 24)
    | (1 << 31);
const BASELINE_1_EDX: u32 = 0x078b_fbff;
const BASELINE_EXT_ECX: u32 = 1 << 0;
const BASELINE_EXT_EDX: u32 = (1 << 11) | (1 << 20) | (1 << 26) | (1 << 27) | (1 << 29);

fn reg_mut(e: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

fn set_feature(entries: &mut [kvm_cpuid_entry2], f: Feature, on: bool) {
    let (leaf, sub, reg, bit) = f;
    for e in entries
        .iter_mut()
        .filter(|e| e.function == leaf && e.index == sub)
    {
        let r = reg_mut(e, reg);
        if on {
            *r |= 1 << bit;
        } else {
            *r &= !(1 << bit);
        }
    }
}

fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries
        .iter()
        .find(|e| e.function == 0)
        .is_some_and(|e| (e.ebx, e.edx, e.ecx) == (0x6874_7541, 0x6974_6e65, 0x444d_4163))
}

/// The CPU vendor string of leaf 0 ("GenuineIntel", "AuthenticAMD").
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> String {
    let Some(e) = entries.iter().find(|e| e.function == 0) else {
        return "unknown".into();
    };
    let bytes: Vec<u8> = [e.ebx, e.edx, e.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    String::from_utf8_lossy(&bytes)
        .trim_end_matches('\0')
        .to_string()
}

/// The feature-flag registers compared when a guest's CPUID moves to another host.
const FEATURE_REGS: &[(u32, u32, Reg)] = &[
    (1, 0, Reg::Ecx),
    (1, 0, Reg::Edx),
    (7, 0, Reg::Ebx),
    (7, 0, Reg::Ecx),
    (7, 0, Reg::Edx),
    (7, 1, Reg::Eax),
    (0xd, 1, Reg::Eax),
    (0x8000_0001, 0, Reg::Ecx),
    (0x8000_0001, 0, Reg::Edx),
];

/// Bits KVM flips at run time to follow the guest's own settings (CR4.OSXSAVE, CR4.PKE),
/// not features of the host.
const RUNTIME_BITS: &[(u32, u32, Reg, u32)] =
    &[(1, 0, Reg::Ecx, 1 << 27), (7, 0, Reg::Ecx, 1 << 4)];

/// The features a guest was shown (`saved`, its CPUID) that this host's template (`here`,
/// the CPUID the same template gives the same vCPU now) lacks, as "leaf 0x7.0 EBX bits
/// 0x…": a guest that found them would fault when it used them.
pub fn missing_features(saved: &[kvm_cpuid_entry2], here: &[kvm_cpuid_entry2]) -> Vec<String> {
    let find = |entries: &[kvm_cpuid_entry2], leaf, sub| {
        entries
            .iter()
            .find(|e| e.function == leaf && e.index == sub)
            .copied()
    };
    let get = |mut e: kvm_cpuid_entry2, reg| *reg_mut(&mut e, reg);
    let mut missing = Vec::new();
    for &(leaf, sub, reg) in FEATURE_REGS {
        let Some(s) = find(saved, leaf, sub) else {
            continue;
        };
        let h = find(here, leaf, sub).map_or(0, |e| get(e, reg));
        let runtime = RUNTIME_BITS
            .iter()
            .filter(|r| (r.0, r.1, r.2) == (leaf, sub, reg))
            .fold(0, |m, r| m | r.3);
        let lost = get(s, reg) & !h & !runtime;
        if lost != 0 {
            let name = format!("{reg:?}").to_uppercase();
            missing.push(format!("leaf {leaf:#x}.{sub} {name} bits {lost:#x}"));
        }
    }
    missing
}

/// Bits needed to number `n` things.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Builds the CPUID of vCPU `id` (its APIC ID) of a `count`-vCPU guest: one socket of
/// `count` single-thread cores.
pub fn build_cpuid(
    supported: &CpuId,
    template: CpuTemplate,
    id: u32,
    count: u32,
) -> Result<CpuId, ArchError> {
    if count == 0 || id >= count || count > 255 {
        return Err(ArchError::CpuTemplate(format!(
            "vCPU {id} of {count}: a guest needs 1 to 255 vCPUs (x2APIC-only IDs are not supported)"
        )));
    }
    let mut entries: Vec<kvm_cpuid_entry2> = supported.as_slice().to_vec();
    let amd = is_amd(&entries);
    let shift = bits_for(count);
    // Leaf 0xB (and 0x1F if KVM reports it) gets its two levels rebuilt from scratch.
    let topo_leaves: Vec<u32> = [0xb, 0x1f]
        .into_iter()
        .filter(|l| entries.iter().any(|e| e.function == *l))
        .collect();
    entries.retain(|e| !topo_leaves.contains(&e.function));
    for leaf in topo_leaves {
        for (index, (eax, ebx, level)) in [(0, 1, 1u32), (shift, count, 2)].into_iter().enumerate()
        {
            entries.push(kvm_cpuid_entry2 {
                function: leaf,
                index: index as u32,
                flags: kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax,
                ebx,
                ecx: index as u32 | (level << 8),
                edx: id,
                ..Default::default()
            });
        }
        entries.push(kvm_cpuid_entry2 {
            function: leaf,
            index: 2,
            flags: kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            ecx: 2,
            edx: id,
            ..Default::default()
        });
    }
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // Initial APIC ID, logical processors per package, CLFLUSH size kept.
                e.ebx = (e.ebx & 0xffff) | (id << 24) | ((count & 0xff) << 16);
            }
            4 if !amd => {
                // Cores per package - 1 in EAX[31:26]; one thread per core shares each cache.
                e.eax = (e.eax & 0x3fff) | ((count - 1) << 26);
            }
            0x8000_0008 if amd => {
                e.ecx = (e.ecx & !0xf0ff) | (shift << 12) | (count - 1);
            }
            0x8000_001e if amd => {
                e.eax = id;
                e.ebx = id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
    set_feature(&mut entries, HYPERVISOR, true);
    set_feature(&mut entries, HTT, count > 1);
    match template {
        CpuTemplate::Host => {}
        CpuTemplate::Pvm => {
            for f in PVM_HIDDEN {
                set_feature(&mut entries, *f, false);
            }
            // No XSAVE: leaf 0xD would only describe state the guest cannot enable.
            for e in entries.iter_mut().filter(|e| e.function == 0xd) {
                (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
            }
        }
        CpuTemplate::Baseline => {
            for e in entries.iter_mut() {
                match e.function {
                    1 => {
                        e.ecx &= BASELINE_1_ECX;
                        e.edx &= BASELINE_1_EDX;
                    }
                    7 => (e.ebx, e.ecx, e.edx) = (0, 0, 0),
                    0xd => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
                    0x8000_0001 => {
                        e.ecx &= BASELINE_EXT_ECX;
                        e.edx &= BASELINE_EXT_EDX;
                    }
                    _ => {}
                }
            }
        }
    }
    CpuId::from_entries(&entries)
        .map_err(|e| ArchError::CpuTemplate(format!("CPUID table too large: {e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn host() -> CpuId {
        CpuId::from_entries(&[
            // "AuthenticAMD"
            entry(0, 0, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            entry(1, 0, 0x0002_0800, 0xfffa_3203, 0x178b_fbff),
            entry(7, 0, 0xffff_ffff, 0xffff_ffff, 0),
            entry(0xb, 0, 0, 0, 0),
            entry(0xd, 0, 0x340, 0x340, 0),
            entry(0x8000_0001, 0, 0, 0xffff_ffff, 0xffff_ffff),
            entry(0x8000_0008, 0, 0, 0, 0),
            entry(0x8000_001e, 0, 0, 0, 0),
        ])
        .unwrap()
    }

    fn get(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn parse_and_auto() {
        assert_eq!(
            CpuTemplate::resolve("auto", true).unwrap(),
            CpuTemplate::Pvm
        );
        assert_eq!(
            CpuTemplate::resolve("auto", false).unwrap(),
            CpuTemplate::Host
        );
        assert_eq!(
            CpuTemplate::parse("baseline").unwrap(),
            CpuTemplate::Baseline
        );
        let err = CpuTemplate::parse("fast").unwrap_err().to_string();
        assert!(err.contains("host, baseline or pvm"), "{err}");
    }

    #[test]
    fn topology_is_per_vcpu() {
        let c = build_cpuid(&host(), CpuTemplate::Host, 2, 4).unwrap();
        let l1 = get(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor bit");
        assert_ne!(l1.edx & (1 << 28), 0, "HTT with 4 vCPUs");
        let core = get(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 4, 2, 2));
        assert_eq!(get(&c, 0xb, 2).ecx >> 8, 0, "level 2 ends the list");
        assert_eq!(get(&c, 0x8000_001e, 0).eax, 2);
        assert_eq!(get(&c, 0x8000_0008, 0).ecx & 0xff, 3);
        assert!(build_cpuid(&host(), CpuTemplate::Host, 4, 4).is_err());
    }

    #[test]
    fn pvm_hides_what_the_emulator_cannot_do() {
        let c = build_cpuid(&host(), CpuTemplate::Pvm, 0, 1).unwrap();
        let l1 = get(&c, 1, 0);
        for bit in [13, 23, 26, 28, 30] {
            assert_eq!(l1.ecx & (1 << bit), 0, "leaf 1 ECX bit {bit}");
        }
        assert_eq!(get(&c, 7, 0).ebx & (1 << 18 | 1 << 0 | 1 << 10), 0);
        assert_eq!(get(&c, 0x8000_0001, 0).edx & (1 << 27), 0, "RDTSCP");
        assert_eq!(get(&c, 0xd, 0).ebx, 0);
        assert_eq!(l1.edx & (1 << 28), 0, "no HTT with one vCPU");
    }

    #[test]
    fn vendor_and_features_a_host_lacks() {
        let h = host();
        assert_eq!(vendor(h.as_slice()), "AuthenticAMD");
        let pvm = build_cpuid(&h, CpuTemplate::Pvm, 0, 1).unwrap();
        let full = build_cpuid(&h, CpuTemplate::Host, 0, 1).unwrap();
        assert!(missing_features(pvm.as_slice(), full.as_slice()).is_empty());
        assert!(missing_features(full.as_slice(), full.as_slice()).is_empty());
        let lost = missing_features(full.as_slice(), pvm.as_slice());
        assert!(
            lost.iter().any(|m| m.starts_with("leaf 0x1.0 ECX bits")),
            "{lost:?}"
        );
        // A guest that turned on OSXSAVE keeps it wherever it goes.
        let mut saved = pvm.as_slice().to_vec();
        saved.iter_mut().find(|e| e.function == 1).unwrap().ecx |= 1 << 27;
        assert!(missing_features(&saved, pvm.as_slice()).is_empty());
    }

    #[test]
    fn baseline_is_a_subset() {
        let c = build_cpuid(&host(), CpuTemplate::Baseline, 0, 1).unwrap();
        assert_eq!(get(&c, 1, 0).ecx & !BASELINE_1_ECX, 0);
        assert_eq!(get(&c, 7, 0).ebx, 0);
        assert_eq!(get(&c, 0x8000_0001, 0).edx & !BASELINE_EXT_EDX, 0);
    }
}
