# Test guest: reads the virtio-blk capacity (config offset 0, in 512-byte sectors) of the
# disk at 0xd0000000, prints it, waits for a configuration-change interrupt status
# (InterruptStatus bit 1, polled), acknowledges it and prints the capacity again. Resets.
    .set MMIO, 0xd0000000
    .set COM1, 0x3f8

    .code64
    .text
    .globl _start
_start:
    mov $0x80000, %rsp
    mov $MMIO, %rbx
    call report
    mov $4000000000, %r12
1:  pause
    testl $2, 0x60(%rbx)
    jnz 2f
    dec %r12
    jnz 1b
    lea timeout(%rip), %rsi
    call puts
    jmp 3f
2:  movl $2, 0x64(%rbx)             # InterruptACK: configuration change
    call report
3:  mov $0xfe, %al
    out %al, $0x64
4:  hlt
    jmp 4b

report:
    lea capacity(%rip), %rsi
    call puts
    mov 0x100(%rbx), %eax           # capacity, low and high halves
    mov 0x104(%rbx), %edx
    shl $32, %rdx
    or %rdx, %rax
    call putdec
    lea nl(%rip), %rsi
    call puts
    ret

.include "common.inc"

# Writes %rax in decimal.
putdec:
    xor %ecx, %ecx
    mov $10, %r8
1:  xor %edx, %edx
    div %r8
    push %rdx
    inc %ecx
    test %rax, %rax
    jnz 1b
    mov $COM1, %dx
2:  pop %rax
    add $'0', %al
    out %al, %dx
    loop 2b
    ret

    .section .rodata
capacity: .asciz "capacity "
nl:       .asciz "\n"
timeout:  .asciz "no configuration change\n"
