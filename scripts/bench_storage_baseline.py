"""Driver of `scripts/bench-storage --baseline REV`: this build's storaged against a baseline
build of another commit, side by side in one run, each serving a plain and an encrypted
volume to the same blkio-based client (blkbench). A second daemon of the baseline build is the
control: the baseline against itself (A/A) shows how far two runs of the same code drift apart
on this host, which is the noise a change of structure must stay within. Prints the paired
ratios (median over reps of runs made back to back) and writes the table to
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

from benchlib import fill, stop, wait_for_socket, write_table
from bench_storage import CASES, ROOT, BIN, blkbench, parse_size

# The daemons: this build, the baseline, and the baseline again (the A/A control).
BUILDS = ("new", "baseline", "control")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--baseline-bin", required=True, help="directory of the baseline's storaged and storagectl")
    ap.add_argument("--baseline-rev", required=True, help="the baseline's commit, for the table")
    ap.add_argument("--size", default="1GiB", help="volume size (default 1GiB)")
    ap.add_argument("--runtime", type=float, default=3, help="seconds per run (default 3)")
    ap.add_argument("--reps", type=int, default=9, help="runs per case and daemon, medians reported (default 9)")
    ap.add_argument("--cases", default=None, help="comma-separated substrings selecting cases")
    ap.add_argument("--no-pin", action="store_true",
                    help="do not pin the daemons to the last CPU and the client to the others")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-results"), help="where the table is written")
    args = ap.parse_args()
    size = parse_size(args.size)
    size -= size % 4096
    cpus = os.cpu_count() or 1
    pin = not args.no_pin and cpus >= 2
    # Pinned, the client and the daemon it drives never take each other's CPU, which on a
    # small host is most of the run-to-run drift.
    daemon_prefix = ["taskset", "-c", str(cpus - 1)] if pin else []
    client_prefix = ["taskset", "-c", f"0-{cpus - 2}"] if pin else []
    work = tempfile.mkdtemp(prefix="bench-baseline.", dir="/var/tmp")
    procs = []

    def cleanup():
        stop(procs)
        shutil.rmtree(work, ignore_errors=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        bins = {"new": BIN, "baseline": args.baseline_bin, "control": args.baseline_bin}
        socks = {}
        for build in BUILDS:
            bindir = bins[build]
            data = os.path.join(work, build)
            st = subprocess.Popen([*daemon_prefix, os.path.join(bindir, "storaged"), "--data-dir", data,
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
                iops = {b: [] for b in BUILDS}
                ratios, controls = [], []
                for rep in range(args.reps):
                    # Rotate who goes first: a shared host's storage drifts.
                    order = BUILDS[rep % 3:] + BUILDS[:rep % 3]
                    for build in order:
                        r = blkbench(socks[(build, kind)], rw, bs, qd, args.runtime, client_prefix)
                        iops[build].append(r["iops"])
                    ratios.append(iops["new"][-1] / iops["baseline"][-1])
                    controls.append(iops["control"][-1] / iops["baseline"][-1])
                    print(f"    {name} {kind} rep {rep + 1}: new {iops['new'][-1]:.0f} IOPS, "
                          f"baseline {iops['baseline'][-1]:.0f}, control {iops['control'][-1]:.0f}; "
                          f"new/baseline {ratios[-1]:.3f}, control/baseline {controls[-1]:.3f}", flush=True)
                row[kind] = {
                    "new": statistics.median(iops["new"]),
                    "baseline": statistics.median(iops["baseline"]),
                    "ratio": statistics.median(ratios),
                    "ratios": (min(ratios), max(ratios)),
                    "control": statistics.median(controls),
                    "controls": (min(controls), max(controls)),
                }
            rows.append(row)

        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        placement = (f"daemons pinned to CPU {cpus - 1}, the client to the other CPUs" if pin
                     else "nothing pinned")
        lines = [f"# storaged {head} against baseline {args.baseline_rev}, {datetime.datetime.now():%Y-%m-%d %H:%M}", "",
                 f"Host: {cpus} CPUs, kernel {os.uname().release}; volumes {size >> 20} MiB, fully "
                 f"written, tier mass (no limit); {args.runtime:g} s per run, {args.reps} reps; {placement}. "
                 "Three daemons: this build (new), the baseline, and the baseline again (control), run back "
                 "to back in each rep (who goes first rotates). Paired ratio: median of the per-rep "
                 "new/baseline IOPS ratios, min-max beside it. A/A: the same for control/baseline, two "
                 "daemons of the same code, which is how far apart this host puts identical builds. "
                 "Client: blkbench (blkio crate), 1 queue.", ""]
        for kind in ("plain", "encrypted"):
            lines += [f"### {kind} volumes", "",
                      "| case | new IOPS | baseline IOPS | new/baseline (min-max) | A/A control/baseline (min-max) |",
                      "|---|---|---|---|---|"]
            for r in rows:
                k = r[kind]
                lines.append(f"| {r['name']} | {k['new']:.0f} | {k['baseline']:.0f} "
                             f"| {k['ratio']:.3f} ({k['ratios'][0]:.2f}-{k['ratios'][1]:.2f}) "
                             f"| {k['control']:.3f} ({k['controls'][0]:.2f}-{k['controls'][1]:.2f}) |")
            lines.append("")
        write_table(lines, args.out, "storage-baseline.md")
    finally:
        cleanup()


if __name__ == "__main__":
    main()
