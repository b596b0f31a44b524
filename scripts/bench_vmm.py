"""Driver of scripts/bench-vmm: see that script for what is measured."""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time

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
        t0 = time.monotonic()
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


def run_qemu(kernel, reps):
    """qemu-system-x86_64 -M microvm on the same kernel: time to its first serial byte and its
    RSS beyond guest RAM, if QEMU is installed."""
    qemu = shutil.which("qemu-system-x86_64")
    if not qemu:
        return None
    firsts, overheads = [], []
    for _ in range(reps):
        t0 = time.monotonic()
        p = subprocess.Popen([qemu, "-M", "microvm", "-enable-kvm", "-cpu", "host", "-m", "128M",
                              "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
                              "-kernel", kernel, "-append", "console=ttyS0 earlyprintk=ttyS0"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        p.stdout.read(1)
        firsts.append((time.monotonic() - t0) * 1000)
        time.sleep(0.2)
        r = rss_kib(p.pid)
        overheads.append((r["VmRSS"] - r.get("RssShmem", 0)) / 1024)
        p.kill()
        p.wait()
    return statistics.median(firsts), statistics.median(overheads)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=10)
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
    q = run_qemu(os.path.join(ROOT, "images", "out", "vmlinux"), a.reps)
    if q:
        lines.append(f"| qemu-system-x86_64 -M microvm | n/a | {q[0]:.2f} (kernel) | {q[1]:.2f} |")
    else:
        lines.append("")
        lines.append("qemu-system-x86_64 is not installed here (Debian's qemu-system-x86 would replace the "
                     "qemu-storage-daemon 10 that scripts/bench-storage compares against by 7.2): no QEMU row.")
    table = "\n".join(lines)
    print(table)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "vmm.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
