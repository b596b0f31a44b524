"""Driver of scripts/bench-agent: see that script for what is measured."""

import argparse
import glob
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import stop, wait_for_socket, write_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("agent")
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(self.path)


def call(sock, token, method, path, body=None):
    c = UnixHTTP(sock)
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, (json.loads(data) if data and r.getheader("content-type", "").startswith("application/json") else data)


def rss_kib(pid):
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssShmem"):
                vals[k] = int(v.split()[0])
    return vals


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def measure(args, work, images, jail):
    """One agent's launches: latencies, the burst, memory."""
    procs = []
    try:
        adir = os.path.join(work, "agent-jailed" if jail else "agent-unjailed")
        os.makedirs(adir)
        config = os.path.join(adir, "agent.toml")
        with open(config, "w") as f:
            f.write(f"jail = {'true' if jail else 'false'}\n")
        ag = subprocess.Popen([os.path.join(BIN, "agent"), "--data-dir", adir, "--config", config, "--listen", "off",
                               "--storaged-socket", os.path.join(work, "storaged", "admin.sock"),
                               "--images-dir", images, "--log", "warn"])
        procs.append(ag)
        sock = os.path.join(adir, "agent.sock")
        wait_for_socket(sock, ag, "agent")
        admin = open(os.path.join(adir, "admin.token")).read().strip()
        st, t = call(sock, admin, "POST", "/v1/tenants", {"name": "bench"})
        assert st == 201, t
        token = t["token"]
        agent_rss0 = rss_kib(ag.pid)["VmRSS"]

        def console(vm_id):
            return os.path.join(adir, "vms", f"bench_{vm_id}", "jail", "run", "console.log")

        def printed(vm_id):
            p = console(vm_id)
            return os.path.exists(p) and os.path.getsize(p) > 0

        spec = {"memory": "32MiB", "kernel": "spin.elf", "restart_policy": "never"}
        kind = "jailed" if jail else "unjailed"
        print(f"==> {kind}: {args.reps} launches, one at a time", flush=True)
        latencies, api_ms = [], []
        for i in range(args.reps):
            vm_id = f"one-{i}"
            t0 = time.perf_counter()
            st, v = call(sock, token, "POST", "/v1/vms", dict(spec, id=vm_id))
            t1 = time.perf_counter()
            assert st == 201, v
            while not printed(vm_id):
                time.sleep(0.0005)
            latencies.append((time.perf_counter() - t0) * 1000)
            api_ms.append((t1 - t0) * 1000)
            st, _ = call(sock, token, "DELETE", f"/v1/vms/{vm_id}")
            assert st == 204
        print(f"==> {kind}: {args.burst} VMs asked for at once", flush=True)
        import threading
        errors = []

        def create(i):
            st, v = call(sock, token, "POST", "/v1/vms", dict(spec, id=f"burst-{i}"))
            if st != 201:
                errors.append(v)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=create, args=(i,)) for i in range(args.burst)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        while not all(printed(f"burst-{i}") for i in range(args.burst)):
            time.sleep(0.001)
            if time.perf_counter() - t0 > 120:
                sys.exit("the burst did not all print within 120 s")
        burst_s = time.perf_counter() - t0
        assert not errors, errors[:3]
        time.sleep(0.5)
        st, vms = call(sock, token, "GET", "/v1/vms")
        vmm_mib = []
        for v in vms:
            r = rss_kib(v["pid"])
            vmm_mib.append((r["VmRSS"] - r.get("RssShmem", 0)) / 1024)
        agent_rss1 = rss_kib(ag.pid)["VmRSS"]
        for v in vms:
            call(sock, token, "DELETE", f"/v1/vms/{v['id']}")
        return {"latencies": latencies, "api_ms": api_ms, "burst_s": burst_s,
                "agent_rss": (agent_rss0, agent_rss1), "vmm_mib": vmm_mib}
    finally:
        stop(procs)


def main():
    ap = argparse.ArgumentParser(description="The agent's VM launch latency, launch rate and memory")
    ap.add_argument("--reps", type=int, default=30, help="launches timed one at a time (default 30)")
    ap.add_argument("--burst", type=int, default=50, help="VMs asked for at once (default 50)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench-results"))
    ap.add_argument("--dir", default="/var/tmp", help="parent of the data dirs (default /var/tmp: a disk, not tmpfs)")
    args = ap.parse_args()

    guest = glob.glob(os.path.join(ROOT, "target/release/build/storaged-tests-*/out/guests/spin.elf"))
    if not guest:
        sys.exit("no spin.elf: cargo build --release -p storaged-tests")
    work = tempfile.mkdtemp(prefix="bench-agent.", dir=args.dir)
    images = os.path.join(work, "images")
    os.makedirs(images)
    shutil.copy(guest[0], images)
    procs = []
    try:
        sd = subprocess.Popen([os.path.join(BIN, "storaged"), "--data-dir", os.path.join(work, "storaged"),
                               "--metrics-addr", "off", "--log", "warn"])
        procs.append(sd)
        wait_for_socket(os.path.join(work, "storaged", "admin.sock"), sd, "storaged")
        # The same runs with each VM jailed (the default) and with jail = false, one agent after
        # the other: what the jail costs, side by side.
        results = {}
        for jail in (True, False):
            results[jail] = measure(args, work, images, jail)
        j, u = results[True], results[False]
        cores = os.cpu_count()
        fs = subprocess.run(["df", "--output=fstype", work], capture_output=True, text=True).stdout.split()[-1]

        def both(key, fmt):
            return f"{fmt(j[key])} | {fmt(u[key])}"

        lat = lambda r: f"{statistics.median(r):.1f} / {pct(r, 99):.1f} ms"
        lines = [
            "# agent: VM launches",
            "",
            f"Host: {cores} CPUs, kernel {os.uname().release}. Release build; storaged and the agent on this host, "
            f"their data dirs in {work} ({fs}: the agent's database commits cost what an fsync costs there); "
            f"the guest: images/guests/spin.S (prints a line, idles), 32 MiB, 1 vCPU, no disk; restart policy never. "
            f"Latency: POST /v1/vms on the agent's Unix socket to the first byte in the VM's console file "
            f"(polled every 0.5 ms), {args.reps} launches one at a time, each VM deleted after. Burst: "
            f"{args.burst} creates at once (one thread each), until every console has a byte. Memory: RSS, "
            "a vmm's less its guest memory's resident pages (RssShmem). Jailed: the default (a uid, namespaces, "
            "a pivoted root, cgroups, seccomp); unjailed: `jail = false`, the same agent and vmm otherwise, "
            "run after the jailed one.",
            "",
            "| measure | jailed | unjailed | Firecracker (published) |",
            "|---|---|---|---|",
            f"| launch to first serial byte p50 / p99 | {both('latencies', lat)} | API ready within 8 CPU ms (of the VMM; no agent) |",
            f"| POST /v1/vms answered p50 / p99 | {both('api_ms', lat)} | |",
            f"| launch rate, {args.burst} at once | "
            + both("burst_s", lambda s: f"{args.burst / s:.1f} VMs/s ({args.burst / s / cores:.1f} per core), all printed after {s:.2f} s")
            + " | 5 microVMs per host core per second |",
            f"| agent RSS, idle / with {args.burst} VMs | "
            + both("agent_rss", lambda r: f"{r[0] / 1024:.1f} / {r[1] / 1024:.1f} MiB") + " | |",
            "| each vmm beyond its guest memory, median (min-max) | "
            + both("vmm_mib", lambda m: f"{statistics.median(m):.2f} MiB ({min(m):.2f}-{max(m):.2f})") + " | < 5 MiB |",
        ]
        write_table(lines, args.out, "agent.md")
    finally:
        stop(procs[::-1])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
