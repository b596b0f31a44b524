# Test guest: writes a '.' on ttyS0 over and over, forever (for pausing and resuming).
    .code64
    .text
    .globl _start
_start:
    mov $0x3f8, %dx
1:  mov $'.', %al
    out %al, %dx
    mov $200000, %ecx
2:  dec %ecx
    jnz 2b
    jmp 1b
