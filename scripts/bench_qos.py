"""Driver of scripts/bench-qos: see that script for what is measured."""

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
import threading
import time

from benchlib import fill, stop, wait_for_socket, write_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")


def admin(sock, *args):
    out = subprocess.run([os.path.join(BIN, "storagectl"), "--socket", sock, *args],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def blkbench(sock, runtime, ramp=0.0, qd=32, rw="randread"):
    cmd = [os.path.join(BIN, "blkbench"), "--socket", sock, "--rw", rw, "--bs", "4096",
           "--iodepth", str(qd), "--runtime", str(runtime)]
    if ramp:
        cmd += ["--ramp", str(ramp)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--limits", default="500,3000,15000,50000", help="IOPS limits to measure")
    ap.add_argument("--runtime", type=float, default=10, help="measured seconds per run (default 10)")
    ap.add_argument("--ramp", type=float, default=2,
                    help="seconds of load before measuring, to spend the burst (default 2)")
    ap.add_argument("--reps", type=int, default=3, help="runs per row, median reported (default 3)")
    ap.add_argument("--hammer-limit", type=int, default=3000,
                    help="IOPS limit of the noisy neighbour (default 3000)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-results"), help="where the table goes")
    args = ap.parse_args()
    limits = [int(x) for x in args.limits.split(",") if x.strip()]
    size = 1 << 30

    work = tempfile.mkdtemp(prefix="bench-qos.", dir="/var/tmp")
    data = os.path.join(work, "storaged")
    sock = os.path.join(data, "admin.sock")
    st = subprocess.Popen([os.path.join(BIN, "storaged"), "--data-dir", data,
                           "--metrics-addr", "off", "--log", "warn"])

    def cleanup(*_):
        stop([st])
        shutil.rmtree(work, ignore_errors=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        wait_for_socket(sock, st, "storaged")
        vols = {}
        for name in ("limited", "neighbour", "hammer"):
            v = admin(sock, "create", name, "--size", str(size), "--tier", "mass")
            vols[name] = v
            fill(v["backing"]["path"], size)
        admin(sock, "set-limits", "hammer", "--iops", str(args.hammer_limit))
        sockets = {n: v["socket"] for n, v in vols.items()}
        lines = []

        def med(runs, key):
            return statistics.median(r[key] for r in runs)

        print("==> unlimited: what this machine reaches", flush=True)
        free = [blkbench(sockets["limited"], args.runtime) for _ in range(args.reps)]
        ceiling = med(free, "iops")
        print(f"    {ceiling:.0f} IOPS", flush=True)

        rows = []
        for limit in limits:
            admin(sock, "set-limits", "limited", "--iops", str(limit))
            runs = []
            for rep in range(args.reps):
                runs.append(blkbench(sockets["limited"], args.runtime, ramp=args.ramp))
                print(f"    limit {limit} rep {rep + 1}: {runs[-1]['iops']:.0f} IOPS", flush=True)
            rows.append((limit, med(runs, "iops"), med(runs, "lat_p50_us"), med(runs, "lat_p99_us")))

        print("==> noisy neighbour", flush=True)
        alone = []
        beside = []
        hammer = []
        ratios = []

        def run_beside():
            result = {}

            def hammer_run():
                # Starts first and ends last, so the whole measured run has it beside it.
                result["h"] = blkbench(sockets["hammer"], args.runtime + 2 * args.ramp)

            t = threading.Thread(target=hammer_run)
            t.start()
            time.sleep(args.ramp)
            beside.append(blkbench(sockets["neighbour"], args.runtime))
            t.join()
            hammer.append(result["h"])

        for rep in range(args.reps):
            # Alternate which goes first: the host's storage drifts between runs.
            if rep % 2:
                run_beside()
                alone.append(blkbench(sockets["neighbour"], args.runtime))
            else:
                alone.append(blkbench(sockets["neighbour"], args.runtime))
                run_beside()
            ratios.append(beside[-1]["iops"] / alone[-1]["iops"])
            print(f"    rep {rep + 1}: alone {alone[-1]['iops']:.0f}, beside {beside[-1]['iops']:.0f} "
                  f"({ratios[-1]:.2f}), hammer {hammer[-1]['iops']:.0f} IOPS", flush=True)

        lines.append(f"# storaged IOPS limits, {datetime.datetime.now():%Y-%m-%d %H:%M}")
        lines.append("")
        lines.append(
            f"Host: {os.cpu_count()} CPUs, kernel {os.uname().release}. Client: blkbench (blkio crate), "
            f"4k random reads, QD32, one queue, on fully written 1 GiB volumes. Each limited run spends "
            f"its burst in {args.ramp:g} s of unmeasured load, then measures {args.runtime:g} s; median of "
            f"{args.reps} runs. This machine reaches {ceiling:.0f} IOPS on an unlimited volume.")
        lines.append("")
        if rows:
            lines.append("| limit (IOPS) | achieved IOPS | achieved / limit | p50 µs | p99 µs |")
            lines.append("|---|---|---|---|---|")
        for limit, iops, p50, p99 in rows:
            note = "" if limit < ceiling else " (above what this machine reaches unlimited)"
            lines.append(f"| {limit} | {iops:.0f} | {iops / limit:.3f}{note} | {p50:.0f} | {p99:.0f} |")
        lines.append("")
        lines.append("| noisy neighbour | IOPS |")
        lines.append("|---|---|")
        a, b = med(alone, "iops"), med(beside, "iops")
        lines.append(f"| unlimited volume alone | {a:.0f} |")
        lines.append(f"| same, beside a volume hammering at QD32 against a {args.hammer_limit} IOPS limit "
                     f"| {b:.0f} (median of per-rep ratios: {statistics.median(ratios):.2f} of alone) |")
        lines.append(f"| the hammering volume meanwhile | {med(hammer, 'iops'):.0f} "
                     f"(limit {args.hammer_limit}, its burst included) |")
        write_table(lines, args.out, "qos.md" if rows else "qos-neighbour.md")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
