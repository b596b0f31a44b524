#!/bin/sh
# init of the test initramfs: load the virtio modules, then exercise /dev/vda as the kernel
# command line says (vmm.test=fio, the default, or vmm.test=mount), and power off.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in virtio virtio_ring virtio_mmio virtio_blk; do
    [ -f /lib/modules/$m.ko ] && insmod /lib/modules/$m.ko 2>/dev/null
done
test=fio
for arg in $(cat /proc/cmdline); do
    case "$arg" in vmm.test=*) test="${arg#vmm.test=}" ;; esac
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -b /dev/vda ]; then
    echo "vmm-test: FAIL no /dev/vda"
elif [ "$test" = mount ]; then
    if mount /dev/vda /mnt; then echo "vmm-test: mounted /dev/vda"; umount /mnt; else echo "vmm-test: FAIL mount"; fi
else
    fio --name=guest --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randrw --bs=4k \
        --iodepth=16 --runtime=5 --time_based --output-format=terse --terse-version=3 > /tmp/fio.out 2>&1 \
        && echo "vmm-test: fio done $(cut -d';' -f8,49 /tmp/fio.out)" || { echo "vmm-test: FAIL fio"; cat /tmp/fio.out; }
fi
sync
poweroff -f
