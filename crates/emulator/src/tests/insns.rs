//! One test (or more) per instruction family, in 64-bit mode with 4-level paging.

use super::*;
use crate::Gpr::*;
use crate::vector;

const STATUS: u64 = bits::RFLAGS_STATUS;

#[test]
fn int3_traps_with_rip_after_the_instruction() {
    let mut e = Env::long4();
    assert_eq!(e.run(&[0xcc]), Ok(exc(vector::BP, None)));
    assert_eq!(e.cpu.rip, CODE_LIN + 1);
    assert_eq!(e.completer.stats().count("int3"), 1);
    assert_eq!(e.completer.stats().exceptions(), 1);
}

#[test]
fn ud2_faults_with_rip_at_the_instruction() {
    let mut e = Env::long4();
    assert_eq!(e.run(&[0x0f, 0x0b]), Ok(exc(vector::UD, None)));
    assert_eq!(e.cpu.rip, CODE_LIN);
}

#[test]
fn fences_hints_and_nops_complete_and_advance_rip() {
    let cases: &[(&[u8], &str)] = &[
        (&[0x0f, 0xae, 0xf0], "mfence"),
        (&[0x0f, 0xae, 0xe8], "lfence"),
        (&[0x0f, 0xae, 0xf8], "sfence"),
        (&[0xf3, 0x90], "pause"),
        (&[0x90], "nop"),
        (&[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00], "nop"),
        (&[0xf3, 0x0f, 0x1e, 0xfa], "endbr64"),
        // A prefetch of a non-canonical address must not fault.
        (&[0x0f, 0x18, 0x08], "prefetch"),
        (&[0x9b], "fwait"),
    ];
    for (code, name) in cases {
        let mut e = Env::long4();
        e.set(Rax, 0x8000_0000_0000_0000);
        e.cpu.rflags |= bits::RFLAGS_RF;
        assert_eq!(e.run(code), Ok(Completion::Done), "{name}");
        assert_eq!(e.cpu.rip, CODE_LIN + code.len() as u64, "{name}");
        assert_eq!(e.cpu.rflags & bits::RFLAGS_RF, 0, "{name} clears RF");
        assert_eq!(e.completer.stats().count(name), 1, "{name}");
    }
}

#[test]
fn lock_prefix_on_a_fence_is_ud() {
    let mut e = Env::long4();
    assert_eq!(e.run(&[0xf0, 0x0f, 0xae, 0xf0]), Ok(exc(vector::UD, None)));
    assert_eq!(e.cpu.rip, CODE_LIN);
}

#[test]
fn fwait_raises_nm_when_mp_and_ts_are_set() {
    let mut e = Env::long4();
    e.cpu.cr0 |= bits::CR0_MP | bits::CR0_TS;
    assert_eq!(e.run(&[0x9b]), Ok(exc(vector::NM, None)));
    assert_eq!(e.cpu.rip, CODE_LIN);
}

#[test]
fn clflush_checks_the_address_like_a_load() {
    let mut e = Env::long4();
    e.set(Rdi, DATA_LIN + 8);
    assert_eq!(e.run(&[0x0f, 0xae, 0x3f]), Ok(Completion::Done));
    let mut e = Env::long4();
    e.set(Rdi, DATA_LIN + 0x8000); // unmapped
    assert_eq!(e.run(&[0x0f, 0xae, 0x3f]), Ok(pf(DATA_LIN + 0x8000, 0)));
}

#[test]
fn popcnt_counts_and_sets_flags() {
    let mut e = Env::long4();
    e.mem.put_u64(DATA_GPA + 0x10, 0xf0f0_0000_0000_0001);
    e.set(Rdi, DATA_LIN + 0x10);
    e.cpu.rflags |= STATUS;
    // popcnt rax, [rdi]
    assert_eq!(e.run(&[0xf3, 0x48, 0x0f, 0xb8, 0x07]), Ok(Completion::Done));
    assert_eq!(e.reg(Rax), 9);
    assert_eq!(e.flags() & STATUS, 0);
    assert_eq!(e.cpu.rip, CODE_LIN + 5);

    // popcnt eax, ecx with ecx = 0: ZF set, upper half of RAX cleared.
    let mut e = Env::long4();
    e.set(Rax, u64::MAX);
    e.set(Rcx, 0xffff_ffff_0000_0000);
    e.cpu.rflags |= STATUS;
    assert_eq!(e.run(&[0xf3, 0x0f, 0xb8, 0xc1]), Ok(Completion::Done));
    assert_eq!(e.reg(Rax), 0);
    assert_eq!(e.flags() & STATUS, bits::RFLAGS_ZF);

    // popcnt ax, cx merges into RAX.
    let mut e = Env::long4();
    e.set(Rax, 0x1111_2222_3333_4444);
    e.set(Rcx, 0xffff_0000_0000_00ff);
    assert_eq!(e.run(&[0x66, 0xf3, 0x0f, 0xb8, 0xc1]), Ok(Completion::Done));
    assert_eq!(e.reg(Rax), 0x1111_2222_3333_0008);
}

#[test]
fn lzcnt_and_tzcnt_count_within_the_operand_width() {
    // (code, source, result, CF, ZF)
    let cases: &[(&[u8], u64, u64, bool, bool)] = &[
        (&[0xf3, 0x0f, 0xbd, 0xc1], 0x0001_0000, 15, false, false),
        (&[0xf3, 0x0f, 0xbd, 0xc1], 0, 32, true, false),
        (&[0xf3, 0x0f, 0xbd, 0xc1], 0x8000_0000, 0, false, true),
        (&[0xf3, 0x48, 0x0f, 0xbd, 0xc1], 1, 63, false, false),
        (&[0x66, 0xf3, 0x0f, 0xbd, 0xc1], 0x00ff, 8, false, false),
        (&[0xf3, 0x48, 0x0f, 0xbc, 0xc1], 8, 3, false, false),
        (&[0xf3, 0x48, 0x0f, 0xbc, 0xc1], 0, 64, true, false),
        (&[0xf3, 0x48, 0x0f, 0xbc, 0xc1], 1, 0, false, true),
        (&[0x66, 0xf3, 0x0f, 0xbc, 0xc1], 0x1_0000, 16, true, false),
    ];
    for (code, src, result, cf, zf) in cases {
        let mut e = Env::long4();
        e.set(Rcx, *src);
        e.cpu.rflags |= bits::RFLAGS_CF | bits::RFLAGS_ZF;
        assert_eq!(e.run(code), Ok(Completion::Done), "{code:02x?}");
        let width_mask = if code[0] == 0x66 { 0xffff } else { u64::MAX };
        assert_eq!(e.reg(Rax) & width_mask, *result, "{code:02x?} src {src:#x}");
        assert_eq!(e.flags() & bits::RFLAGS_CF != 0, *cf, "{code:02x?} CF");
        assert_eq!(e.flags() & bits::RFLAGS_ZF != 0, *zf, "{code:02x?} ZF");
    }
}

#[test]
fn movbe_loads_and_stores_byte_swapped() {
    let mut e = Env::long4();
    e.mem.put(DATA_GPA + 0x20, &[0x11, 0x22, 0x33, 0x44]);
    e.set(Rdi, DATA_LIN + 0x20);
    e.set(Rax, u64::MAX);
    // movbe eax, [rdi]
    assert_eq!(e.run(&[0x0f, 0x38, 0xf0, 0x07]), Ok(Completion::Done));
    assert_eq!(e.reg(Rax), 0x1122_3344);

    let mut e = Env::long4();
    e.set(Rdi, DATA_LIN + 0x30);
    e.set(Rax, 0x0102_0304_0506_0708);
    // movbe [rdi], rax
    assert_eq!(e.run(&[0x48, 0x0f, 0x38, 0xf1, 0x07]), Ok(Completion::Done));
    assert_eq!(e.mem.u64_at(DATA_GPA + 0x30), 0x0807_0605_0403_0201);
    assert_eq!(e.cpu.rip, CODE_LIN + 5);
}

#[test]
fn crc32_matches_the_host_instruction() {
    let mut e = Env::long4();
    e.set(Rax, 0x1234_5678);
    e.set(Rcx, 0xdead_beef_cafe_f00d);
    // crc32 rax, rcx
    assert_eq!(
        e.run(&[0xf2, 0x48, 0x0f, 0x38, 0xf1, 0xc1]),
        Ok(Completion::Done)
    );
    // Reference computed bytewise: crc32c update of 0x12345678 with the 8 source bytes.
    let mut crc = 0x1234_5678u32;
    for b in 0xdead_beef_cafe_f00du64.to_le_bytes() {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    assert_eq!(e.reg(Rax), u64::from(crc));
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: SSE4.2 is present (checked above); the intrinsic is a pure computation.
        let host = unsafe { std::arch::x86_64::_mm_crc32_u64(0x1234_5678, 0xdead_beef_cafe_f00d) };
        assert_eq!(e.reg(Rax), host);
    }

    // crc32 eax, byte [rdi]
    let mut e = Env::long4();
    e.mem.put(DATA_GPA, &[0x31]);
    e.set(Rdi, DATA_LIN);
    e.set(Rax, 0xffff_ffff);
    assert_eq!(e.run(&[0xf2, 0x0f, 0x38, 0xf0, 0x07]), Ok(Completion::Done));
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: SSE4.2 is present (checked above).
        let host = unsafe { std::arch::x86_64::_mm_crc32_u8(0xffff_ffff, 0x31) };
        assert_eq!(e.reg(Rax), u64::from(host));
    }
}

const LOCK_CMPXCHG16B_RDI: [u8; 5] = [0xf0, 0x48, 0x0f, 0xc7, 0x0f];
const LOCK_CMPXCHG8B_RDI: [u8; 4] = [0xf0, 0x0f, 0xc7, 0x0f];

#[test]
fn cmpxchg16b_exchanges_when_equal() {
    let mut e = Env::long4();
    e.mem.put_u64(DATA_GPA + 0x40, 0x1111);
    e.mem.put_u64(DATA_GPA + 0x48, 0x2222);
    e.set(Rdi, DATA_LIN + 0x40);
    e.set(Rax, 0x1111);
    e.set(Rdx, 0x2222);
    e.set(Rbx, 0xaaaa);
    e.set(Rcx, 0xbbbb);
    assert_eq!(e.run(&LOCK_CMPXCHG16B_RDI), Ok(Completion::Done));
    assert_eq!(e.mem.u64_at(DATA_GPA + 0x40), 0xaaaa);
    assert_eq!(e.mem.u64_at(DATA_GPA + 0x48), 0xbbbb);
    assert_ne!(e.flags() & bits::RFLAGS_ZF, 0);
    assert_eq!(e.cpu.rip, CODE_LIN + 5);
    assert_eq!(e.completer.stats().count("cmpxchg16b"), 1);
}

#[test]
fn cmpxchg16b_loads_when_different() {
    let mut e = Env::long4();
    e.mem.put_u64(DATA_GPA + 0x40, 0x1111);
    e.mem.put_u64(DATA_GPA + 0x48, 0x2222);
    e.set(Rdi, DATA_LIN + 0x40);
    e.set(Rax, 0x1111);
    e.set(Rdx, 0x9999);
    e.set(Rbx, 0xaaaa);
    e.cpu.rflags |= bits::RFLAGS_ZF | bits::RFLAGS_CF;
    assert_eq!(e.run(&LOCK_CMPXCHG16B_RDI), Ok(Completion::Done));
    assert_eq!(e.mem.u64_at(DATA_GPA + 0x40), 0x1111);
    assert_eq!((e.reg(Rax), e.reg(Rdx)), (0x1111, 0x2222));
    assert_eq!(e.flags() & bits::RFLAGS_ZF, 0);
    assert_ne!(e.flags() & bits::RFLAGS_CF, 0, "other flags untouched");
}

#[test]
fn cmpxchg16b_misaligned_is_gp0_and_read_only_is_pf() {
    let mut e = Env::long4();
    e.set(Rdi, DATA_LIN + 0x48);
    assert_eq!(e.run(&LOCK_CMPXCHG16B_RDI), Ok(exc(vector::GP, Some(0))));
    assert_eq!(e.cpu.rip, CODE_LIN);

    // Even a failing compare writes on hardware: a read-only page faults (P|W).
    let mut e = Env::long4();
    e.set(Rdi, RO_LIN + 0x10);
    e.set(Rax, 1);
    assert_eq!(e.run(&LOCK_CMPXCHG16B_RDI), Ok(pf(RO_LIN + 0x10, 0b11)));
    assert_eq!(e.cpu.rip, CODE_LIN);
}

#[test]
fn cmpxchg8b_aligned_and_page_crossing() {
    let mut e = Env::long4();
    e.mem.put_u64(DATA_GPA + 0x50, 0x0000_0002_0000_0001);
    e.set(Rdi, DATA_LIN + 0x50);
    e.set(Rax, 0xffff_ffff_0000_0001); // upper halves ignored
    e.set(Rdx, 2);
    e.set(Rbx, 0x33);
    e.set(Rcx, 0x44);
    assert_eq!(e.run(&LOCK_CMPXCHG8B_RDI), Ok(Completion::Done));
    assert_eq!(e.mem.u64_at(DATA_GPA + 0x50), 0x0000_0044_0000_0033);
    assert_ne!(e.flags() & bits::RFLAGS_ZF, 0);

    // Misaligned across the boundary of two data pages, compare fails: EDX:EAX loaded.
    let mut e = Env::long4();
    e.mem.put_u64(DATA_GPA + 0xffc, 0x0807_0605_0403_0201);
    e.set(Rdi, DATA_LIN + 0xffc);
    e.set(Rax, 0xffff_ffff_0000_0000);
    e.cpu.rflags |= bits::RFLAGS_ZF;
    assert_eq!(e.run(&LOCK_CMPXCHG8B_RDI), Ok(Completion::Done));
    assert_eq!((e.reg(Rax), e.reg(Rdx)), (0x0403_0201, 0x0807_0605));
    assert_eq!(e.flags() & bits::RFLAGS_ZF, 0);

    // ...and succeeds: both pieces written.
    e.cpu.rip = CODE_LIN;
    e.set(Rbx, 0x1122_3344);
    e.set(Rcx, 0x5566_7788);
    assert_eq!(e.run(&LOCK_CMPXCHG8B_RDI), Ok(Completion::Done));
    assert_eq!(e.mem.u64_at(DATA_GPA + 0xffc), 0x5566_7788_1122_3344);
}

#[test]
fn rdrand_and_rdseed_set_cf_and_a_value() {
    for (code, name) in [
        (&[0x48, 0x0f, 0xc7, 0xf0][..], "rdrand"),
        (&[0x48, 0x0f, 0xc7, 0xf8][..], "rdseed"),
    ] {
        let mut e = Env::long4();
        e.cpu.rflags |= bits::RFLAGS_ZF | bits::RFLAGS_OF;
        assert_eq!(e.run(code), Ok(Completion::Done), "{name}");
        let status = e.flags() & STATUS;
        // The host has the instruction on this machine; a CF=0 answer must come with 0.
        if status == bits::RFLAGS_CF {
            assert_eq!(e.completer.stats().count(name), 1);
        } else {
            assert_eq!(status, 0, "{name}: only CF may be set");
            assert_eq!(e.reg(Rax), 0);
        }
    }
    // 16-bit destination merges.
    let mut e = Env::long4();
    e.set(Rax, 0x5555_5555_5555_0000);
    assert_eq!(e.run(&[0x66, 0x0f, 0xc7, 0xf0]), Ok(Completion::Done));
    assert_eq!(e.reg(Rax) >> 16, 0x5555_5555_5555);
}

#[test]
fn unsupported_instruction_names_bytes_and_mnemonic() {
    let mut e = Env::long4();
    e.set(Rdi, DATA_LIN);
    // xrstor [rdi]
    let err = e.run(&[0x0f, 0xae, 0x2f]).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with(
            "vCPU 0: cannot complete instruction at RIP 0xffffffff81000000 (bytes 0f ae 2f: xrstor"
        ),
        "{msg}"
    );
    assert!(msg.contains("cannot continue"), "{msg}");
    assert_eq!(e.cpu.rip, CODE_LIN);
    assert_eq!(e.completer.stats().failures(), 1);
}

#[test]
fn data_outside_guest_ram_is_an_error() {
    let mut e = Env::long4();
    e.set(Rdi, HOLE_LIN);
    let err = e.run(&[0x0f, 0x38, 0xf0, 0x07]).unwrap_err();
    assert!(
        matches!(err, EmulationError::NotRam { gpa: HOLE_GPA, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("not RAM"));
    assert_eq!(e.cpu.rip, CODE_LIN);
}
