# Test guest: says it is up, then idles forever (for stopping the VMM from outside).
    .code64
    .text
    .globl _start
_start:
    lea msg(%rip), %rsi             # vmm starts the boot vCPU with a stack
    call puts
1:  hlt
    jmp 1b

.include "common.inc"

    .section .rodata
msg: .asciz "spinning\n"
