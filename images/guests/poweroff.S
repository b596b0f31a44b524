# Test guest: powers the machine off the ACPI way: SLP_TYP = 5 (S5) and SLP_EN written to the
# hardware-reduced FADT's sleep control register (port 0x3c0).
    .code64
    .text
    .globl _start
_start:
    mov $0x3c0, %dx
    mov $((5 << 2) | (1 << 5)), %al
    out %al, %dx
1:  hlt
    jmp 1b
