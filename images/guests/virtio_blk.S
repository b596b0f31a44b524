# Test guest: drives the virtio-mmio block device at 0xd0000000 as a driver would: probe
# (magic, version 2, device id 2), negotiate features (VERSION_1, and FLUSH and MQ if
# offered), set up the device's last queue (the one with the highest index that has a
# QueueNumMax) with 8 entries, then write a pattern to sector 8, flush, read it back and
# compare. Polls the used ring (interrupts stay off). Prints "virtio-blk: PASS on queue N"
# or "virtio-blk: FAIL <step>" on ttyS0. Then resets the device (status 0), clears the rings
# and does it all again, as a driver that is unbound and bound again would; after the second
# round it resets the machine.
    .set MMIO, 0xd0000000
    .set DESC, 0x300000
    .set AVAIL, 0x301000
    .set USED, 0x302000
    .set HDR, 0x310000
    .set DATA, 0x311000
    .set STATUS, 0x312000
    .set BACK, 0x313000
    .set SECTOR, 8
    .set COM1, 0x3f8

    .code64
    .text
    .globl _start
_start:
    mov $0x80000, %rsp
    mov $MMIO, %rbx
    lea s_probe(%rip), %r15
    cmpl $0x74726976, 0x0(%rbx)
    jne fail
    cmpl $2, 0x4(%rbx)
    jne fail
    cmpl $2, 0x8(%rbx)
    jne fail

    xor %r14d, %r14d                # round
round:
    lea s_features(%rip), %r15
    movl $0, 0x70(%rbx)             # reset
    movl $1, 0x70(%rbx)             # ACKNOWLEDGE
    movl $3, 0x70(%rbx)             # DRIVER
    movl $1, 0x14(%rbx)
    mov 0x10(%rbx), %eax
    test $1, %eax                   # VERSION_1 (feature bit 32)
    jz fail
    movl $0, 0x14(%rbx)
    mov 0x10(%rbx), %eax
    and $((1 << 9) | (1 << 12)), %eax   # FLUSH and MQ, if offered
    movl $0, 0x24(%rbx)
    mov %eax, 0x20(%rbx)
    movl $1, 0x24(%rbx)
    movl $1, 0x20(%rbx)
    movl $11, 0x70(%rbx)            # FEATURES_OK
    mov 0x70(%rbx), %eax
    test $8, %eax
    jz fail

    lea s_queue(%rip), %r15
    # The last queue: the highest index below 16 with a QueueNumMax.
    mov $15, %r13d
5:  mov %r13d, 0x30(%rbx)
    cmpl $0, 0x34(%rbx)
    jne 6f
    dec %r13d
    jns 5b
    jmp fail
6:  cmpl $8, 0x34(%rbx)
    jb fail
    movl $8, 0x38(%rbx)
    movl $DESC, 0x80(%rbx)
    movl $0, 0x84(%rbx)
    movl $AVAIL, 0x90(%rbx)
    movl $0, 0x94(%rbx)
    movl $USED, 0xa0(%rbx)
    movl $0, 0xa4(%rbx)
    movl $1, 0x44(%rbx)
    movl $15, 0x70(%rbx)            # DRIVER_OK
    xor %r12d, %r12d                # avail index

    # The pattern: byte i = i * 7 + 0x5a.
    mov $DATA, %rdi
    xor %ecx, %ecx
1:  mov %ecx, %eax
    imul $7, %eax
    add $0x5a, %eax
    mov %al, (%rdi,%rcx)
    inc %ecx
    cmp $4096, %ecx
    jb 1b

    lea s_write(%rip), %r15
    mov $1, %eax                    # VIRTIO_BLK_T_OUT
    mov $DATA, %rdi
    xor %esi, %esi
    call request
    lea s_flush(%rip), %r15
    mov $4, %eax                    # VIRTIO_BLK_T_FLUSH
    xor %edi, %edi
    call request
    lea s_read(%rip), %r15
    xor %eax, %eax                  # VIRTIO_BLK_T_IN
    mov $BACK, %rdi
    mov $2, %esi                    # the device writes the data
    call request

    lea s_compare(%rip), %r15
    mov $DATA, %rsi
    mov $BACK, %rdi
    mov $4096, %ecx
    repe cmpsb
    jne fail
    lea pass(%rip), %rsi
    call puts
    mov %r13d, %eax
    add $'0', %al
    cmp $'9', %al
    jbe 7f
    add $7, %al                     # 10..15 as A..F
7:  mov $COM1, %dx
    out %al, %dx
    lea nl(%rip), %rsi
    call puts
    inc %r14d
    cmp $2, %r14d
    jae reset
    # Second round: reset the device, clear the rings, set everything up again.
    movl $0, 0x70(%rbx)
    mov $DESC, %rdi
    xor %eax, %eax
    mov $0x3000, %ecx               # descriptors, avail and used rings
    rep stosb
    jmp round

# One request: type in %eax, data buffer in %rdi (0: none), extra data flags in %esi.
# Fails (via %r15's step name) unless the device answers with status 0.
request:
    mov $HDR, %r8
    mov %eax, (%r8)
    movl $0, 4(%r8)
    movq $SECTOR, 8(%r8)
    mov $DESC, %r9
    movq $HDR, 0(%r9)               # descriptor 0: header
    movl $16, 8(%r9)
    movw $1, 12(%r9)                # NEXT
    movw $1, 14(%r9)
    test %rdi, %rdi
    jnz 1f
    movw $2, 14(%r9)                # no data: header -> status
    jmp 2f
1:  mov %rdi, 16(%r9)               # descriptor 1: data
    movl $4096, 24(%r9)
    mov %si, %ax
    or $1, %ax
    mov %ax, 28(%r9)
    movw $2, 30(%r9)
2:  movq $STATUS, 32(%r9)           # descriptor 2: status
    movl $1, 40(%r9)
    movw $2, 44(%r9)                # WRITE
    movw $0, 46(%r9)
    movb $0xff, STATUS
    mov $AVAIL, %r10
    mov %r12d, %eax
    and $7, %eax
    movw $0, 4(%r10,%rax,2)         # ring[idx % 8] = descriptor 0
    inc %r12d
    mfence
    mov %r12w, 2(%r10)              # avail idx
    mfence
    mov %r13d, 0x50(%rbx)           # QueueNotify: our queue
    mov $200000000, %ecx
3:  pause
    mov USED + 2, %ax
    cmp %r12w, %ax
    je 4f
    dec %ecx
    jnz 3b
    jmp fail
4:  cmpb $0, STATUS
    jne fail
    ret

fail:
    lea failed(%rip), %rsi
    call puts
    mov %r15, %rsi
    call puts
    lea nl(%rip), %rsi
    call puts
reset:
    mov $0xfe, %al
    out %al, $0x64
1:  hlt
    jmp 1b

.include "common.inc"

    .section .rodata
pass:       .asciz "virtio-blk: PASS on queue "
failed:     .asciz "virtio-blk: FAIL "
nl:         .asciz "\n"
s_probe:    .asciz "probe"
s_features: .asciz "features"
s_queue:    .asciz "queue"
s_write:    .asciz "write"
s_flush:    .asciz "flush"
s_read:     .asciz "read"
s_compare:  .asciz "compare"
