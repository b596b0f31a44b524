"""Driver of scripts/bench-storage: see that script for what is measured."""

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile

from benchlib import fill, stop, wait_for_socket, write_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
CLK_TCK = os.sysconf("SC_CLK_TCK")

CASES = [
    # name, rw, block size, queue depth
    ("4k randread QD1", "randread", 4096, 1),
    ("4k randread QD32", "randread", 4096, 32),
    ("4k randwrite QD32", "randwrite", 4096, 32),
    ("128k seq read QD8", "read", 131072, 8),
    ("128k seq write QD8", "write", 131072, 8),
]


def parse_size(s):
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = s.strip().lower().removesuffix("ib").removesuffix("b")
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s)


def cpu_seconds(pid):
    """utime + stime of a process and its threads, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def blkbench(sock, rw, bs, qd, runtime, prefix=()):
    """One blkbench run against `sock`; `prefix` goes before the command (e.g. taskset)."""
    out = subprocess.run(
        [*prefix, os.path.join(BIN, "blkbench"), "--socket", sock, "--rw", rw, "--bs", str(bs),
         "--iodepth", str(qd), "--runtime", str(runtime)],
        check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def fio_ceiling(path, rw, bs, qd, runtime, size):
    out = subprocess.run(
        ["fio", "--name=ceiling", f"--filename={path}", f"--rw={rw}", f"--bs={bs}",
         "--direct=1", "--ioengine=io_uring", f"--iodepth={qd}", f"--size={size}",
         f"--runtime={runtime}", "--time_based", "--output-format=json"],
        check=True, capture_output=True, text=True)
    job = json.loads(out.stdout)["jobs"][0]
    part = job["write" if "write" in rw else "read"]
    pct = part["clat_ns"].get("percentile", {})
    return {"iops": part["iops"], "mbps": part["bw_bytes"] / 1e6,
            "lat_p50_us": pct.get("50.000000", 0) / 1000, "lat_p99_us": pct.get("99.000000", 0) / 1000}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="2GiB", help="volume size (default 2GiB)")
    ap.add_argument("--runtime", type=float, default=5, help="seconds per run (default 5)")
    ap.add_argument("--reps", type=int, default=3, help="runs per case, median reported (default 3)")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a new one in /var/tmp)")
    ap.add_argument("--storaged-config", default=None, help="TOML config for storaged (e.g. [io] poll_us)")
    ap.add_argument("--cases", default=None,
                    help="comma-separated substrings selecting cases (e.g. '128k'); default: all")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-results"), help="where the table is written")
    args = ap.parse_args()
    size = parse_size(args.size)
    size -= size % 4096

    work = args.dir or tempfile.mkdtemp(prefix="bench-storage.", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    procs = []

    def cleanup(*_):
        stop(procs)
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        # storaged, one volume.
        data = os.path.join(work, "storaged")
        st_cmd = [os.path.join(BIN, "storaged"), "--data-dir", data, "--metrics-addr", "off", "--log", "warn"]
        if args.storaged_config:
            st_cmd += ["--config", os.path.abspath(args.storaged_config)]
        st = subprocess.Popen(st_cmd)
        procs.append(st)
        wait_for_socket(os.path.join(data, "admin.sock"), st, "storaged")
        ctl = [os.path.join(BIN, "storagectl"), "--socket", os.path.join(data, "admin.sock")]

        def create(name, *extra):
            out = subprocess.run(ctl + ["create", name, "--size", str(size), "--tier", "mass", *extra],
                                 check=True, capture_output=True, text=True).stdout
            v = json.loads(out)
            return v["socket"], v["backing"]["path"]

        # A plain volume, and an encrypted one (XTS-AES-256) beside it.
        st_sock, st_file = create("bench", "--encryption", "none")
        enc_sock, enc_file = create("benchenc")

        # qemu-storage-daemon on a file of the same kind and size.
        qsd_file = os.path.join(work, "qsd.img")
        with open(qsd_file, "wb") as f:
            f.truncate(size)
        qsd_sock = os.path.join(work, "qsd.sock")
        qsd = subprocess.Popen([
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=file0,filename={qsd_file},aio=io_uring,cache.direct=on",
            "--blockdev", "driver=raw,node-name=disk0,file=file0",
            "--export", f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={qsd_sock},writable=on,num-queues=1",
        ])
        procs.append(qsd)
        wait_for_socket(qsd_sock, qsd, "qemu-storage-daemon")

        print(f"==> filling backing files ({size >> 20} MiB each)", flush=True)
        fill(st_file, size)
        fill(enc_file, size)
        fill(qsd_file, size)

        xts = json.loads(subprocess.run([os.path.join(BIN, "xtsbench"), "3"], check=True,
                                        capture_output=True, text=True).stdout)
        ossl = subprocess.run(["openssl", "speed", "-evp", "aes-256-xts", "-bytes", "4096", "-seconds", "3"],
                              capture_output=True, text=True).stdout
        ossl_gbps = None
        for line in ossl.splitlines():
            if line.upper().startswith("AES-256-XTS"):
                ossl_gbps = float(line.split()[-1].rstrip("k")) * 1000 / 1e9

        qsd_version = subprocess.run(["qemu-storage-daemon", "--version"], capture_output=True,
                                     text=True).stdout.splitlines()[0]
        cases = [c for c in CASES
                 if not args.cases or any(k.strip() in c[0] for k in args.cases.split(","))]
        if not cases:
            sys.exit(f"--cases {args.cases!r} selects none of: {', '.join(c[0] for c in CASES)}")
        results = {}
        for name, rw, bs, qd in cases:
            runs = {"storaged": [], "encrypted": [], "qsd": [], "ceiling": []}
            ratios = []
            enc_ratios = []
            for rep in range(args.reps):
                # Rotate who goes first: the backing storage of a shared host drifts.
                order = [("storaged", st, st_sock), ("encrypted", st, enc_sock), ("qsd", qsd, qsd_sock)]
                order = order[rep % 3:] + order[:rep % 3]
                for target, proc, sock in order:
                    c0 = cpu_seconds(proc.pid)
                    r = blkbench(sock, rw, bs, qd, args.runtime)
                    r["cpu_per_100k"] = (cpu_seconds(proc.pid) - c0) / r["ios"] * 1e5
                    runs[target].append(r)
                runs["ceiling"].append(fio_ceiling(st_file, rw, bs, qd, args.runtime, size))
                ratios.append(runs["storaged"][-1]["iops"] / runs["qsd"][-1]["iops"])
                enc_ratios.append(runs["encrypted"][-1]["iops"] / runs["storaged"][-1]["iops"])
                print(f"    {name} rep {rep + 1}: storaged {runs['storaged'][-1]['iops']:.0f} IOPS "
                      f"(encrypted {runs['encrypted'][-1]['iops']:.0f}), "
                      f"qsd {runs['qsd'][-1]['iops']:.0f}, fio {runs['ceiling'][-1]['iops']:.0f}", flush=True)
            results[name] = {
                t: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for t, rs in runs.items()
            }
            # The paired ratio: median over reps of storaged/qsd measured back to back.
            results[name]["paired"] = statistics.median(ratios)
            results[name]["enc_paired"] = statistics.median(enc_ratios)

        lines = []
        lines.append(f"# storaged vs qemu-storage-daemon, {datetime.datetime.now():%Y-%m-%d %H:%M}")
        lines.append("")
        lines.append(f"Host: {os.cpu_count()} CPUs, kernel {os.uname().release}; volume {size >> 20} MiB, "
                     f"fully written; {args.runtime:g} s per run, median of {args.reps}, runs interleaved "
                     "(who goes first rotates). Paired ratio: median of the per-rep storaged/qsd ratios. "
                     f"storaged config: {args.storaged_config or 'defaults'}, volume tier mass (no IOPS limit). "
                     f"Client: blkbench (blkio crate), 1 queue. Peer: {qsd_version}, aio=io_uring, "
                     "cache.direct=on. Ceiling: fio io_uring O_DIRECT on storaged's backing file itself. "
                     "storaged rows are a plain volume (encryption none); the encrypted table is an "
                     "XTS-AES-256 volume on the same daemon.")
        lines.append("")
        hdr = ("| case | storaged IOPS | storaged MB/s | p50/p99 µs | qsd IOPS | qsd MB/s | qsd p50/p99 µs "
               "| fio ceiling IOPS | storaged/qsd | paired ratio | storaged/ceiling | CPU s/100k I/O storaged | CPU s/100k I/O qsd |")
        lines.append(hdr)
        lines.append("|" + "|".join(["---"] * (hdr.count("|") - 1)) + "|")
        for name, *_ in cases:
            s, q, c = results[name]["storaged"], results[name]["qsd"], results[name]["ceiling"]
            lines.append(
                f"| {name} | {s['iops']:.0f} | {s['mbps']:.1f} | {s['lat_p50_us']:.0f}/{s['lat_p99_us']:.0f} "
                f"| {q['iops']:.0f} | {q['mbps']:.1f} | {q['lat_p50_us']:.0f}/{q['lat_p99_us']:.0f} "
                f"| {c['iops']:.0f} | {s['iops'] / q['iops']:.2f} | {results[name]['paired']:.2f} "
                f"| {s['iops'] / c['iops']:.2f} "
                f"| {s['cpu_per_100k']:.2f} | {q['cpu_per_100k']:.2f} |")
        lines.append("")
        lines.append("## Encrypted volumes (XTS-AES-256) next to plain ones")
        lines.append("")
        hdr = ("| case | plain IOPS | encrypted IOPS | encrypted MB/s | encrypted p50/p99 µs | encrypted/plain "
               "| paired ratio | CPU s/100k I/O plain | CPU s/100k I/O encrypted |")
        lines.append(hdr)
        lines.append("|" + "|".join(["---"] * (hdr.count("|") - 1)) + "|")
        for name, *_ in cases:
            p, e = results[name]["storaged"], results[name]["encrypted"]
            lines.append(
                f"| {name} | {p['iops']:.0f} | {e['iops']:.0f} | {e['mbps']:.1f} "
                f"| {e['lat_p50_us']:.0f}/{e['lat_p99_us']:.0f} | {e['iops'] / p['iops']:.2f} "
                f"| {results[name]['enc_paired']:.2f} | {p['cpu_per_100k']:.2f} | {e['cpu_per_100k']:.2f} |")
        lines.append("")
        lines.append("XTS-AES-256, one core, 4 KiB units: storaged's engine (xtsbench) "
                     f"{xts['encrypt_gbps']:.2f} GB/s encrypt, {xts['decrypt_gbps']:.2f} GB/s decrypt; "
                     + (f"`openssl speed -evp aes-256-xts -bytes 4096` {ossl_gbps:.2f} GB/s: "
                        f"{xts['encrypt_gbps'] / ossl_gbps:.2f} of OpenSSL."
                        if ossl_gbps else "openssl speed gave no result."))
        write_table(lines, args.out, "storage.md" if len(cases) == len(CASES) else "storage-partial.md")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
