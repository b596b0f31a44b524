# Shared by the full-boot scenarios (sourced, POSIX sh: busybox runs them in the emulated
# host, /bin/sh on a host with hardware KVM). The caller sets WORK (an empty scratch dir),
# IMAGES (images/out) and PATH (storaged, storagectl, vmm and blkcheck first).
# A scenario prints "scenario: ..." lines and exits 0 when every check held.

set -u

# What the scenario started is stopped when it ends, however it ends.
STORAGED_PID=""
AGENT_PID=""
VMM_PID=""
VMM_CODE=""
FOLLOW_PID=""
stop_all() {
    for pid in $VMM_PID $AGENT_PID $STORAGED_PID $FOLLOW_PID; do kill -9 "$pid" 2>/dev/null; done
}
trap stop_all EXIT

# fail MESSAGE: says what failed, shows the daemons' logs, exits 1.
fail() {
    # On a line of its own, whatever the guest's console left unfinished.
    echo
    echo "scenario: FAIL $*"
    for log in "$WORK"/*.log; do
        [ -f "$log" ] || continue
        echo "--- last lines of ${log##*/}"
        tail -n 30 "$log"
    done
    exit 1
}

# start_storaged: storaged on $WORK/storaged (metrics off), ready once its admin API answers;
# exports STORAGED_ADMIN_SOCKET for storagectl.
start_storaged() {
    storaged --data-dir "$WORK/storaged" --metrics-addr off >"$WORK/storaged.log" 2>&1 &
    STORAGED_PID=$!
    export STORAGED_ADMIN_SOCKET="$WORK/storaged/admin.sock"
    wait_ready "$STORAGED_PID" storaged storagectl info
}

# wait_ready PID NAME COMMAND...: waits (30 s at most) until COMMAND succeeds, failing if the
# daemon PID (NAME) exits first.
wait_ready() {
    ready_pid=$1
    ready_name=$2
    shift 2
    i=0
    until "$@" >/dev/null 2>&1; do
        kill -0 "$ready_pid" 2>/dev/null || fail "$ready_name exited at start"
        [ $i -lt 300 ] || fail "$ready_name not ready within 30 s"
        sleep 0.1
        i=$((i + 1))
    done
}

# start_agent: the agent on $WORK/agent (its API on its socket only) with storaged's admin
# socket and $IMAGES as its image catalog, ready once its API answers; exports AGENT_SOCKET
# and AGENT_TOKEN_FILE (the admin's) for agentctl.
start_agent() {
    agent --data-dir "$WORK/agent" --listen off --storaged-socket "$STORAGED_ADMIN_SOCKET" \
        --images-dir "$IMAGES" >"$WORK/agent.log" 2>&1 &
    AGENT_PID=$!
    export AGENT_SOCKET="$WORK/agent/agent.sock" AGENT_TOKEN_FILE="$WORK/agent/admin.token"
    wait_ready "$AGENT_PID" "the agent" agentctl whoami
}

# field KEY: the value of the first "KEY": ... in the JSON on stdin (a string or a number).
field() {
    sed -n "s/^ *\"$1\": \"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}\$/\1/p" | head -n 1
}

# volume NAME KEY: a field of a volume as storagectl shows it.
volume() {
    storagectl get "$1" | field "$2"
}

# follow_guest_console: from now on the guest's serial output ($WORK/console, vmm's --serial)
# is copied to the scenario's output as it comes, each line marked "guest| ". Through a FIFO,
# so that stopping tail (FOLLOW_PID) ends the whole copy.
follow_guest_console() {
    : >"$WORK/console"
    rm -f "$WORK/console.fifo"
    mkfifo "$WORK/console.fifo"
    tr -d '\r' <"$WORK/console.fifo" | sed 's/^/guest| /' &
    tail -n +1 -f "$WORK/console" >"$WORK/console.fifo" &
    FOLLOW_PID=$!
}

# stop_following: after vmm ended, lets the copy catch up (busybox's tail looks once a
# second), then stops it.
stop_following() {
    sleep 1.2
    kill "$FOLLOW_PID" 2>/dev/null
    FOLLOW_PID=""
}

# guest_said REGEX: whether a line of the guest's console matches (grep, CRs dropped).
guest_said() {
    tr -d '\r' <"$WORK/console" 2>/dev/null | grep -q "$1"
}

# vmm_gone: whether the vmm started by start_vmm has exited (its exit code is then in
# VMM_CODE).
vmm_gone() {
    [ -n "$VMM_PID" ] || return 0
    [ -s "$WORK/vmm.code" ] || return 1
    VMM_CODE=$(cat "$WORK/vmm.code")
    VMM_PID=""
    return 0
}

# vmm_ended_early WHAT: fails saying that vmm ended (and how) before WHAT. A guest kernel
# that never reached its init says so apart ("before its init ran"): in an emulated host
# that is a fault of the emulation the harness may run the scenario again for.
vmm_ended_early() {
    how="vmm exited with $VMM_CODE"
    [ "$VMM_CODE" = 3 ] && how="the guest crashed (vmm exited with 3)"
    guest_said "vmm-test: init started" || fail "$how before its init ran, $1"
    fail "$how $1"
}

# start_vmm ARGS...: vmm in the background (stderr to $WORK/vmm.log), its pid in VMM_PID. A
# subshell waits for it and writes its exit code to $WORK/vmm.code (a shell's own check of a
# child, kill -0, cannot tell an exited child that is not reaped yet).
start_vmm() {
    rm -f "$WORK/vmm.pid" "$WORK/vmm.code"
    VMM_CODE=""
    (
        vmm "$@" 2>"$WORK/vmm.log" &
        echo $! >"$WORK/vmm.pid"
        wait $!
        echo $? >"$WORK/vmm.code"
    ) &
    until [ -s "$WORK/vmm.pid" ]; do sleep 0.1; done
    VMM_PID=$(cat "$WORK/vmm.pid")
}

# start_watch: a wait on the guest begins; check_stall counts its silence from here.
start_watch() {
    WATCH_SIZE=-1
    WATCH_GREW=0
}
# check_stall SILENCE: called about once a second while waiting on the guest. A guest whose
# console has not grown for SILENCE seconds is stalled: vmm is killed and the scenario fails,
# saying whether the guest's kernel had reached its init.
check_stall() {
    size=$(wc -c <"$WORK/console")
    now=$(date +%s)
    if [ "$size" != "$WATCH_SIZE" ]; then
        WATCH_SIZE=$size
        WATCH_GREW=$now
        return 0
    fi
    [ $((now - WATCH_GREW)) -ge "$1" ] || return 0
    kill -9 "$VMM_PID" 2>/dev/null
    VMM_PID=""
    stop_following
    guest_said "vmm-test: init started" ||
        fail "the guest stalled before its init ran: its console was silent for $1 s"
    fail "the guest stalled: its console was silent for $1 s"
}

# wait_vmm SILENCE: waits for vmm's end, its exit code then in VMM_CODE; a guest silent for
# SILENCE seconds fails the scenario (check_stall).
wait_vmm() {
    start_watch
    until vmm_gone; do
        check_stall "$1"
        sleep 1
    done
}

# wait_console TEXT SILENCE: waits until the guest's console has a line containing TEXT;
# fails at once if vmm ends first, and as wait_vmm does if the guest is silent for SILENCE
# seconds.
wait_console() {
    start_watch
    i=0
    until guest_said "$1"; do
        if vmm_gone; then
            stop_following
            vmm_ended_early "without '$1' on the guest's console"
        fi
        [ $((i % 10)) -ne 0 ] || check_stall "$2"
        sleep 0.1
        i=$((i + 1))
    done
}
