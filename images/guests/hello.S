# Test guest: prints a line on ttyS0 (port 0x3f8), then resets the machine through the i8042
# (0xfe to port 0x64). Entered in 64-bit mode with identity paging, as vmm boots an ELF.
    .code64
    .text
    .globl _start
_start:
    lea msg(%rip), %rsi
    mov $0x3f8, %dx
1:  lodsb
    test %al, %al
    jz 2f
    out %al, %dx
    jmp 1b
2:  mov $0xfe, %al
    out %al, $0x64
3:  hlt
    jmp 3b

    .section .rodata
msg: .asciz "hello from the test guest\n"
