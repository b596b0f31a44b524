#!/bin/sh
# Boot benchmark (scripts/bench-vmm runs it in the emulated host): the Debian kernel (the ELF
# vmlinux), the test initramfs (vmm.test=boot: its init says so and powers off), 2 vCPUs and
# 512 MiB, timed by boottime from the VMM's start to the kernel's first line ("Linux
# version"), to its "Run /init as init process" and to the init's first line, and the VMM's
# memory then. vmm, vmm without a disk, QEMU -M microvm -accel kvm (where $QEMU is set) and
# Firecracker (where $FIRECRACKER is set), one after the other in each of $REPS rounds
# (default 3). vmm and QEMU get the same storaged volume as a disk; Firecracker none, like the
# second vmm. Each result is a line "bench: VMM {json}".
. "$(dirname "$0")/lib.sh"

reps="${REPS:-3}"
cmdline="console=ttyS0 reboot=k panic=1 vmm.test=boot"
start_storaged
storagectl create root --size 1GiB >/dev/null || fail "cannot create the volume"
socket="$(volume root socket)"

measure() { # NAME COMMAND...: one boot, its result line
    name="$1"
    shift
    out="$(boottime --timeout 300 --marker "Linux version" --marker "Run /init as init process" \
        --marker "vmm-test: init started" -- "$@")" || fail "$name did not boot"
    echo "bench: $name $out"
}

i=0
while [ $i -lt "$reps" ]; do
    i=$((i + 1))
    measure vmm vmm --kernel "$IMAGES/vmlinux" --initrd "$IMAGES/initramfs.cpio.gz" \
        --cmdline "$cmdline" --vcpus 2 --memory 512MiB --disk "socket=$socket" \
        --serial stdout --log warn
    measure vmm-nodisk vmm --kernel "$IMAGES/vmlinux" --initrd "$IMAGES/initramfs.cpio.gz" \
        --cmdline "$cmdline" --vcpus 2 --memory 512MiB --serial stdout --log warn
    if [ -n "$QEMU" ]; then
        measure qemu env LD_LIBRARY_PATH="$QEMU/usr/lib/x86_64-linux-gnu" \
            "$QEMU/usr/bin/qemu-system-x86_64" -L "$QEMU/usr/share/qemu" -L "$QEMU/usr/share/seabios" \
            -M microvm,memory-backend=mem -accel kvm -cpu host -smp 2 -m 512M \
            -object memory-backend-memfd,id=mem,size=512M,share=on \
            -chardev "socket,id=disk0,path=$socket" -device vhost-user-blk,chardev=disk0 \
            -nodefaults -no-user-config -nographic -serial stdio \
            -kernel "$IMAGES/vmlinux" -initrd "$IMAGES/initramfs.cpio.gz" -append "$cmdline"
    fi
    if [ -n "$FIRECRACKER" ]; then
        cat >"$WORK/firecracker.json" <<JSON
{
  "boot-source": {
    "kernel_image_path": "$IMAGES/vmlinux",
    "initrd_path": "$IMAGES/initramfs.cpio.gz",
    "boot_args": "$cmdline"
  },
  "drives": [],
  "machine-config": { "vcpu_count": 2, "mem_size_mib": 512 }
}
JSON
        measure firecracker "$FIRECRACKER" --no-api --config-file "$WORK/firecracker.json" --level Warn
    fi
done
