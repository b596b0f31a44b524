#!/bin/sh
# init of the test initramfs: load the virtio modules (in dependency order: a module whose
# dependency is not loaded yet fails with "Unknown symbol"), exercise the disks as the kernel
# command line says, print the result on the console and power off. Every result line starts
# with "vmm-test: "; a failure says "vmm-test: FAIL ...".
#   vmm.test=fio    (the default) fio writes 16 MiB of the pattern 5e ed 0f a1 at the start of
#                   /dev/vda and reads it back (verify=pattern), then 5 s of 4k random
#                   read/write beyond it
#   vmm.test=mount  mounts /dev/vda
#   vmm.test=disks  reports every virtio disk (serial, size in bytes, read-only flag, queues),
#                   then waits up to 120 s for /dev/vda to grow and reports its new size
#   vmm.test=boot   only says "vmm-test: init started" (as every mode does first) and powers
#                   off a second later (the VMM's memory is read in between): the end of the
#                   boot benchmark
# With vmm.end=button the guest does not power off by itself after its test: it says
# "vmm-test: waiting for the power button" and powers off when the ACPI power button is
# pressed (the button driver's KEY_POWER on its evdev device), saying "vmm-test: power button
# pressed" first.
echo "vmm-test: init started"
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
test=fio
end=poweroff
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    vmm.test=*) test="${arg#vmm.test=}" ;;
    vmm.end=*) end="${arg#vmm.end=}" ;;
    esac
done
[ "$test" = boot ] && { sleep 1; poweroff -f; }
for m in virtio_ring virtio virtio_mmio virtio_blk button evdev; do
    insmod /lib/modules/$m.ko || echo "vmm-test: FAIL insmod $m"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done

# One line per virtio disk: "vmm-test: disk vda serial=... size=BYTES ro=0|1 queues=N".
report_disks() {
    for d in /sys/block/vd*; do
        [ -d "$d" ] || continue
        echo "vmm-test: disk ${d##*/} serial=$(cat "$d/serial") size=$(($(cat "$d/size") * 512))" \
            "ro=$(cat "$d/ro") queues=$(ls "$d/mq" | wc -l)"
    done
}

if [ ! -b /dev/vda ]; then
    echo "vmm-test: FAIL no /dev/vda"
elif [ "$test" = mount ]; then
    if mount /dev/vda /mnt; then echo "vmm-test: mounted /dev/vda"; umount /mnt; else echo "vmm-test: FAIL mount"; fi
elif [ "$test" = disks ]; then
    report_disks
    before=$(cat /sys/block/vda/size)
    echo "vmm-test: waiting for vda to grow"
    i=0
    while [ "$(cat /sys/block/vda/size)" = "$before" ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i + 1)); done
    if [ "$(cat /sys/block/vda/size)" = "$before" ]; then
        echo "vmm-test: FAIL vda did not grow"
    else
        echo "vmm-test: vda grew to $(($(cat /sys/block/vda/size) * 512))"
    fi
else
    common="--filename=/dev/vda --direct=1 --ioengine=libaio --output-format=terse --terse-version=3"
    if fio --name=pattern $common --rw=write --bs=1M --offset=0 --size=16M --verify=pattern \
        --verify_pattern=0x5eed0fa1 --do_verify=1 > /tmp/pattern.out 2>&1; then
        echo "vmm-test: pattern written and verified (16 MiB at 0)"
        if fio --name=guest $common --rw=randrw --bs=4k --iodepth=16 --offset=16M --runtime=5 \
            --time_based > /tmp/fio.out 2>&1; then
            # Terse fields 8 and 49: read and write IOPS.
            echo "vmm-test: fio done $(cut -d';' -f8,49 /tmp/fio.out)"
        else
            echo "vmm-test: FAIL fio"
            cat /tmp/fio.out
        fi
    else
        echo "vmm-test: FAIL fio pattern"
        cat /tmp/pattern.out
    fi
fi
sync
if [ "$end" = button ]; then
    # The power button's input device (its name is the button driver's).
    event=""
    i=0
    while [ -z "$event" ] && [ $i -lt 100 ]; do
        for d in /sys/class/input/input*; do
            [ "$(cat "$d/name" 2>/dev/null)" = "Power Button" ] || continue
            for e in "$d"/event*; do [ -e "$e" ] && event="/dev/input/${e##*/}"; done
        done
        [ -n "$event" ] || { sleep 0.1; i=$((i + 1)); }
    done
    if [ -z "$event" ] || [ ! -c "$event" ]; then
        echo "vmm-test: FAIL no power button device"
    else
        echo "vmm-test: waiting for the power button"
        # One input event (24 bytes): the button sends nothing but its key.
        dd if="$event" of=/dev/null bs=24 count=1 2>/dev/null
        echo "vmm-test: power button pressed"
    fi
fi
poweroff -f
