# Test guest: loads an empty IDT and raises an exception, which can only end in a triple fault.
    .code64
    .text
    .globl _start
_start:
    lidt idtr(%rip)
    int3
1:  jmp 1b

    .section .rodata
idtr: .word 0
      .quad 0
