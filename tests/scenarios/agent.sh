#!/bin/sh
# The agent on a host with hardware virtualization: storaged and the agent, whose VMs run
# jailed (on cgroup v2 where the host has no cgroups mounted, as the emulated host). A tenant
# makes a volume and a VM booting the Debian cloud kernel with the test initramfs; the guest's
# fio writes its pattern on the volume, then the guest waits for its power button. The tenant
# stops the VM through the API: the guest powers off on its ACPI power button, and the agent
# records vmm's exit code 0. The pattern is then read back from the volume with blkcheck.
. "$(dirname "$0")/lib.sh"

if [ ! -e /sys/fs/cgroup/cgroup.controllers ] && [ ! -d /sys/fs/cgroup/memory ]; then
    mount -t cgroup2 none /sys/fs/cgroup || fail "cannot mount cgroup2"
fi
start_storaged
start_agent
token="$(agentctl tenant create acme | field token)"
[ -n "$token" ] || fail "no token for the tenant"
export AGENT_TOKEN="$token"
agentctl volume create root --size 1GiB >/dev/null || fail "cannot create the volume"
agentctl vm create --id deb --kernel vmlinuz --initrd initramfs.cpio.gz \
    --cmdline "console=ttyS0 reboot=k panic=1 vmm.test=fio vmm.end=button" \
    --vcpus 2 --memory 512MiB --volume root --restart-policy never >"$WORK/vm.json" 2>&1 ||
    fail "cannot create the VM: $(cat "$WORK/vm.json")"
pid="$(field pid <"$WORK/vm.json")"
uid="$(field uid <"$WORK/vm.json")"
[ -n "$pid" ] && [ -n "$uid" ] || fail "no pid or uid: $(cat "$WORK/vm.json")"
[ "$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")" = "$uid" ] || fail "vmm $pid is not uid $uid"
echo "scenario: the agent started VM deb: vmm $pid as uid $uid, jailed"

# The console through the API, until the guest waits for its button.
i=0
until agentctl vm console deb >"$WORK/console" 2>/dev/null && guest_said "vmm-test: waiting for the power button"; do
    guest_said "vmm-test: FAIL" && fail "the guest reported a failure: $(tail -n 20 "$WORK/console")"
    state="$(agentctl vm show deb | field state)"
    [ "$state" = running ] || fail "the VM is $state before its test ended: $(agentctl vm show deb)"
    [ $i -lt 600 ] || fail "the guest did not get to its power button within 600 s"
    sleep 1
    i=$((i + 1))
done
guest_said "vmm-test: fio done" || fail "fio did not complete in the guest"
for task in /proc/"$pid"/task/*; do
    grep -q '^Seccomp:[[:space:]]*2' "$task/status" || fail "thread $(cat "$task/comm") of vmm $pid has no seccomp filter"
done
echo "scenario: every thread of vmm $pid is under its seccomp filter"
echo "scenario: the guest's fio ran on its volume ($(grep 'fio done' "$WORK/console" | tr -d '\r'))"

agentctl vm action deb stop --timeout 120 >/dev/null || fail "the stop was refused"
i=0
until [ "$(agentctl vm show deb | field state)" = stopped ]; do
    [ $i -lt 180 ] || fail "the VM did not stop within 180 s"
    sleep 1
    i=$((i + 1))
done
agentctl vm show deb >"$WORK/vm.json"
agentctl vm console deb >"$WORK/console" 2>/dev/null
guest_said "vmm-test: power button pressed" || fail "the guest saw no power button: $(tail -n 20 "$WORK/console")"
[ "$(field code <"$WORK/vm.json")" = 0 ] || fail "vmm did not end with 0: $(cat "$WORK/vm.json")"
grep -q '"failure": false' "$WORK/vm.json" || fail "the end is taken for a failure: $(cat "$WORK/vm.json")"
grep -q 'PowerOff' "$WORK/agent/vms/acme_deb/vmm.log" ||
    fail "vmm did not end by the guest's power-off: $(tail -n 5 "$WORK/agent/vms/acme_deb/vmm.log")"
echo "scenario: the stop pressed the power button, the guest powered off; the agent says:" \
    "$(grep '"meaning"' "$WORK/vm.json" | sed 's/^ *//')"

agentctl vm delete deb || fail "cannot delete the VM"
socket="$(volume acme_root socket)"
blkcheck --socket "$socket" --offset 0 --len 16777216 --pattern 5eed0fa1 || fail "the volume does not hold what the guest wrote"
echo "scenario: the volume holds the 16 MiB the guest's fio wrote"
