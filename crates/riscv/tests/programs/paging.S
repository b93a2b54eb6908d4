# Sv39 and Sv48: S-mode and U-mode translation, page faults of each kind with the faulting
# address in tval, SUM, A/D bits set by the walker, read-only pages, MPRV in M-mode,
# unsupported satp modes ignored, sfence.vma after a PTE change.
.include "common.inc"
.equ UVA, 0x40000000

# Writes PTE (pa in register `pa`, flags) into table `tab` (register) at index `idx`.
.macro SETPTE tab, idx, pa, flags
    srli t0, \pa, 12
    slli t0, t0, 10
    ori t0, t0, \flags
    sd t0, (\idx * 8)(\tab)
.endm

START
main:
    la s0, root
    la s1, l1
    la s2, l0
    la s3, upage
    la s4, dpage
    # Identity gigapage over RAM for S-mode code (RWX, A, D).
    li t1, 0x80000000
    SETPTE s0, 2, t1, 0xcf
    SETPTE s0, 1, s1, 1
    SETPTE s1, 0, s2, 1
    SETPTE s2, 0, s3, 0x1f      # U RWX, A/D clear
    SETPTE s2, 1, s4, 0x53      # U R, A
    sd zero, 16(s2)
    # U code: ecall at the start of upage; data marker in dpage.
    li t0, 0x00000073
    sw t0, 0(s3)
    li t0, 0x1234
    sd t0, 8(s4)
    srli t0, s0, 12
    li t1, 8 << 60
    or t0, t0, t1
    csrw satp, t0
    sfence.vma
    li s5, UVA

    TEST 1
    # S without SUM may not read a U page.
    EXPECT_TRAP
    ENTER_S s_load_u
1:  CHECK s10, 13
    CHECK s11, UVA + 8
    CHECK s8, 1
    TEST 2
    # With SUM it may; A gets set, D not.
    li t0, 1 << 18
    csrs mstatus, t0
    EXPECT_TRAP
    ENTER_S s_load_u
1:  CHECK s10, 9
    CHECK a0, 0
    ld t1, 0(s2)
    andi t2, t1, 0x40
    CHECK t2, 0x40
    andi t2, t1, 0x80
    CHECK t2, 0
    TEST 3
    EXPECT_TRAP
    ENTER_S s_store_u
1:  CHECK s10, 9
    ld t1, 0(s2)
    andi t2, t1, 0x80
    CHECK t2, 0x80
    ld t1, 16(s3)
    CHECK t1, 0x77
    TEST 4
    # Store to a read-only page: store page fault.
    EXPECT_TRAP
    ENTER_S s_store_ro
1:  CHECK s10, 15
    CHECK s11, UVA + 0x1010
    TEST 5
    # Unmapped: load page fault.
    EXPECT_TRAP
    ENTER_S s_load_unmapped
1:  CHECK s10, 13
    CHECK s11, UVA + 0x2000
    TEST 6
    # U-mode runs code from its page.
    EXPECT_TRAP
    ENTER_U_AT UVA
1:  CHECK s10, 8
    TEST 7
    # U-mode fetch from an unmapped page and from a supervisor page.
    EXPECT_TRAP
    ENTER_U_AT UVA + 0x2000
1:  CHECK s10, 12
    CHECK s11, UVA + 0x2000
    EXPECT_TRAP
    ENTER_U s_load_u
1:  CHECK s10, 12
    la t0, s_load_u
    bne s11, t0, fail
    TEST 8
    # S may not execute U pages even with SUM.
    EXPECT_TRAP
    ENTER_S_AT UVA
1:  CHECK s10, 12
    TEST 9
    # MPRV: M-mode data accesses translated as S.
    li t0, 1 << 18
    csrc mstatus, t0        # SUM off
    li t0, 0x1800
    csrc mstatus, t0
    li t0, (1 << 17) | 0x800
    csrs mstatus, t0        # MPRV, MPP = S
    EXPECT_TRAP
    ld a0, 8(s5)
1:  CHECK s10, 13
    CHECK s11, UVA + 8
    li t0, 0x1800
    csrc mstatus, t0
    li t0, (1 << 18) | 0x800
    csrs mstatus, t0        # SUM, MPP = S (the trap handler set MPP = M)
    li t1, UVA + 0x1000
    ld a0, 8(t1)
    CHECK a0, 0x1234
    li t0, 1 << 17
    csrc mstatus, t0
    TEST 10
    # Unsupported satp modes are ignored (Sv57).
    csrr t1, satp
    li t0, 10 << 60
    csrw satp, t0
    csrr t2, satp
    bne t1, t2, fail
    TEST 11
    # Sv48: a root whose entry 0 points at the Sv39 root as its level-2 table.
    la s6, root48
    SETPTE s6, 0, s0, 1
    srli t0, s6, 12
    li t1, 9 << 60
    or t0, t0, t1
    csrw satp, t0
    csrr t2, satp
    bne t0, t2, fail
    EXPECT_TRAP
    ENTER_S s_load_ro
1:  CHECK s10, 9
    CHECK a0, 0x1234
    # Non-canonical Sv48 address faults.
    EXPECT_TRAP
    ENTER_S s_noncanon
1:  CHECK s10, 13
    TEST 12
    # Remap dpage's VA to upage and sfence.vma: the new mapping is used.
    SETPTE s2, 1, s3, 0x53
    li t0, 0x99
    sd t0, 8(s3)
    sfence.vma
    EXPECT_TRAP
    ENTER_S s_load_ro
1:  CHECK s10, 9
    CHECK a0, 0x99
    j pass

s_load_u:
    li a0, 0
    ld a1, 8(s5)
    ecall
s_store_u:
    li t0, 0x77
    sd t0, 16(s5)
    ecall
s_store_ro:
    li t0, UVA + 0x1000
    sd zero, 0x10(t0)
    ecall
s_load_unmapped:
    li t0, UVA + 0x2000
    ld a0, 0(t0)
    ecall
s_load_ro:
    li t0, UVA + 0x1000
    ld a0, 8(t0)
    ecall
s_noncanon:
    li t0, 0x0000800000000000
    ld a0, 0(t0)
    ecall

    .data
    .align 12
root:   .zero 4096
l1:     .zero 4096
l0:     .zero 4096
upage:  .zero 4096
dpage:  .zero 4096
root48: .zero 4096
