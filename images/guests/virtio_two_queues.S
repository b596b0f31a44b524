# Test guest: sets up queues 0 and 1 of the virtio-mmio block device at 0xd0000000 (8 entries
# each, rings zeroed), sets DRIVER_OK and prints what the device status says then:
# "virtio: DEVICE_NEEDS_RESET" if the device could not be activated, else "virtio: active".
# Then resets the device (status 0), prints "virtio: reset" and powers off (ACPI S5).
    .set MMIO, 0xd0000000
    .set RINGS, 0x300000            # queue n: descriptors, avail, used at + n * 16 KiB
    .set NEEDS_RESET, 0x40

    .code64
    .text
    .globl _start
_start:
    mov $MMIO, %rbx
    movl $0, 0x70(%rbx)             # reset
    movl $1, 0x70(%rbx)             # ACKNOWLEDGE
    movl $3, 0x70(%rbx)             # DRIVER
    movl $0, 0x14(%rbx)
    mov 0x10(%rbx), %eax
    and $(1 << 12), %eax            # MQ, if offered
    movl $0, 0x24(%rbx)
    mov %eax, 0x20(%rbx)
    movl $1, 0x24(%rbx)
    movl $1, 0x20(%rbx)             # VERSION_1 (feature bit 32)
    movl $11, 0x70(%rbx)            # FEATURES_OK

    xor %ecx, %ecx                  # queue
1:  mov %ecx, 0x30(%rbx)
    movl $8, 0x38(%rbx)
    mov %ecx, %eax
    shl $14, %eax
    add $RINGS, %eax
    mov %eax, 0x80(%rbx)
    movl $0, 0x84(%rbx)
    add $0x1000, %eax
    mov %eax, 0x90(%rbx)
    movl $0, 0x94(%rbx)
    add $0x1000, %eax
    mov %eax, 0xa0(%rbx)
    movl $0, 0xa4(%rbx)
    movl $1, 0x44(%rbx)             # QueueReady
    inc %ecx
    cmp $2, %ecx
    jb 1b

    movl $15, 0x70(%rbx)            # DRIVER_OK
    mov 0x70(%rbx), %eax
    lea active(%rip), %rsi
    test $NEEDS_RESET, %eax
    jz 2f
    lea needs_reset(%rip), %rsi
2:  call puts
    movl $0, 0x70(%rbx)             # reset
    lea reset(%rip), %rsi
    call puts
    mov $0x3c0, %dx                 # S5
    mov $((5 << 2) | (1 << 5)), %al
    out %al, %dx
3:  hlt
    jmp 3b

.include "common.inc"

    .section .rodata
active:      .asciz "virtio: active\n"
needs_reset: .asciz "virtio: DEVICE_NEEDS_RESET\n"
reset:       .asciz "virtio: reset\n"
