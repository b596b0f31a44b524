# Test guest: brings up every vCPU and has each report its APIC id on ttyS0.
#
# The boot vCPU (entered in 64-bit mode) counts the CPUs from CPUID leaf 1, copies a real-mode
# trampoline to 0x10000, and sends INIT and two STARTUP IPIs (vector 0x10) to all others through
# its local APIC. Each AP goes from real mode straight to long mode with the VMM's GDT (0x500)
# and page tables (0x9000), reads its APIC id, prints "cpu N up" under a spinlock and counts
# itself in. When all have, the boot vCPU prints "all N cpus up" and resets the machine.
    .set LAPIC, 0xfee00000
    .set TRAMPOLINE, 0x10000
    .set COM1, 0x3f8

    .code64
    .text
    .globl _start
_start:
    mov $0x80000, %rsp
    mov $1, %eax
    cpuid
    shr $16, %ebx
    and $0xff, %ebx
    mov %ebx, ncpus(%rip)
    call report

    # Copy the trampoline below 1 MiB.
    lea ap_start(%rip), %rsi
    mov $TRAMPOLINE, %rdi
    mov $(ap_end - ap_start), %rcx
    rep movsb

    mov $LAPIC, %rbx
    movl $0, 0x310(%rbx)            # ICR high: no destination (shorthand below)
    movl $0x000c4500, 0x300(%rbx)   # INIT, all excluding self
    mov $100000, %ecx
1:  pause
    loop 1b
    movl $0x000c4610, 0x300(%rbx)   # STARTUP, vector 0x10
    mov $10000, %ecx
2:  pause
    loop 2b
    movl $0x000c4610, 0x300(%rbx)

    # Wait until every AP checked in.
3:  pause
    mov started(%rip), %eax
    inc %eax
    cmp ncpus(%rip), %eax
    jb 3b

    call lock
    lea all(%rip), %rsi
    call puts
    mov ncpus(%rip), %eax
    call putdec
    lea cpus_up(%rip), %rsi
    call puts
    call unlock
    mov $0xfe, %al
    out %al, $0x64
4:  hlt
    jmp 4b

# Prints "cpu <APIC id> up" for the calling CPU.
report:
    call lock
    lea cpu(%rip), %rsi
    call puts
    mov $LAPIC, %rbx
    mov 0x20(%rbx), %eax
    shr $24, %eax
    call putdec
    lea up(%rip), %rsi
    call puts
    call unlock
    ret

lock:
    mov $1, %eax
1:  xchg %eax, printlock(%rip)
    test %eax, %eax
    jz 2f
    pause
    jmp 1b
2:  ret

unlock:
    movl $0, printlock(%rip)
    ret

# Writes the NUL-terminated string at %rsi.
.include "common.inc"

# Writes %eax (below 1000) in decimal.
putdec:
    mov $COM1, %dx
    xor %ecx, %ecx
    mov $10, %edi
1:  xor %edx, %edx
    div %edi
    push %rdx
    inc %ecx
    test %eax, %eax
    jnz 1b
    mov $COM1, %dx
2:  pop %rax
    add $'0', %al
    out %al, %dx
    loop 2b
    ret

# 64-bit code of the APs, reached from the trampoline.
ap64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    # A stack per CPU: 4 KiB each below 0x80000, by APIC id.
    mov $LAPIC, %rbx
    mov 0x20(%rbx), %eax
    shr $24, %eax
    inc %eax
    shl $12, %eax
    mov $0x40000, %rsp
    add %rax, %rsp
    call report
    lock incl started(%rip)
1:  cli
    hlt
    jmp 1b

# Real mode, copied to TRAMPOLINE; the STARTUP IPI enters it at CS = TRAMPOLINE >> 4, IP = 0.
    .code16
ap_start:
    cli
    mov %cs, %ax
    mov %ax, %ds
    lgdtl gdtr - ap_start
    mov %cr4, %eax
    or $0x20, %eax                  # PAE
    mov %eax, %cr4
    mov $0x9000, %eax               # the VMM's identity-mapping PML4
    mov %eax, %cr3
    mov $0xc0000080, %ecx           # EFER.LME
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax            # PG, PE
    mov %eax, %cr0
    ljmpl $0x08, $ap64
gdtr:
    .word 31
    .long 0x500
ap_end:

    .data
printlock: .long 0
started:   .long 0
ncpus:     .long 0
    .section .rodata
cpu:     .asciz "cpu "
up:      .asciz " up\n"
all:     .asciz "all "
cpus_up: .asciz " cpus up\n"
