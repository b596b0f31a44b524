#!/bin/sh
# Full boot: the Debian cloud kernel (bzImage) and the test initramfs in vmm, 2 vCPUs, with
# /dev/vda an encrypted (the default) storaged volume. The guest's fio writes a pattern and
# runs random I/O; its ACPI power-off must end vmm with 0; the pattern is then read back from
# storaged's side with blkcheck (libblkio).
. "$(dirname "$0")/lib.sh"

start_storaged
storagectl create root --size 1GiB >/dev/null || fail "cannot create the volume"
[ "$(volume root encryption)" = aes-xts-plain64 ] || fail "the volume is not encrypted"
socket="$(volume root socket)"
echo "scenario: booting Linux on an encrypted storaged volume"
follow_guest_console
start_vmm --kernel "$IMAGES/vmlinuz" --initrd "$IMAGES/initramfs.cpio.gz" \
    --cmdline "console=ttyS0 reboot=k panic=1 vmm.test=fio" --vcpus 2 --memory 512MiB \
    --disk "socket=$socket" --serial "$WORK/console"
wait_vmm 300
stop_following
[ "$VMM_CODE" = 0 ] || vmm_ended_early "instead of its power-off (exit 0)"
guest_said "vmm-test: FAIL" && fail "the guest reported a failure"
guest_said "vmm-test: pattern written and verified" || fail "the guest did not write the pattern"
guest_said "vmm-test: fio done" || fail "fio did not complete in the guest"
echo "scenario: the guest powered off, vmm exited 0"
blkcheck --socket "$socket" --offset 0 --len 16777216 --pattern 5eed0fa1 || fail "storaged does not hold what the guest wrote"
echo "scenario: storaged holds the 16 MiB the guest's fio wrote"
