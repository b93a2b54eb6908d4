# Exceptions: illegal instructions (tval = bits), ecall from each mode, ebreak,
# misaligned accesses (performed) and atomics (trapping), access faults outside RAM for
# loads, stores and fetches, delegation to S-mode, CSR privilege and TVM/TW/TSR.
.include "common.inc"
START
main:
    TEST 1
    EXPECT_TRAP
ill1:
    .word 0xffffffff
1:  CHECK s10, 2
    CHECK s11, 0xffffffff
    EXPECT_TRAP
ill2:
    .half 0
1:  CHECK s10, 2
    CHECK s11, 0
    EXPECT_TRAP
ill3:
    csrr a0, 0x7c0          # no such CSR
1:  CHECK s10, 2
    la t0, ill3
    lwu t1, 0(t0)
    bne s11, t1, fail
    EXPECT_TRAP
    csrw mvendorid, zero    # read-only CSR
1:  CHECK s10, 2
    TEST 2
    EXPECT_TRAP
    ecall
1:  CHECK s10, 11
    EXPECT_TRAP
brk:
    ebreak
1:  CHECK s10, 3
    la t0, brk
    bne s11, t0, fail
    TEST 3
    # Misaligned loads/stores are performed by the machine.
    la s0, data
    li a0, 0x1122334455667788
    sd a0, 1(s0)
    ld a1, 1(s0)
    bne a0, a1, fail
    lw a1, 3(s0)
    CHECK a1, 0x33445566
    # Misaligned atomics trap.
    addi a2, s0, 2
    EXPECT_TRAP
    amoadd.w a1, a0, (a2)
1:  CHECK s10, 6
    bne s11, a2, fail
    EXPECT_TRAP
    lr.d a1, (a2)
1:  CHECK s10, 4
    bne s11, a2, fail
    TEST 4
    # Outside RAM and devices: access faults with the address in tval.
    li a2, 0x40000000
    EXPECT_TRAP
    ld a1, 0(a2)
1:  CHECK s10, 5
    CHECK s11, 0x40000000
    EXPECT_TRAP
    sw a1, 8(a2)
1:  CHECK s10, 7
    CHECK s11, 0x40000008
    li a2, -8
    EXPECT_TRAP
    ld a1, 0(a2)
1:  CHECK s10, 5
    CHECK s11, -8
    # Beyond the end of RAM (8 MiB machine).
    li a2, 0x80800000
    EXPECT_TRAP
    lb a1, 0(a2)
1:  CHECK s10, 5
    EXPECT_TRAP
    li t0, 0x1000
    jr t0
1:  CHECK s10, 1
    CHECK s11, 0x1000
    TEST 5
    # ecall from S (not delegated) reaches M with MPP = S.
    EXPECT_TRAP
    ENTER_S s_ecall
1:  CHECK s10, 9
    CHECK s8, 1
    TEST 6
    # S-mode may not touch M CSRs.
    EXPECT_TRAP
    ENTER_S s_mcsr
1:  CHECK s10, 2
    CHECK s8, 1
    TEST 7
    # Delegated ecall from U goes to stvec; the S handler reports back by ecall.
    li t0, 1 << 8
    csrw medeleg, t0
    la t0, s_handler
    csrw stvec, t0
    EXPECT_TRAP
    ENTER_U u_ecall
1:  CHECK s10, 9
    CHECK a3, 8
    la t0, u_ecall
    bne a4, t0, fail
    CHECK a5, 0            # SPP = U
    TEST 8
    # Delegated illegal instruction from U, with tval.
    li t0, (1 << 8) | (1 << 2)
    csrw medeleg, t0
    EXPECT_TRAP
    ENTER_U u_csr
1:  CHECK a3, 2
    la t0, u_csr
    lwu t1, 0(t0)
    bne a6, t1, fail
    csrw medeleg, zero
    TEST 9
    # TSR: sret in S traps; TW: wfi in S traps; TVM: satp and sfence.vma trap.
    li t0, 1 << 22
    csrs mstatus, t0
    EXPECT_TRAP
    ENTER_S s_sret
1:  CHECK s10, 2
    li t0, 1 << 22
    csrc mstatus, t0
    li t0, 1 << 21
    csrs mstatus, t0
    EXPECT_TRAP
    ENTER_S s_wfi
1:  CHECK s10, 2
    li t0, 1 << 21
    csrc mstatus, t0
    li t0, 1 << 20
    csrs mstatus, t0
    EXPECT_TRAP
    ENTER_S s_satp
1:  CHECK s10, 2
    EXPECT_TRAP
    ENTER_S s_sfence
1:  CHECK s10, 2
    li t0, 1 << 20
    csrc mstatus, t0
    TEST 10
    # Counters from U: illegal unless both mcounteren and scounteren allow them.
    csrw mcounteren, zero
    EXPECT_TRAP
    ENTER_U u_time
1:  CHECK s10, 2
    CHECK s8, 0
    li t0, 7
    csrw mcounteren, t0
    csrw scounteren, t0
    EXPECT_TRAP
    ENTER_U u_time
1:  CHECK s10, 8           # reached the ecall after rdtime
    EXPECT_TRAP
    ENTER_U u_wfi          # wfi in U is illegal
1:  CHECK s10, 2
    j pass

s_ecall:
    ecall
s_mcsr:
    csrr a0, mstatus
s_sret:
    sret
s_wfi:
    wfi
s_satp:
    csrr a0, satp
s_sfence:
    sfence.vma
u_ecall:
    ecall
u_csr:
    csrr a0, sstatus
u_time:
    rdtime a0
    rdcycle a0
    ecall
u_wfi:
    wfi
    j fail
    .align 2
s_handler:
    csrr a3, scause
    csrr a4, sepc
    csrr a6, stval
    csrr a5, sstatus
    srli a5, a5, 8
    andi a5, a5, 1
    ecall

    .data
    .align 3
data: .zero 32
