# Test guest: writes 4096 numbered lines of 64 bytes (256 KiB) on ttyS0,
# "line 00000: ...", "line 00001: ...", the number in hex, then powers off (ACPI S5).
    .set LINES, 4096

    .code64
    .text
    .globl _start
_start:
    xor %r12d, %r12d                # line number
1:  lea prefix(%rip), %rsi
    call puts
    mov $16, %ecx                   # five hex digits, the highest first
2:  mov %r12d, %eax
    shr %cl, %eax
    and $0xf, %eax
    lea hex(%rip), %rsi
    mov (%rsi,%rax), %al
    mov $0x3f8, %dx
    out %al, %dx
    sub $4, %ecx
    jns 2b
    lea rest(%rip), %rsi
    call puts
    inc %r12d
    cmp $LINES, %r12d
    jb 1b
    mov $0x3c0, %dx                 # S5
    mov $((5 << 2) | (1 << 5)), %al
    out %al, %dx
3:  hlt
    jmp 3b

.include "common.inc"

    .section .rodata
prefix: .asciz "line "
hex:    .ascii "0123456789abcdef"
rest:   .asciz ": the serial console of a guest that has much to say.\n"
