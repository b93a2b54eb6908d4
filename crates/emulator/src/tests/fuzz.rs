//! Fuzz-style robustness: many random byte sequences and register values, in every mode, must
//! neither panic nor reach outside guest RAM without reporting it, and page tables may change
//! only in their accessed/dirty bits.

use super::*;
use crate::testutil::{A, D, TestCpu};
use crate::{Seg, vector};

/// xorshift64*: deterministic, no dependencies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

const PREFIXES: &[u8] = &[
    0x66, 0x67, 0xf0, 0xf2, 0xf3, 0x64, 0x65, 0x2e, 0x26, 0x36, 0x3e, 0x48, 0x41, 0x4c, 0x40,
];

/// Opcode stems of the implemented families, so that random tails reach the handlers.
const STEMS: &[&[u8]] = &[
    &[0xcc],
    &[0x0f, 0x0b],
    &[0x0f, 0xae],
    &[0x9b],
    &[0x90],
    &[0x0f, 0x1f],
    &[0x0f, 0x18],
    &[0x0f, 0x1e],
    &[0x0f, 0xb8],
    &[0x0f, 0xbc],
    &[0x0f, 0xbd],
    &[0x0f, 0x38, 0xf0],
    &[0x0f, 0x38, 0xf1],
    &[0x0f, 0xc7],
];

fn random_insn(rng: &mut Rng) -> [u8; 15] {
    let mut b = [0u8; 15];
    for x in b.iter_mut() {
        *x = rng.next() as u8;
    }
    if rng.below(4) != 0 {
        let mut i = 0;
        for _ in 0..rng.below(4) {
            b[i] = rng.pick(PREFIXES);
            i += 1;
        }
        for s in rng.pick(STEMS) {
            b[i] = *s;
            i += 1;
        }
    }
    b
}

fn random_value(rng: &mut Rng) -> u64 {
    let near = rng.below(0x3000);
    match rng.below(8) {
        0 => rng.next(),
        1 => DATA_LIN + near,
        2 => USER_LIN + near,
        3 => HOLE_LIN + near,
        4 => RO_LIN + near,
        5 => near,
        6 => 0x0000_8000_0000_0000 - (near & 0xf),
        _ => u64::from(rng.next() as u32),
    }
}

/// Runs `rounds` random instructions against `cpu0`/`mem`, checking the invariants.
fn fuzz(
    seed: u64,
    rounds: usize,
    cpu0: &TestCpu,
    mem: &mut crate::testutil::TestMem,
    code: (u64, u64),
) {
    let mut rng = Rng(seed);
    let mut pt_before = mem.bytes[PT_AT as usize..PT_AT as usize + 0x10000].to_vec();
    let mut handled = 0;
    for round in 0..rounds {
        let mut cpu = cpu0.clone();
        for g in cpu.gprs.iter_mut() {
            *g = random_value(&mut rng);
        }
        cpu.rflags = 0x2 | (rng.next() & 0x40_0cd5);
        if rng.below(8) == 0 {
            cpu.cpl = 3;
        }
        cpu.seg_mut(Seg::Fs).base = random_value(&mut rng);
        cpu.seg_mut(Seg::Gs).base = random_value(&mut rng);
        let (code_lin, code_gpa) = code;
        let off = rng.pick(&[0u64, 0x100, 0xff8, 0xffc, 0x1ff4, 0x1ffa, 0x1fff]) + rng.below(4);
        let off = off.min(0x1fff);
        cpu.rip = code_lin + off;
        let insn = random_insn(&mut rng);
        let n = (0x2000 - off as usize).min(15);
        mem.put(code_gpa + off, &insn[..n]);
        let oor_before = mem.out_of_range.get();
        let hint_len = rng.below(17) as usize;
        let hint = (rng.below(3) == 0).then(|| &insn[..hint_len.min(15)]);

        let rip0 = cpu.rip;
        let r = crate::complete(&mut cpu, mem, hint);

        let oor = mem.out_of_range.get() > oor_before;
        match &r {
            Ok(Completion::Done) => {
                handled += 1;
                assert!(!oor, "round {round}: unreported access outside RAM");
                let step = cpu.rip.wrapping_sub(rip0) & 0xffff_ffff;
                assert!(
                    (1..=15).contains(&step),
                    "round {round}: RIP moved by {step}"
                );
            }
            Ok(Completion::Inject { vector: v, .. }) => {
                handled += 1;
                assert!(!oor, "round {round}: unreported access outside RAM");
                if *v != vector::BP {
                    assert_eq!(cpu.rip, rip0, "round {round}: a fault must leave RIP");
                }
            }
            Err(EmulationError::NotRam { .. }) => assert_eq!(cpu.rip, rip0),
            Err(e @ EmulationError::Unsupported { .. }) => {
                assert!(!oor, "round {round}: {e}");
                assert_eq!(cpu.rip, rip0);
                assert!(e.to_string().contains("cannot continue"));
            }
        }
        // Page tables are outside every mapping: only A/D bits may change.
        let now = &mem.bytes[PT_AT as usize..PT_AT as usize + 0x10000];
        if now == pt_before.as_slice() {
            continue;
        }
        for (i, (a, b)) in pt_before.chunks(8).zip(now.chunks(8)).enumerate() {
            let mut x = [0u8; 8];
            let mut y = [0u8; 8];
            x.copy_from_slice(a);
            y.copy_from_slice(b);
            let diff = u64::from_le_bytes(x) ^ u64::from_le_bytes(y);
            // 4-byte legacy entries put the second entry's A/D bits at 37 and 38.
            let ad = A | D | (A | D) << 32;
            assert_eq!(diff & !ad, 0, "round {round}: page table word {i} changed");
        }
        pt_before = now.to_vec();
    }
    // The stems make a good share of rounds reach a handler (or a decode fault).
    assert!(handled > rounds / 10, "only {handled} of {rounds} handled");
}

#[test]
fn random_bytes_long_mode_4_and_5_level() {
    for (seed, kind) in [(1, PtKind::Long4), (2, PtKind::Long5)] {
        let mut e = Env::long(kind);
        let cpu = e.cpu.clone();
        fuzz(seed, 10_000, &cpu, &mut e.mem, (CODE_LIN, CODE_GPA));
    }
}

#[test]
fn random_bytes_protected_and_real_mode() {
    let mut mem = crate::testutil::TestMem::new(MEM_SIZE);
    let mut pt = crate::testutil::PageTables::new(&mut mem, PtKind::Pae, PT_AT);
    for i in 0..2 {
        pt.map(&mut mem, 0xc000_0000 + i * 0x1000, CODE_GPA + i * 0x1000, P);
    }
    pt.map(&mut mem, 0x0040_0000, USER_GPA, P | RW | US);
    let cpu = TestCpu::prot32(Some((pt.root, bits::CR4_PAE)));
    fuzz(3, 5000, &cpu, &mut mem, (0xc000_0000, CODE_GPA));

    let mut mem = crate::testutil::TestMem::new(MEM_SIZE);
    let mut cpu = TestCpu::prot32(None);
    cpu.seg_mut(Seg::Ds).limit = 0x1f_ffff;
    fuzz(4, 5000, &cpu, &mut mem, (CODE_GPA, CODE_GPA));

    let mut mem = crate::testutil::TestMem::new(MEM_SIZE);
    let mut cpu = TestCpu::real();
    cpu.seg_mut(Seg::Cs).base = CODE_GPA;
    fuzz(5, 5000, &cpu, &mut mem, (0, CODE_GPA));
}
