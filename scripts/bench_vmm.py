"""Driver of scripts/bench-vmm: see that script for what is measured."""

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
import time

from benchlib import write_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_kib(pid):
    """VmRSS and RssShmem (guest memory: a memfd, or QEMU's shared RAM) of a process."""
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssShmem", "RssAnon", "RssFile"):
                vals[k] = int(v.split()[0])
    return vals


def run_ours(vmm, guest, reps):
    starts, firsts, overheads = [], [], []
    for _ in range(reps):
        p = subprocess.run([vmm, "--kernel", guest, "--memory", "128MiB"], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        setup = int(re.search(r"setup_us=(\d+)", p.stderr).group(1))
        first = int(re.search(r"first_serial_byte_us=(\d+)", p.stderr).group(1))
        starts.append(setup / 1000)
        firsts.append(first / 1000)
    spin = guest.replace("hello.elf", "spin.elf")
    for _ in range(reps):
        with tempfile.TemporaryDirectory() as d:
            console = os.path.join(d, "console")
            p = subprocess.Popen([vmm, "--kernel", spin, "--memory", "128MiB", "--serial", console],
                                 stderr=subprocess.DEVNULL)
            while not (os.path.exists(console) and os.path.getsize(console) > 0):
                time.sleep(0.005)
            time.sleep(0.2)
            r = rss_kib(p.pid)
            p.terminate()
            p.wait()
            # Guest memory is the memfd's resident pages (RssShmem); the rest is the VMM.
            overheads.append((r["VmRSS"] - r.get("RssShmem", 0)) / 1024)
    return statistics.median(starts), statistics.median(firsts), statistics.median(overheads)


CMDLINE = "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1"


def first_byte_and_rss(cmd, env=None):
    """Starts a VMM booting the kernel, times the kernel's first console line ("Linux
    version": firmware may print before it), then after two seconds reads its RSS beyond the
    guest memory's resident pages; kills it."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    for line in p.stdout:
        if b"Linux version" in line:
            break
    first = (time.monotonic() - t0) * 1000
    time.sleep(2)
    r = rss_kib(p.pid)
    p.kill()
    p.wait()
    return first, (r["VmRSS"] - r.get("RssShmem", 0)) / 1024


def qemu():
    """QEMU extracted by scripts/bench-vmm (QEMU_DIR): its binary and the environment that
    finds its libraries; None if there is none."""
    qemu_dir = os.environ.get("QEMU_DIR", "")
    binary = os.path.join(qemu_dir, "usr/bin/qemu-system-x86_64")
    if not qemu_dir or not os.path.exists(binary):
        return None
    return binary, dict(os.environ, LD_LIBRARY_PATH=os.path.join(qemu_dir, "usr/lib/x86_64-linux-gnu"))


def run_emulated_host(reps, firecracker):
    """tests/scenarios/bench-boot.sh in the emulated host (target/release/emulated-host):
    vmm, QEMU microvm and, when given, Firecracker boot the same kernel and initramfs in turn,
    reps rounds. Returns {vmm name: [result, ...]} from its "bench: NAME {json}" lines."""
    cmd = [os.path.join(ROOT, "target", "release", "emulated-host"), "--timeout", str(600 + 300 * reps),
           "--var", f"REPS={reps}"]
    if qemu():
        cmd.append("--qemu")
    if firecracker:
        cmd += ["--firecracker", firecracker]
    print(f"==> boot benchmark in the emulated host ({reps} rounds; a few minutes)", flush=True)
    p = subprocess.run(cmd + ["bench-boot"], capture_output=True, text=True)
    results = {}
    for line in p.stdout.splitlines() + p.stderr.splitlines():
        m = re.match(r"bench: (\S+) (\{.*\})\s*$", line)
        if m:
            results.setdefault(m.group(1), []).append(json.loads(m.group(2)))
    if p.returncode != 0 or "vmm" not in results:
        tail = "\n".join((p.stdout + p.stderr).splitlines()[-40:])
        print(f"the boot benchmark in the emulated host failed:\n{tail}")
        return None, None
    emulated = "in an emulated host" in p.stderr
    return results, emulated


def emulated_host_rows(results, emulated, reps, firecracker):
    """The table of the boot benchmark: medians, and each VMM's time to init over vmm's."""
    med = statistics.median
    if results is None:
        return ["", "The boot benchmark in the emulated host failed (its output is above): no rows."]

    def times(runs, i):
        return [r["markers"][i]["ms"] / 1000 for r in runs]

    # Markers: 0 the kernel's first line, 1 "Run /init", 2 the init's first line.
    base = med(times(results["vmm"], 1))
    where = ("Inside the emulated host (QEMU 10 TCG, EPYC with SVM and nested paging, 2 vCPUs, kvm_amd; "
             if emulated else "On this host's hardware KVM (")
    lines = ["", where + "`tests/scenarios/bench-boot.sh`): the Debian kernel (ELF vmlinux), the test "
             "initramfs (its init prints a line and powers off), 2 vCPUs, 512 MiB; vmm and QEMU with the "
             "same storaged volume as a disk (vhost-user-blk), Firecracker without one (and vmm once more "
             "without one). "
             f"Median of {reps} rounds, the VMMs in turn in each. Times are wall-clock in the emulated host "
             "(absolute values mean little under emulation; the ratio is the figure). Overhead = RSS "
             "minus the guest memory's resident pages (RssShmem), for the VMMs whose guest memory is "
             "shared memory.", "",
             "| VMM | disk | start to the kernel's first line (s) | start to \"Run /init\" (s) "
             "| guest's printk time there (s) | start to init's first line (s) "
             "| memory overhead (MiB) | time to init / vmm's | the guest's power-off (init's next step) |",
             "|---|---|---|---|---|---|---|---|---|"]
    names = {"vmm": ("vmm", "storaged volume"), "vmm-nodisk": ("vmm", "none"),
             "qemu": ("QEMU 10 -M microvm -accel kvm", "storaged volume"), "firecracker": ("Firecracker", "none")}
    for key in ["vmm", "vmm-nodisk", "qemu", "firecracker"]:
        runs = results.get(key)
        if not runs:
            continue
        first = med(times(runs, 0))
        t = med(times(runs, 1))
        printk = [r["markers"][1]["guest_s"] for r in runs if r["markers"][1]["guest_s"] is not None]
        guest = f"{med(printk):.2f}" if printk else "n/a"
        init = med(times(runs, 2))
        if key == "firecracker":
            overhead = "n/a (guest memory is anonymous)"
        else:
            overhead = f"{med((r['rss_kib'] - r['shmem_kib']) / 1024 for r in runs):.1f}"
        exits = sorted({r.get("exit") for r in runs}, key=str)
        ended = ", ".join("never ended the VMM (killed after 10 s)" if e is None else f"ended the VMM with {e}"
                          for e in exits)
        name, disk = names[key]
        lines.append(f"| {name} | {disk} | {first:.2f} | {t:.2f} | {guest} | {init:.2f} | {overhead} "
                     f"| {t / base:.2f} | {ended} |")
    if not firecracker:
        lines += ["", "No Firecracker row: pass `--firecracker PATH` (a binary built from its public source)."]
    return lines


def run_kernel(vmm, kernel, reps):
    """vmm and QEMU microvm on the same kernel and command line, runs interleaved."""
    q = qemu()
    ours, theirs = [], []
    for _ in range(reps):
        ours.append(first_byte_and_rss(
            [vmm, "--kernel", kernel, "--memory", "128MiB", "--cmdline", CMDLINE, "--log", "warn"]))
        if q:
            binary, env = q
            # Guest RAM in a shared memfd, like vmm's, so it is RssShmem on both sides.
            # (-cpu host without arch-capabilities: nested KVM refuses that MSR.)
            theirs.append(first_byte_and_rss(
                [binary, "-L", os.path.join(os.environ["QEMU_DIR"], "usr/share/qemu"),
                 "-L", os.path.join(os.environ["QEMU_DIR"], "usr/share/seabios"), "-M", "microvm,memory-backend=mem",
                 "-object", "memory-backend-memfd,id=mem,size=128M,share=on", "-m", "128M",
                 "-enable-kvm", "-cpu", "host,-arch-capabilities", "-smp", "1", "-nodefaults",
                 "-no-user-config", "-nographic", "-serial", "stdio", "-kernel", kernel,
                 "-append", CMDLINE], env=env))
    med = lambda runs, i: statistics.median(r[i] for r in runs)
    result = {"vmm": (med(ours, 0), med(ours, 1))}
    if theirs:
        result["qemu"] = (med(theirs, 0), med(theirs, 1))
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--host-reps", type=int, default=3,
                    help="rounds of the boot benchmark in the emulated host (0: skip it)")
    ap.add_argument("--firecracker", help="a Firecracker binary to boot beside vmm in the emulated host")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-results"))
    a = ap.parse_args()
    vmm = os.path.join(ROOT, "target", "release", "vmm")
    guests = subprocess.run(["bash", "-c", f"ls -d {ROOT}/target/release/build/storaged-tests-*/out/guests | head -1"],
                            capture_output=True, text=True).stdout.strip()
    hello = os.path.join(guests, "hello.elf")
    start, first, overhead = run_ours(vmm, hello, a.reps)
    lines = ["# vmm start-up and memory overhead", "",
             f"Host: {os.cpu_count()} CPUs, kernel {os.uname().release}; median of {a.reps}. Guest: "
             "images/guests/hello (prints a line, resets) for times, spin (prints, idles) for memory; "
             "128 MiB. Overhead = process RSS minus the guest memory's resident pages (RssShmem).", "",
             "| VMM | start to first guest instruction (ms) | start to first serial byte (ms) | memory overhead (MiB) |",
             "|---|---|---|---|",
             f"| vmm | {start:.2f} | {first:.2f} | {overhead:.2f} |"]
    kernel = os.path.join(ROOT, "images", "out", "vmlinux")
    k = run_kernel(vmm, kernel, a.reps)
    lines += ["", "Same kernel (Debian's cloud kernel, decompressed) and command line "
              f"(`{CMDLINE}`), 128 MiB, 1 vCPU; median of {a.reps}, runs interleaved. Overhead two "
              "seconds into the boot; guest RAM is a shared memfd on both sides (RssShmem).", "",
              "| VMM | start to the kernel's first console line (ms) | memory overhead (MiB) |",
              "|---|---|---|",
              f"| vmm | {k['vmm'][0]:.1f} | {k['vmm'][1]:.2f} |"]
    if "qemu" in k:
        binary, env = qemu()
        version = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                 env=env).stdout.splitlines()[0]
        lines.append(f"| {version}, -M microvm | {k['qemu'][0]:.1f} | {k['qemu'][1]:.2f} |")
    else:
        lines.append("")
        lines.append("qemu-system-x86_64 could not be fetched: no QEMU row.")
    if a.host_reps > 0:
        results, emulated = run_emulated_host(a.host_reps, a.firecracker)
        lines += emulated_host_rows(results, emulated, a.host_reps, a.firecracker)
    write_table(lines, a.out, "vmm.md")


if __name__ == "__main__":
    main()
