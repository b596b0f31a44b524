#!/bin/sh
# init of the emulated host (tests/src/emulated_host.rs): loads the KVM modules, runs the
# scenario named on the kernel command line (emulated_host.scenario=NAME) from /scenarios
# (with QEMU=/opt/qemu and FIRECRACKER=/bin/firecracker where emulated_host.qemu=1 and
# emulated_host.firecracker=1 say the harness put them in, and a variable for each
# emulated_host.var=NAME=VALUE),
# reports its outcome on the serial console and powers off. The harness reads the outcome
# from the line "emulated-host: scenario NAME passed" (or "... failed with N").
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
export PATH=/bin:/usr/bin
set -f # the command line's words are not file names
scenario=""
QEMU=""
FIRECRACKER=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        emulated_host.scenario=*) scenario="${arg#emulated_host.scenario=}" ;;
        emulated_host.qemu=1) QEMU=/opt/qemu ;;
        emulated_host.firecracker=1) FIRECRACKER=/bin/firecracker ;;
        emulated_host.var=*=*) export "${arg#emulated_host.var=}" ;;
    esac
done
export QEMU FIRECRACKER
# The host setting vmm's guest memory wants (see vmm/src/memory.rs): huge pages for shared
# memory where the VMM asks for them.
echo advise >/sys/kernel/mm/transparent_hugepage/shmem_enabled
for m in irqbypass kvm kvm-amd; do
    insmod "/lib/modules/$m.ko" || echo "emulated-host: cannot load $m"
done
if [ ! -c /dev/kvm ]; then
    echo "emulated-host: no /dev/kvm (kvm-amd did not load: does the CPU offer SVM?)"
    dmesg | grep -i -E 'kvm|svm' | tail -n 20
    code=2
else
    echo "emulated-host: up after $(cut -d' ' -f1 /proc/uptime) s with kvm_amd; running $scenario"
    mkdir -p /tmp/work
    WORK=/tmp/work IMAGES=/images sh "/scenarios/$scenario.sh"
    code=$?
fi
if [ "$code" = 0 ]; then
    echo "emulated-host: scenario $scenario passed"
else
    echo "emulated-host: scenario $scenario failed with $code"
    echo "--- the emulated host's kernel log, last lines"
    dmesg | tail -n 40
fi
poweroff -f
