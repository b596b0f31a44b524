#!/bin/sh
# Two disks: "data" (1 GiB, 2 queues) and "ro" (256 MiB, attached read-only). The guest
# (the Debian kernel and the test initramfs, vmm.test=disks) reports what Linux sees of each
# disk; then "data" is grown through storaged's API while the guest runs, and the guest must
# see the new size.
. "$(dirname "$0")/lib.sh"

start_storaged
storagectl create data --size 1GiB --queues 2 >/dev/null || fail "cannot create data"
storagectl create ro --size 256MiB >/dev/null || fail "cannot create ro"
data_id="$(volume data id)"
ro_id="$(volume ro id)"
echo "scenario: booting Linux with two disks"
follow_guest_console
start_vmm --kernel "$IMAGES/vmlinuz" --initrd "$IMAGES/initramfs.cpio.gz" \
    --cmdline "console=ttyS0 reboot=k panic=1 vmm.test=disks" --vcpus 2 --memory 512MiB \
    --disk "socket=$(volume data socket)" --disk "socket=$(volume ro socket),readonly" \
    --serial "$WORK/console"
wait_console "vmm-test: waiting for vda to grow" 300
storagectl resize data 2GiB >/dev/null || fail "cannot grow data"
echo "scenario: grew data to 2 GiB while the guest runs"
wait_vmm 300
stop_following
[ "$VMM_CODE" = 0 ] || vmm_ended_early "instead of its power-off (exit 0)"
guest_said "vmm-test: FAIL" && fail "the guest reported a failure"
# The virtio serial (GET_ID) is the volume id, truncated to the 20 bytes virtio-blk has.
data_serial="$(echo "$data_id" | cut -c1-20)"
ro_serial="$(echo "$ro_id" | cut -c1-20)"
guest_said "vmm-test: disk vda serial=$data_serial size=1073741824 ro=0 queues=2\$" ||
    fail "vda is not data as offered (1 GiB, writable, 2 queues)"
guest_said "vmm-test: disk vdb serial=$ro_serial size=268435456 ro=1 queues=1\$" ||
    fail "vdb is not ro as offered (256 MiB, read-only, 1 queue)"
guest_said "vmm-test: vda grew to 2147483648\$" || fail "the guest did not see data grow to 2 GiB"
echo "scenario: Linux sees both disks as offered, and the online grow"
