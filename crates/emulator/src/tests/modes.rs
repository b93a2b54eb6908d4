//! Prefixes and processor modes: segment overrides, address-size override, RIP-relative
//! operands, canonical checks, 32-bit protected mode (flat, PAE, legacy paging), real mode,
//! and KVM's instruction-bytes hint.

use super::*;
use crate::Gpr::*;
use crate::testutil::{A, PageTables, TestCpu, TestMem};
use crate::{Seg, vector};

#[test]
fn fs_and_gs_overrides_add_the_segment_base() {
    let mut e = Env::long4();
    e.cpu.seg_mut(Seg::Gs).base = DATA_LIN;
    e.mem.put(DATA_GPA + 0x20, &[1, 2, 3, 4]);
    e.set(Rdi, 0x20);
    // movbe eax, gs:[rdi]
    assert_eq!(e.run(&[0x65, 0x0f, 0x38, 0xf0, 0x07]), Ok(Completion::Done));
    assert_eq!(e.reg(Rax), 0x0102_0304);

    let mut e = Env::long4();
    e.cpu.seg_mut(Seg::Fs).base = DATA_LIN + 0x100;
    // DS base is ignored in 64-bit mode.
    e.cpu.seg_mut(Seg::Ds).base = 0x1234_0000;
    e.set(Rdi, 0x8);
    e.set(Rax, 0x0a0b_0c0d);
    // movbe fs:[rdi], eax
    assert_eq!(e.run(&[0x64, 0x0f, 0x38, 0xf1, 0x07]), Ok(Completion::Done));
    assert_eq!(
        &e.mem.bytes[DATA_GPA as usize + 0x108..][..4],
        &[0x0a, 0x0b, 0x0c, 0x0d]
    );
}

#[test]
fn address_size_override_uses_32_bit_registers() {
    let mut e = Env::long4();
    e.cpu.seg_mut(Seg::Gs).base = DATA_LIN;
    e.mem.put(DATA_GPA + 0x40, &[5, 6, 7, 8]);
    e.set(Rdi, 0xffff_ffff_0000_0040);
    // movbe eax, gs:[edi]
    assert_eq!(
        e.run(&[0x65, 0x67, 0x0f, 0x38, 0xf0, 0x07]),
        Ok(Completion::Done)
    );
    assert_eq!(e.reg(Rax), 0x0506_0708);
    assert_eq!(e.cpu.rip, CODE_LIN + 6);
}

#[test]
fn rip_relative_operand() {
    let mut e = Env::long4();
    // movbe eax, [rip+0x100]: 8 bytes long, so the operand is at CODE_LIN + 0x108.
    e.mem.put(CODE_GPA + 0x108, &[0xca, 0xfe, 0xba, 0xbe]);
    assert_eq!(
        e.run(&[0x0f, 0x38, 0xf0, 0x05, 0x00, 0x01, 0x00, 0x00]),
        Ok(Completion::Done)
    );
    assert_eq!(e.reg(Rax), 0xcafe_babe);
}

#[test]
fn non_canonical_operands_raise_gp_or_ss() {
    let mut e = Env::long4();
    e.set(Rdi, 0x0000_8000_0000_0000);
    assert_eq!(
        e.run(&[0x0f, 0x38, 0xf0, 0x07]),
        Ok(exc(vector::GP, Some(0)))
    );
    // Operand straddling the canonical boundary.
    e.set(Rdi, 0x0000_7fff_ffff_fffe);
    assert_eq!(
        e.run(&[0x0f, 0x38, 0xf0, 0x07]),
        Ok(exc(vector::GP, Some(0)))
    );
    // RSP-based: stack segment, #SS(0).
    e.set(Rsp, 0x0000_8000_0000_0000);
    assert_eq!(
        e.run(&[0x0f, 0x38, 0xf0, 0x04, 0x24]),
        Ok(exc(vector::SS, Some(0)))
    );
    assert_eq!(e.cpu.rip, CODE_LIN);
}

#[test]
fn hint_bytes_are_used_when_complete() {
    let mut e = Env::long4();
    // RIP on an unmapped page: only the hint can provide the bytes.
    e.cpu.rip = CODE_LIN + 0x4000;
    let r = e
        .completer
        .complete(&mut e.cpu, &mut e.mem, Some(&[0xcc, 0x90]));
    assert_eq!(r, Ok(exc(vector::BP, None)));
    assert_eq!(e.cpu.rip, CODE_LIN + 0x4001);

    // A truncated hint falls back to fetching from guest memory.
    let mut e = Env::long4();
    e.mem.put(CODE_GPA, &[0xf3, 0x0f, 0xb8, 0xc1]);
    e.set(Rcx, 0b1011);
    let r = e
        .completer
        .complete(&mut e.cpu, &mut e.mem, Some(&[0xf3, 0x0f]));
    assert_eq!(r, Ok(Completion::Done));
    assert_eq!(e.reg(Rax), 3);
}

/// 32-bit protected mode with paging of `kind` (PAE or legacy): code at 0xc000_0000, data at
/// 0xc010_0000.
fn prot32_paged(kind: PtKind) -> (TestCpu, TestMem, PageTables) {
    let mut mem = TestMem::new(MEM_SIZE);
    let mut pt = PageTables::new(&mut mem, kind, PT_AT);
    pt.map(&mut mem, 0xc000_0000, CODE_GPA, P);
    pt.map(&mut mem, 0xc010_0000, DATA_GPA, P | RW);
    pt.map(&mut mem, 0xc010_1000, RO_GPA, P);
    let cr4 = if kind == PtKind::Pae {
        bits::CR4_PAE
    } else {
        0
    };
    let mut cpu = TestCpu::prot32(Some((pt.root, cr4)));
    cpu.rip = 0xc000_0000;
    (cpu, mem, pt)
}

#[test]
fn protected_mode_with_pae_and_legacy_paging() {
    for kind in [PtKind::Pae, PtKind::Legacy32] {
        let (mut cpu, mut mem, pt) = prot32_paged(kind);
        // popcnt eax, [edi]
        mem.put(CODE_GPA, &[0xf3, 0x0f, 0xb8, 0x07]);
        mem.put(DATA_GPA + 0x10, &[0xff, 0x0f, 0, 0]);
        cpu.gprs[Rdi as usize] = 0xc010_0010;
        assert_eq!(
            crate::complete(&mut cpu, &mut mem, None),
            Ok(Completion::Done),
            "{kind:?}"
        );
        assert_eq!(cpu.gprs[Rax as usize], 12, "{kind:?}");
        assert_eq!(cpu.rip, 0xc000_0004, "{kind:?}");
        assert_ne!(
            pt.leaf_value(&mem, 0xc010_0000) & A,
            0,
            "{kind:?} accessed bit"
        );

        // cmpxchg8b [edi] on the read-only page: #PF P|W, CR2 = the address.
        cpu.rip = 0xc000_0000;
        mem.put(CODE_GPA, &[0xf0, 0x0f, 0xc7, 0x0f]);
        cpu.gprs[Rdi as usize] = 0xc010_1008;
        assert_eq!(
            crate::complete(&mut cpu, &mut mem, None),
            Ok(pf(0xc010_1008, 0b11)),
            "{kind:?}"
        );

        // Unmapped code page.
        cpu.rip = 0xc020_0000;
        assert_eq!(
            crate::complete(&mut cpu, &mut mem, None),
            Ok(pf(0xc020_0000, 0)),
            "{kind:?}"
        );
    }
}

#[test]
fn flat_protected_mode_checks_segment_limits_and_types() {
    let mut mem = TestMem::new(MEM_SIZE);
    let mut cpu = TestCpu::prot32(None);
    cpu.rip = CODE_GPA;
    // movbe eax, [edi]
    mem.put(CODE_GPA, &[0x0f, 0x38, 0xf0, 0x07]);
    mem.put(DATA_GPA + 0x10, &[1, 2, 3, 4]);
    cpu.seg_mut(Seg::Ds).base = DATA_GPA;
    cpu.gprs[Rdi as usize] = 0x10;
    assert_eq!(
        crate::complete(&mut cpu, &mut mem, None),
        Ok(Completion::Done)
    );
    assert_eq!(cpu.gprs[Rax as usize], 0x0102_0304);

    cpu.rip = CODE_GPA;
    cpu.seg_mut(Seg::Ds).limit = 0x12;
    assert_eq!(
        crate::complete(&mut cpu, &mut mem, None),
        Ok(exc(vector::GP, Some(0)))
    );

    // A store through a read-only data segment.
    cpu.seg_mut(Seg::Ds).limit = 0xffff_ffff;
    cpu.seg_mut(Seg::Ds).type_ = 1;
    mem.put(CODE_GPA, &[0x0f, 0x38, 0xf1, 0x07]);
    assert_eq!(
        crate::complete(&mut cpu, &mut mem, None),
        Ok(exc(vector::GP, Some(0)))
    );
    assert_eq!(cpu.rip, CODE_GPA);
}

#[test]
fn real_mode_uses_16_bit_addressing_and_segment_bases() {
    let mut mem = TestMem::new(MEM_SIZE);
    let mut cpu = TestCpu::real();
    cpu.seg_mut(Seg::Cs).base = 0x10000;
    cpu.seg_mut(Seg::Cs).selector = 0x1000;
    cpu.seg_mut(Seg::Ds).base = 0x20000;
    cpu.seg_mut(Seg::Ds).selector = 0x2000;
    cpu.rip = 0xfffc;
    // popcnt ax, [bx] (no REX, 16-bit operand and address size by default).
    mem.put(0x1fffc, &[0xf3, 0x0f, 0xb8, 0x07]);
    mem.put(0x20010, &[0xff, 0x03]);
    cpu.gprs[Rbx as usize] = 0xffff_0010; // only BX counts
    cpu.gprs[Rax as usize] = 0xdead_0000;
    assert_eq!(
        crate::complete(&mut cpu, &mut mem, None),
        Ok(Completion::Done)
    );
    assert_eq!(cpu.gprs[Rax as usize], 0xdead_000a);
    // IP wraps at 64 KiB.
    assert_eq!(cpu.rip, 0);
}
