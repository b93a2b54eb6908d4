//! Saving and restoring vCPU and VM state on real KVM: a vCPU stopped right after an `in`
//! exit is completed before it is saved, its state moves into a vCPU of another VM, and
//! that one continues the guest. Prints what this host's KVM could not read or set back
//! (the PVM findings in shared/PVM.md come from here).
//!
//! The guest is 16-bit real-mode code at 0x1000:
//!   in $0x11,%al; mov %al,%bl; out %al,$0x12; inc %bl; mov %bl,%al; out %al,$0x13; hlt

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vme_hypervisor::{Kvm, MSR_IA32_TSC, Vcpu, VcpuExit, Vm};

const CODE: &[u8] = &[
    0xe4, 0x11, 0x88, 0xc3, 0xe6, 0x12, 0xfe, 0xc3, 0x88, 0xd8, 0xe6, 0x13, 0xf4,
];

fn skip() -> bool {
    std::env::var_os("VME_SKIP_KVM_TESTS").is_some_and(|v| v == "1")
}

fn machine(kvm: &Kvm) -> (Vm, Vcpu) {
    let mut vm = kvm.create_vm().expect("create VM");
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("memory");
    mem.write_slice(CODE, GuestAddress(0x1000)).expect("code");
    vm.set_memory(&mem).expect("register memory");
    vm.create_platform_devices().expect("irqchip and PIT");
    let vcpu = vm.create_vcpu(0).expect("vcpu");
    vcpu.set_cpuid2(&kvm.supported_cpuid().expect("cpuid"))
        .expect("set cpuid");
    (vm, vcpu)
}

fn next(vcpu: &mut Vcpu) -> VcpuExit {
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::Interrupted => continue,
            e => return e,
        }
    }
}

#[test]
fn a_vcpu_saved_after_an_in_exit_continues_in_another_vm() {
    if skip() {
        return;
    }
    let kvm = Kvm::open().expect("KVM (set VME_SKIP_KVM_TESTS=1 to skip KVM tests)");
    eprintln!("KVM state capabilities: {:?}", kvm.state_caps());
    let (vm, mut vcpu) = machine(&kvm);
    let mut sregs = vcpu.sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.regs().unwrap();
    (regs.rip, regs.rflags, regs.rsp) = (0x1000, 2, 0x8000);
    vcpu.set_regs(&regs).unwrap();
    assert!(matches!(next(&mut vcpu), VcpuExit::IoIn { port: 0x11, .. }));
    vcpu.complete_io_in(&[0x41]).unwrap();
    // Not yet in the registers: KVM finishes the `in` on the next entry.
    vcpu.finish_pending_exit().expect("complete the in");
    let regs = vcpu.regs().unwrap();
    assert_eq!(
        (regs.rax & 0xff, regs.rip),
        (0x41, 0x1002),
        "the in retired"
    );

    let msrs = kvm.msr_index_list().expect("MSR index list");
    let state = vcpu.save_state(&msrs).expect("save vCPU state");
    let unread: Vec<String> = msrs
        .iter()
        .filter(|i| !state.msrs.iter().any(|(j, _)| j == *i))
        .map(|i| format!("{i:#x}"))
        .collect();
    eprintln!(
        "{} MSRs listed ({:x?}), {} read; unreadable: {unread:?}; FPU as {}",
        msrs.len(),
        msrs,
        state.msrs.len(),
        match state.fpu {
            vme_hypervisor::FpuState::Xsave { .. } => "XSAVE",
            vme_hypervisor::FpuState::Legacy(_) => "legacy FPU",
        }
    );
    let vm_state = vm.save_state().expect("save VM state");
    eprintln!("kvmclock saved: {}", vm_state.clock.is_some());

    let (vm2, mut vcpu2) = machine(&kvm);
    vm2.restore_state(&vm_state).expect("restore VM state");
    let refused = vcpu2.restore_state(&state).expect("restore vCPU state");
    eprintln!(
        "MSRs refused on restore: {:?}",
        refused
            .iter()
            .map(|(i, v)| format!("{i:#x}={v:#x}"))
            .collect::<Vec<_>>()
    );
    let again = vcpu2.save_state(&msrs).expect("save the restored vCPU");
    assert_eq!(again.regs, state.regs);
    assert_eq!(again.sregs, state.sregs);
    assert_eq!(again.fpu, state.fpu);
    assert_eq!(again.lapic, state.lapic);
    assert_eq!(again.mp_state, state.mp_state);
    let differing: Vec<String> = state
        .msrs
        .iter()
        .filter(|(i, v)| *i != MSR_IA32_TSC && !again.msrs.contains(&(*i, *v)))
        .map(|(i, v)| format!("{i:#x}={v:#x}"))
        .collect();
    eprintln!("MSRs that read back differently: {differing:?}");
    assert_eq!(vm2.save_state().unwrap().irqchips, vm_state.irqchips);
    // The restored vCPU continues where the first stopped.
    assert_eq!(
        next(&mut vcpu2),
        VcpuExit::IoOut {
            port: 0x12,
            size: 1,
            data: vec![0x41]
        }
    );
    assert_eq!(
        next(&mut vcpu2),
        VcpuExit::IoOut {
            port: 0x13,
            size: 1,
            data: vec![0x42]
        }
    );
}
