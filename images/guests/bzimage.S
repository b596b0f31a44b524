# Test guest in bzImage form (tests/build.rs puts a setup header before it): the protected-
# mode part, loaded at 1 MiB; the 64-bit boot protocol enters at +0x200 with RSI pointing to
# the zero page. Prints "bzImage: " and the command line the zero page points to, resets.
    .code64
    .text
    .globl _start
_start:
    hlt                             # the 32-bit entry (offset 0) is not used
    .org 0x200
startup_64:
    mov 0x228(%rsi), %ebx           # boot_params.hdr.cmd_line_ptr
    lea msg(%rip), %rsi
    call puts
    mov %rbx, %rsi
    call puts
    lea nl(%rip), %rsi
    call puts
    mov $0xfe, %al
    out %al, $0x64
1:  hlt
    jmp 1b

.include "common.inc"

msg: .asciz "bzImage: "
nl:  .asciz "\n"
