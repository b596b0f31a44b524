# Test guest: says it is up, then idles forever (for stopping the VMM from outside).
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
2:  hlt
    jmp 2b

    .section .rodata
msg: .asciz "spinning\n"
