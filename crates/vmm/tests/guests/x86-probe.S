/*
 * A minimal x86 guest for testing the monitor itself, independent of Linux: an ELF whose PVH
 * entry note points at 32-bit flat protected-mode code. It reports through the serial port;
 * the first letter of its command line picks what it does:
 *   c  print "tick XXXXXXXX" once per RTC second, forever (pause/resume, CPU use)
 *   p  power off through the ACPI sleep control register     (exit 0)
 *   r  reset through the i8042 controller                       (exit 0, or restart)
 *   x  reset through the ACPI reset register                    (exit 0)
 *   t  triple fault: no IDT, then int3                          (exit 2)
 *   u  read an unclaimed port and unclaimed MMIO: both must read all-ones
 *   m  find where its RAM ends (write, read back, restore each MiB), print it, power off
 *   v  read PCI configuration space through ports 0xCF8/0xCFC: the IDs of the host bridge
 *      (device 0) and of devices 1 and 2, the size mask of device 1's BAR 0 (all-ones
 *      written, read back, restored), and device 1's IDs again through ECAM (0xe0008000);
 *      power off
 *   s  state a snapshot must keep: set the local APIC's TPR, an IOAPIC redirection entry,
 *      the PIC's mask, an MSR, a debug register, and fill 64 KiB at 16 MiB with a pattern;
 *      then once per RTC second count in a register and in RAM, and print one line (a
 *      single `rep outsb`, so a snapshot never splits it):
 *      "tick N mem=N dr0=00abcdef tpr=00000020 ioapic=00010035 pic=000000fa msr=12345678
 *      sum=S" (no x87/SSE: on PVM hosts they fail in the guest's kernel mode)
 * Assembled and linked by the integration tests (binutils): see tests/x86_probe.rs.
 */
	.intel_syntax noprefix

	.section .note.Xen, "a", @note
	.balign 4
	.long 4			/* name size: "Xen\0" */
	.long 4			/* descriptor size */
	.long 18		/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.balign 4
	.long _start

	.text
	.code32
	.globl _start
_start:
	mov esp, 0x80000
	mov esi, [ebx + 24]	/* hvm_start_info.cmdline_paddr (low half) */
	mov al, [esi]
	cmp al, 'c'
	je counter
	cmp al, 'p'
	je poweroff
	cmp al, 'r'
	je reset_i8042
	cmp al, 'x'
	je reset_acpi
	cmp al, 't'
	je triple
	cmp al, 'u'
	je unclaimed
	cmp al, 'm'
	je ram_size
	cmp al, 'v'
	je virtio
	cmp al, 's'
	je state
	lea esi, msg_unknown
	call print
	jmp halt

counter:
	lea esi, msg_ready
	call print
	xor edi, edi
1:	call next_second
	lea esi, msg_tick
	call print
	mov eax, edi
	call print_hex
	mov al, '\n'
	call putc
	inc edi
	jmp 1b

poweroff:
	lea esi, msg_poweroff
	call print
	mov dx, 0x600		/* ACPI sleep control: SLP_TYP=5 (S5) | SLP_EN */
	mov al, 0x34
	out dx, al
	jmp halt

reset_i8042:
	lea esi, msg_reset
	call print
	mov al, 0xfe
	out 0x64, al
	jmp halt

reset_acpi:
	lea esi, msg_reset
	call print
	mov dx, 0x602		/* ACPI reset register */
	mov al, 1
	out dx, al
	jmp halt

triple:
	lea esi, msg_triple
	call print
	lidt [empty_idt]
	int3

unclaimed:
	mov dx, 0x1234
	in eax, dx
	mov ebx, eax
	lea esi, msg_port
	call print
	mov eax, ebx
	call print_hex
	mov eax, [0xd0000000]	/* inside the 32-bit PCI hole: no RAM, no device */
	mov ebx, eax
	lea esi, msg_mmio
	call print
	mov eax, ebx
	call print_hex
	mov al, '\n'
	call putc
	jmp poweroff

/* Past the end of its RAM a guest must find nothing: writes vanish, reads are all-ones. */
ram_size:
	mov ebx, 0x200000	/* above this image and its stack */
1:	mov ecx, [ebx]
	mov eax, ecx
	not eax
	mov [ebx], eax
	cmp [ebx], eax
	jne 2f
	mov [ebx], ecx
	add ebx, 0x100000
	cmp ebx, 0xc0000000	/* stop below the 32-bit PCI hole */
	jb 1b
2:	lea esi, msg_ram
	call print
	mov eax, ebx
	shr eax, 20
	call print_hex
	mov al, '\n'
	call putc
	jmp poweroff

virtio:
	lea esi, msg_pci_host
	call print
	mov eax, 0x80000000	/* bus 0, device 0, register 0 */
	call pci_read
	call print_hex
	lea esi, msg_pci_dev1
	call print
	mov eax, 0x80000800	/* device 1 */
	call pci_read
	call print_hex
	lea esi, msg_pci_dev2
	call print
	mov eax, 0x80001000	/* device 2 */
	call pci_read
	call print_hex
	lea esi, msg_pci_bar0
	call print
	mov eax, 0x80000810	/* device 1, BAR 0 */
	call pci_read
	mov edi, eax		/* the assigned address, restored below */
	mov eax, 0x80000810
	mov dx, 0xcf8
	out dx, eax
	mov eax, 0xffffffff
	mov dx, 0xcfc
	out dx, eax
	in eax, dx
	push eax
	mov eax, edi
	out dx, eax
	pop eax
	call print_hex
	lea esi, msg_pci_ecam
	call print
	mov eax, [0xe0008000]	/* ECAM: device 1 << 15 */
	call print_hex
	mov al, '\n'
	call putc
	jmp poweroff

state:
	mov dword ptr [0xfee00080], 0x20	/* local APIC TPR */
	mov dword ptr [0xfec00000], 0x1a	/* IOAPIC: select pin 5's redirection (low) */
	mov dword ptr [0xfec00010], 0x00010035	/* masked, vector 0x35 */
	mov al, 0xfa			/* PIC master mask */
	out 0x21, al
	mov ecx, 0x175			/* IA32_SYSENTER_ESP */
	mov eax, 0x12345678
	xor edx, edx
	wrmsr
	mov eax, 0x00abcdef		/* a debug register (breakpoint 0 stays disabled) */
	mov dr0, eax
	mov ebx, 0x1000000		/* pattern: dword i holds i * 0x9e3779b1 */
	xor eax, eax
1:	mov [ebx], eax
	add eax, 0x9e3779b1
	add ebx, 4
	cmp ebx, 0x1010000
	jb 1b
	lea esi, msg_ready
	call print
	mov byte ptr [buffered], 1
	xor ebp, ebp
	mov dword ptr [ticks_ram], 0
2:	call next_second
	inc ebp
	inc dword ptr [ticks_ram]
	lea esi, msg_tick
	call print
	mov eax, ebp
	call print_hex
	lea esi, msg_mem
	call print
	mov eax, [ticks_ram]
	call print_hex
	lea esi, msg_dr0
	call print
	mov eax, dr0
	call print_hex
	lea esi, msg_tpr
	call print
	mov eax, [0xfee00080]
	call print_hex
	lea esi, msg_ioapic
	call print
	mov dword ptr [0xfec00000], 0x1a
	mov eax, [0xfec00010]
	call print_hex
	lea esi, msg_pic
	call print
	xor eax, eax
	in al, 0x21
	call print_hex
	lea esi, msg_msr
	call print
	mov ecx, 0x175
	rdmsr
	call print_hex
	lea esi, msg_sum
	call print
	xor eax, eax
	mov ebx, 0x1000000
3:	add eax, [ebx]
	add ebx, 4
	cmp ebx, 0x1010000
	jb 3b
	call print_hex
	mov al, '\n'
	call putc
	call flush
	jmp 2b

/* Sends the line buffered by putc in one string write. */
flush:
	lea esi, linebuf
	mov ecx, [bufpos]
	sub ecx, esi
	mov dx, 0x3f8
	cld
	rep outsb
	lea eax, linebuf
	mov [bufpos], eax
	ret

/* Reads the configuration dword that eax (a CONFIG_ADDRESS value) selects into eax. */
pci_read:
	mov dx, 0xcf8
	out dx, eax
	mov dx, 0xcfc
	in eax, dx
	ret

halt:
	cli
	hlt
	jmp halt

/* Waits until the CMOS RTC's seconds register changes. */
next_second:
	call rtc_seconds
	mov bl, al
1:	call rtc_seconds
	cmp al, bl
	je 1b
	ret

rtc_seconds:
	xor al, al
	out 0x70, al
	in al, 0x71
	ret

/* Prints the NUL-terminated string at esi. */
print:
	lodsb
	test al, al
	jz 1f
	call putc
	jmp print
1:	ret

/* Writes al to the serial port, or appends it to the line buffer while `buffered`. */
putc:
	cmp byte ptr [buffered], 0
	jne 1f
	mov dx, 0x3f8
	out dx, al
	ret
1:	push ebx
	mov ebx, [bufpos]
	mov [ebx], al
	inc ebx
	mov [bufpos], ebx
	pop ebx
	ret

/* Prints eax as 8 hex digits. */
print_hex:
	mov ecx, 8
1:	rol eax, 4
	push eax
	and al, 0xf
	add al, '0'
	cmp al, '9'
	jbe 2f
	add al, 'a' - '0' - 10
2:	call putc
	pop eax
	loop 1b
	ret

	.section .rodata
	.balign 8
empty_idt:
	.word 0
	.long 0
msg_ready:	.asciz "PROBE-READY\n"
msg_tick:	.asciz "tick "
msg_poweroff:	.asciz "PROBE-POWEROFF\n"
msg_reset:	.asciz "PROBE-RESET\n"
msg_triple:	.asciz "PROBE-TRIPLE\n"
msg_port:	.asciz "PROBE-UNCLAIMED port="
msg_mmio:	.asciz " mmio="
msg_ram:	.asciz "PROBE-RAM-MIB "
msg_pci_host:	.asciz "PROBE-PCI host="
msg_pci_dev1:	.asciz " dev1="
msg_pci_dev2:	.asciz " dev2="
msg_pci_bar0:	.asciz " bar0="
msg_pci_ecam:	.asciz " ecam="
msg_unknown:	.asciz "PROBE-UNKNOWN-COMMAND\n"
msg_mem:	.asciz " mem="
msg_dr0:	.asciz " dr0="
msg_tpr:	.asciz " tpr="
msg_ioapic:	.asciz " ioapic="
msg_pic:	.asciz " pic="
msg_msr:	.asciz " msr="
msg_sum:	.asciz " sum="

	.data
	.balign 4
ticks_ram:	.long 0
bufpos:		.long linebuf
buffered:	.byte 0
linebuf:	.space 256
