/* PVM probe guest: assembled with `as --64` and linked at 0x10000 (see pvm_probe.rs).
 * Reports are byte/word/dword stores to unbacked guest-physical addresses (MMIO exits):
 * port I/O cannot report from ring 3 here (PVM raises #GP for `out` in ring 3 even with
 * IOPL 3). MMIO 0x10000000 + offset:
 *   0x10 progress code, 0x11 exception vector, 0x12 CS as the guest reads it,
 *   0x13 unexpected vector, 0x14 CS saved in the exception frame, 0x15 RIP in the frame,
 *   0x16 #PF error code, 0x17 CR2 (low half). */
        .code64
        .set MMIO, 0x10000000
        .macro REPORT code
        movb $\code, MMIO+0x10
        .endm
        .macro READCS
        mov %cs, %ax
        mov %ax, MMIO+0x12
        .endm
        .macro FRAME off
        mov \off+8(%rsp), %rax
        mov %ax, MMIO+0x14
        mov \off(%rsp), %rax
        mov %eax, MMIO+0x15
        .endm
        .macro VECTOR v
        movb $\v, MMIO+0x11
        .endm

        .text
        .globl _start
_start:                                 /* 0x10000: ring-0 entry */
        REPORT 0x01
        READCS
        mov $0xc0000082, %ecx           /* LSTAR = the address at 0x5010 */
        mov 0x5010, %eax
        xor %edx, %edx
        wrmsr
        REPORT 0x11
        mov 0x5000, %rax                /* optional PVM event entry (0 = leave unset) */
        test %rax, %rax
        jz 1f
        mov $0x4b564df4, %ecx           /* MSR_PVM_EVENT_ENTRY */
        xor %edx, %edx
        wrmsr
        mov $0x4b564df2, %ecx           /* MSR_PVM_SUPERVISOR_RSP */
        mov $0x38000, %eax
        wrmsr
        REPORT 0x12
1:      push $0x2b                      /* SS: user data, RPL 3 */
        push $0x40000                   /* user RSP */
        push $0x0002                    /* RFLAGS */
        push $0x33                      /* CS: user code 64, RPL 3 */
        push $0x11000                   /* user RIP */
        iretq
        REPORT 0xe1
        hlt

        .org 0x100
syscall_entry:                          /* 0x10100 (LSTAR) */
        REPORT 0x03
        READCS
        sysretq

        .org 0x200
int80_entry:                            /* 0x10200, gate DPL 3 */
        REPORT 0x05
        READCS
        FRAME 0
        iretq

        .org 0x300
ud_entry:                               /* 0x10300: #UD, no error code */
        VECTOR 6
        READCS
        FRAME 0
        addq $2, (%rsp)                 /* skip ud2 */
        iretq

        .org 0x380
bp_entry:                               /* 0x10380: #BP, gate DPL 3 */
        VECTOR 3
        READCS
        FRAME 0
        iretq

        .org 0x400
gp_entry:                               /* 0x10400: #GP, error code */
        VECTOR 13
        READCS
        FRAME 8
        mov 8(%rsp), %rax               /* a faulting hlt is skipped; anything else ends */
        cmpb $0xf4, (%rax)
        jne 1f
        addq $1, 8(%rsp)
        add $8, %rsp
        iretq
1:      REPORT 0xed
        hlt

        .org 0x480
pf_entry:                               /* 0x10480: #PF */
        VECTOR 14
        FRAME 8
        mov (%rsp), %rax
        mov %eax, MMIO+0x16             /* error code */
        mov %cr2, %rax
        mov %eax, MMIO+0x17             /* fault address, low half */
        REPORT 0xee
        hlt

        .org 0x500
default_entry:                          /* 0x10500: anything else */
        movb $0xff, MMIO+0x13
        hlt

        .org 0x600
pvm_event_user:                         /* 0x10600: PVM event entry, from user mode */
        REPORT 0x21
        READCS
        hlt
        .org 0x700
pvm_event_syscall:                      /* 0x10700: PVM event entry + 256 */
        REPORT 0x22
        READCS
        hlt
        .org 0x800
pvm_event_supervisor:                   /* 0x10800: PVM event entry + 512 */
        REPORT 0x23
        READCS
        hlt

        .org 0x1000
user_entry:                             /* 0x11000: ring 3, runs the step at 0x5008 */
        REPORT 0x02
        READCS
        mov 0x5008, %rax
        cmp $1, %rax
        je 1f
        cmp $2, %rax
        je 2f
        cmp $3, %rax
        je 3f
        cmp $4, %rax
        je 4f
        mov $42, %eax                   /* step 0 */
        syscall
        jmp 9f
1:      int $0x80
        jmp 9f
2:      ud2
        jmp 9f
3:      int3
        jmp 9f
4:      hlt                             /* privileged: #GP from ring 3 */
9:      REPORT 0x04
        READCS
        REPORT 0xff
8:      jmp 8b
