# Test guest: probes the first four virtio-mmio windows (0xd0000000 + 4 KiB each) and prints,
# for each device found (magic "virt", version 2), "disk N: id I, ro R" with R the
# VIRTIO_BLK_F_RO feature bit. Resets.
    .set MMIO, 0xd0000000
    .set COM1, 0x3f8

    .code64
    .text
    .globl _start
_start:
    mov $0x80000, %rsp
    xor %r12d, %r12d                # window index
1:  mov %r12, %rbx
    shl $12, %rbx
    mov $MMIO, %rax
    add %rax, %rbx
    cmpl $0x74726976, 0x0(%rbx)
    jne 2f
    cmpl $2, 0x4(%rbx)
    jne 2f
    lea disk(%rip), %rsi
    call puts
    mov %r12d, %eax
    call putdigit
    lea id(%rip), %rsi
    call puts
    mov 0x8(%rbx), %eax
    call putdigit
    lea ro(%rip), %rsi
    call puts
    movl $0, 0x14(%rbx)             # features 0..31
    mov 0x10(%rbx), %eax
    shr $5, %eax
    and $1, %eax
    call putdigit
    lea nl(%rip), %rsi
    call puts
2:  inc %r12d
    cmp $4, %r12d
    jb 1b
    mov $0xfe, %al
    out %al, $0x64
3:  hlt
    jmp 3b

putdigit:
    add $'0', %al
    mov $COM1, %dx
    out %al, %dx
    ret

.include "common.inc"

    .section .rodata
disk: .asciz "disk "
id:   .asciz ": id "
ro:   .asciz ", ro "
nl:   .asciz "\n"
