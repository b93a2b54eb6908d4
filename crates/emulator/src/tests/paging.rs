//! Page walks: faults and their error codes, permissions, accessed/dirty bits, large pages,
//! 5-level paging, instructions that cross pages.

use super::*;
use crate::Gpr::*;
use crate::testutil::{A, D, PS};
use crate::vector;

const POPCNT_RAX_RDI: [u8; 5] = [0xf3, 0x48, 0x0f, 0xb8, 0x07];
const MOVBE_LOAD: [u8; 4] = [0x0f, 0x38, 0xf0, 0x07]; // movbe eax, [rdi]
const MOVBE_STORE: [u8; 4] = [0x0f, 0x38, 0xf1, 0x07]; // movbe [rdi], eax
const USER_CODE_LIN: u64 = 0x50_0000;
const USER_CODE_GPA: u64 = 0x50000;

#[test]
fn fetch_from_unmapped_page_is_pf_with_id_bit() {
    let mut e = Env::long4();
    e.cpu.rip = CODE_LIN + 0x4000;
    assert_eq!(e.run(&[]), Ok(pf(CODE_LIN + 0x4000, 0x10)));
    assert_eq!(e.completer.stats().exceptions(), 1);
}

#[test]
fn instruction_crossing_into_an_unmapped_page() {
    let mut e = Env::long4();
    // The third code page is unmapped: the popcnt's last three bytes are missing.
    e.cpu.rip = CODE_LIN + 0x1ffe;
    assert_eq!(e.run(&POPCNT_RAX_RDI), Ok(pf(CODE_LIN + 0x2000, 0x10)));
    assert_eq!(e.cpu.rip, CODE_LIN + 0x1ffe);
    // A one-byte instruction at the end of the page does not touch the next one.
    e.cpu.rip = CODE_LIN + 0x1fff;
    assert_eq!(e.run(&[0x90]), Ok(Completion::Done));
}

#[test]
fn instruction_crossing_two_mapped_pages() {
    let mut e = Env::long4();
    e.cpu.rip = CODE_LIN + 0xffd;
    e.mem.put_u64(DATA_GPA + 0x1ffc, 0xff);
    // The operand also crosses: 4 bytes in the first data page, 4 in the second.
    e.set(Rdi, DATA_LIN + 0xffc);
    e.mem.put(DATA_GPA + 0xffc, &[0xff; 4]);
    e.mem.put(DATA_GPA + 0x1000, &[0x01, 0, 0, 0]);
    assert_eq!(e.run(&POPCNT_RAX_RDI), Ok(Completion::Done));
    assert_eq!(e.reg(Rax), 33);
    assert_eq!(e.cpu.rip, CODE_LIN + 0x1002);
}

#[test]
fn fetch_from_nx_page_is_a_protection_fault() {
    let mut e = Env::long4();
    e.cpu.rip = DATA_LIN;
    assert_eq!(e.run(&[]), Ok(pf(DATA_LIN, 0x11)));
}

fn user_env() -> Env {
    let mut e = Env::long4();
    e.pt.map(&mut e.mem, USER_CODE_LIN, USER_CODE_GPA, P | US);
    e.mem.put(USER_CODE_GPA, &MOVBE_LOAD);
    e.cpu.rip = USER_CODE_LIN;
    e.cpu.cpl = 3;
    e
}

#[test]
fn user_mode_cannot_touch_supervisor_pages() {
    let mut e = user_env();
    e.set(Rdi, DATA_LIN);
    assert_eq!(
        e.completer.complete(&mut e.cpu, &mut e.mem, None),
        Ok(pf(DATA_LIN, 0b101))
    );
    e.set(Rdi, USER_LIN);
    e.mem.put(USER_GPA, &[1, 2, 3, 4]);
    assert_eq!(
        e.completer.complete(&mut e.cpu, &mut e.mem, None),
        Ok(Completion::Done)
    );
    assert_eq!(e.reg(Rax), 0x0102_0304);
    // And user code cannot run supervisor code.
    let mut e = Env::long4();
    e.cpu.cpl = 3;
    assert_eq!(e.run(&[0x90]), Ok(pf(CODE_LIN, 0b1_0101)));
}

#[test]
fn supervisor_write_to_read_only_page_depends_on_cr0_wp() {
    let mut e = Env::long4();
    e.set(Rdi, RO_LIN);
    assert_eq!(e.run(&MOVBE_STORE), Ok(pf(RO_LIN, 0b11)));
    e.cpu.cr0 &= !bits::CR0_WP;
    e.set(Rax, 0xaabb_ccdd);
    assert_eq!(e.run(&MOVBE_STORE), Ok(Completion::Done));
    assert_eq!(
        &e.mem.bytes[RO_GPA as usize..RO_GPA as usize + 4],
        &[0xaa, 0xbb, 0xcc, 0xdd]
    );
}

#[test]
fn smap_and_smep() {
    let mut e = Env::long4();
    e.cpu.cr4 |= bits::CR4_SMAP | bits::CR4_SMEP;
    e.set(Rdi, USER_LIN);
    assert_eq!(e.run(&MOVBE_LOAD), Ok(pf(USER_LIN, 0b1)));
    e.cpu.rflags |= bits::RFLAGS_AC;
    assert_eq!(e.run(&MOVBE_LOAD), Ok(Completion::Done));

    let mut e = user_env();
    e.cpu.cpl = 0;
    e.cpu.cr4 |= bits::CR4_SMEP;
    assert_eq!(
        e.completer.complete(&mut e.cpu, &mut e.mem, None),
        Ok(pf(USER_CODE_LIN, 0b1_0001))
    );
}

#[test]
fn accessed_and_dirty_bits_are_set() {
    let mut e = Env::long4();
    let leaf = e.pt.leaf(&e.mem, DATA_LIN + 0x1000);
    e.set(Rdi, DATA_LIN + 0x1000);
    assert_eq!(e.run(&MOVBE_LOAD), Ok(Completion::Done));
    assert_eq!(e.mem.u64_at(leaf) & (A | D), A);
    assert_eq!(e.run(&MOVBE_STORE), Ok(Completion::Done));
    assert_eq!(e.mem.u64_at(leaf) & (A | D), A | D);
    // The root entry got its accessed bit too.
    assert_ne!(
        e.mem.u64_at(e.pt.root + 8 * ((DATA_LIN >> 39) & 511)) & A,
        0
    );
}

#[test]
fn xd_without_nxe_is_a_reserved_bit_fault() {
    let mut e = Env::long4();
    e.cpu.efer &= !bits::EFER_NXE;
    e.set(Rdi, DATA_LIN);
    assert_eq!(e.run(&MOVBE_LOAD), Ok(pf(DATA_LIN, 0b1001)));
}

#[test]
fn large_pages_2m_and_1g() {
    let mut e = Env::long4();
    // 2 MiB page at linear 0x4000_0000_0000's neighbourhood -> guest-physical 0.
    let lin2m = 0x0000_1000_0020_0000u64;
    e.pt.map_at_depth(&mut e.mem, lin2m, 0, P | RW | PS | NX, 1);
    e.mem.put(0x12345, &[9, 8, 7, 6]);
    e.set(Rdi, lin2m + 0x12345);
    assert_eq!(e.run(&MOVBE_LOAD), Ok(Completion::Done));
    assert_eq!(e.reg(Rax), 0x0908_0706);

    let lin1g = 0x0000_2000_4000_0000u64;
    e.pt.map_at_depth(&mut e.mem, lin1g, 0, P | RW | PS | NX, 2);
    e.set(Rdi, lin1g + 0x12345);
    e.set(Rax, 0);
    assert_eq!(e.run(&MOVBE_LOAD), Ok(Completion::Done));
    assert_eq!(e.reg(Rax), 0x0908_0706);
}

#[test]
fn five_level_paging_reaches_57_bit_addresses() {
    let mut e = Env::long(PtKind::Long5);
    let lin = 0x0080_0000_0000_0000u64; // canonical only with LA57
    e.pt.map(&mut e.mem, lin, DATA_GPA + 0x3000, P | RW | NX);
    e.mem.put(DATA_GPA + 0x3000, &[0xde, 0xad, 0xbe, 0xef]);
    e.set(Rdi, lin);
    assert_eq!(e.run(&MOVBE_LOAD), Ok(Completion::Done));
    assert_eq!(e.reg(Rax), 0xdead_beef);
    // Kernel-half addresses still work through the fifth level.
    e.set(Rdi, DATA_LIN);
    assert_eq!(e.run(&MOVBE_LOAD), Ok(Completion::Done));

    let mut e = Env::long4();
    e.set(Rdi, lin);
    assert_eq!(e.run(&MOVBE_LOAD), Ok(exc(vector::GP, Some(0))));
}
