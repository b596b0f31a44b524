# Test guest: prints a line on ttyS0 (port 0x3f8), then resets the machine through the i8042
# (0xfe to port 0x64). Entered in 64-bit mode with identity paging, as vmm boots an ELF.
    .code64
    .text
    .globl _start
_start:
    lea msg(%rip), %rsi             # vmm starts the boot vCPU with a stack
    call puts
    mov $0xfe, %al
    out %al, $0x64
1:  hlt
    jmp 1b

.include "common.inc"

    .section .rodata
msg: .asciz "hello from the test guest\n"
