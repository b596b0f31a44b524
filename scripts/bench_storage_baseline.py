"""Driver of `scripts/bench-storage --baseline REV`: this build's storaged against a baseline
build of another commit, side by side in one run, each serving a plain and an encrypted
volume to the same blkio-based client (blkbench). Prints the paired ratios (this build over
the baseline, median over reps of runs made back to back) and writes the table to
bench-results/storage-baseline.md."""

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

from benchlib import fill, wait_for_socket, write_table
from bench_storage import CASES, ROOT, BIN, blkbench, parse_size


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--baseline-bin", required=True, help="directory of the baseline's storaged and storagectl")
    ap.add_argument("--baseline-rev", required=True, help="the baseline's commit, for the table")
    ap.add_argument("--size", default="1GiB", help="volume size (default 1GiB)")
    ap.add_argument("--runtime", type=float, default=5, help="seconds per run (default 5)")
    ap.add_argument("--reps", type=int, default=3, help="runs per case, median reported (default 3)")
    ap.add_argument("--cases", default=None, help="comma-separated substrings selecting cases")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-results"), help="where the table is written")
    args = ap.parse_args()
    size = parse_size(args.size)
    size -= size % 4096
    work = tempfile.mkdtemp(prefix="bench-baseline.", dir="/var/tmp")
    procs = []

    def cleanup():
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        shutil.rmtree(work, ignore_errors=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        builds = {"new": BIN, "baseline": args.baseline_bin}
        socks = {}
        for build, bindir in builds.items():
            data = os.path.join(work, build)
            st = subprocess.Popen([os.path.join(bindir, "storaged"), "--data-dir", data,
                                   "--metrics-addr", "off", "--log", "warn"])
            procs.append(st)
            wait_for_socket(os.path.join(data, "admin.sock"), st, f"storaged ({build})")
            ctl = [os.path.join(bindir, "storagectl"), "--socket", os.path.join(data, "admin.sock")]
            for kind, extra in (("plain", ["--encryption", "none"]), ("encrypted", [])):
                out = subprocess.run(ctl + ["create", kind, "--size", str(size), "--tier", "mass", *extra],
                                     check=True, capture_output=True, text=True).stdout
                v = json.loads(out)
                print(f"==> filling {build} {kind} ({size >> 20} MiB)", flush=True)
                fill(v["backing"]["path"], size)
                socks[(build, kind)] = v["socket"]

        cases = [c for c in CASES
                 if not args.cases or any(k.strip() in c[0] for k in args.cases.split(","))]
        rows = []
        for name, rw, bs, qd in cases:
            row = {"name": name}
            for kind in ("plain", "encrypted"):
                iops = {"new": [], "baseline": []}
                ratios = []
                for rep in range(args.reps):
                    # Rotate who goes first: a shared host's storage drifts.
                    order = ["new", "baseline"] if rep % 2 == 0 else ["baseline", "new"]
                    for build in order:
                        iops[build].append(blkbench(socks[(build, kind)], rw, bs, qd, args.runtime)["iops"])
                    ratios.append(iops["new"][-1] / iops["baseline"][-1])
                    print(f"    {name} {kind} rep {rep + 1}: new {iops['new'][-1]:.0f} IOPS, "
                          f"baseline {iops['baseline'][-1]:.0f}, ratio {ratios[-1]:.3f}", flush=True)
                row[kind] = (statistics.median(iops["new"]), statistics.median(iops["baseline"]),
                             statistics.median(ratios), min(ratios), max(ratios))
            rows.append(row)

        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        lines = [f"# storaged {head} against baseline {args.baseline_rev}, {datetime.datetime.now():%Y-%m-%d %H:%M}", "",
                 f"Host: {os.cpu_count()} CPUs, kernel {os.uname().release}; volumes {size >> 20} MiB, fully "
                 f"written, tier mass (no limit); {args.runtime:g} s per run, {args.reps} reps, the two builds "
                 "back to back in each rep (who goes first alternates). Paired ratio: median of the per-rep "
                 "new/baseline IOPS ratios (min-max beside it). Client: blkbench (blkio crate), 1 queue.", "",
                 "| case | new IOPS | baseline IOPS | paired ratio (min-max) | encrypted new IOPS "
                 "| encrypted baseline IOPS | paired ratio (min-max) |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            p, e = r["plain"], r["encrypted"]
            lines.append(f"| {r['name']} | {p[0]:.0f} | {p[1]:.0f} | {p[2]:.3f} ({p[3]:.2f}-{p[4]:.2f}) "
                         f"| {e[0]:.0f} | {e[1]:.0f} | {e[2]:.3f} ({e[3]:.2f}-{e[4]:.2f}) |")
        write_table(lines, args.out, "storage-baseline.md")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
