# Two harts: AMOs and an LR/SC spinlock are atomic across host threads, and a CLINT
# software interrupt (msip) from hart 0 wakes hart 1 from WFI.
.include "common.inc"
.equ N, 20000
START
main:
    csrr s11, mhartid
    la s0, counter
    la s1, lock
    la s2, counter2
    la s3, done
    TEST 1
    li t1, N
1:  li t0, 1
    amoadd.d zero, t0, (s0)
    addi t1, t1, -1
    bnez t1, 1b
    TEST 2
    li t1, N
1:  # acquire
2:  lr.w t0, (s1)
    bnez t0, 2b
    li t0, 1
    sc.w t0, t0, (s1)
    bnez t0, 2b
    fence rw, rw
    ld t2, 0(s2)
    addi t2, t2, 1
    sd t2, 0(s2)
    fence rw, rw
    sw zero, 0(s1)
    addi t1, t1, -1
    bnez t1, 1b
    li t0, 1
    amoadd.w zero, t0, (s3)
    bnez s11, hart1
    # Hart 0 waits for both harts to finish, then checks the totals.
2:  lw t0, 0(s3)
    li t1, 2
    bne t0, t1, 2b
    ld t0, 0(s0)
    CHECK t0, 2 * N
    ld t0, 0(s2)
    CHECK t0, 2 * N
    TEST 3
    # Wake hart 1 (waiting in WFI) with an IPI and wait for its acknowledgement.
    la s4, woken
2:  lw t0, 4(s4)             # hart 1 is ready to sleep
    beqz t0, 2b
    li t1, CLINT + 4
    li t0, 1
    sw t0, 0(t1)
2:  lw t0, 0(s4)
    beqz t0, 2b
    lw t0, 0(t1)
    CHECK t0, 0              # hart 1 cleared its msip
    j pass

hart1:
    li t0, 1 << 3
    csrw mie, t0             # MSIE on, mstatus.MIE off: WFI wakes, no trap taken
    la s4, woken
    li t0, 1
    sw t0, 4(s4)
1:  wfi
    csrr t0, mip
    andi t0, t0, 1 << 3
    beqz t0, 1b
    li t1, CLINT + 4
    sw zero, 0(t1)
    li t0, 1
    sw t0, 0(s4)
2:  wfi
    j 2b

    .data
    .align 3
counter:  .dword 0
counter2: .dword 0
lock:     .word 0
done:     .word 0
woken:    .word 0, 0
