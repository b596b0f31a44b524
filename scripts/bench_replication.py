"""Driver of scripts/bench-replication: see that script for what is measured."""

import argparse
import datetime
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

from benchlib import fill, stop, wait_for_socket, write_table
from bench_storage import BIN, CLK_TCK, ROOT, cpu_seconds, parse_size

# The two zones: network namespaces NAME-a and NAME-b (--netns) joined by a veth pair, these
# addresses on its ends.
ADDR = ("10.201.0.1", "10.201.0.2")
PORT = 7420
TOOLS = os.path.join(ROOT, "target", "tools")

CASES = [
    # name, rw, block size, queue depth
    ("4k randwrite QD32", "randwrite", 4096, 32),
    ("128k seq write QD8", "write", 131072, 8),
]
MIB = 1 << 20
# Before each long-lived child's command: the kernel kills it when this driver ends, however
# it ends (a SIGKILL leaves no finally to run), so no daemon or client outlives a run.
DIE_WITH_DRIVER = ["setpriv", "--pdeathsig", "KILL"]
# x86_64 numbers of the system calls a queue worker waits in, for /proc/TID/syscall.
SYSCALLS = {"running": "running", "17": "pread64", "18": "pwrite64", "74": "fsync", "75": "fdatasync",
            "202": "futex", "232": "epoll_wait", "281": "epoll_pwait", "426": "io_uring_enter"}


def progress(msg):
    print(msg, file=sys.stderr, flush=True)


def run(*cmd, check=True):
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def percentile(xs, p):
    """The p-th percentile (nearest rank) of xs, None if empty."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))]


def fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=60):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class Admin:
    """storaged's admin API (HTTP over its Unix socket), one kept-alive connection."""

    def __init__(self, sock):
        self.sock = sock
        self.conn = None

    def request(self, method, path, body=None):
        """(status, parsed JSON or text) of one request; reconnects once on a dropped connection."""
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = UnixHTTPConnection(self.sock)
            try:
                self.conn.request(method, path, body=data, headers=headers)
                resp = self.conn.getresponse()
                text = resp.read().decode()
                break
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text

    def ok(self, method, path, body=None):
        status, out = self.request(method, path, body)
        if status // 100 != 2:
            sys.exit(f"{method} {path}: {status} {out}")
        return out

    def replication(self, name):
        return self.ok("GET", f"/v1/volumes/{name}/replication")

    def metric(self, family, volume):
        """The value of `family{volume="..."}` in /metrics (0 when absent)."""
        _, text = self.request("GET", "/metrics")
        m = re.search(rf'^{family}{{volume="{re.escape(volume)}"}} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0


class Sampler(threading.Thread):
    """Every `interval` s: GET replication of one volume (time, state, lag_seconds), and the
    CPU time of each thread of a process. A vhost-user queue's worker thread ends with its
    frontend's connection, taking its counters with it: the last reading of each thread
    stays here."""

    def __init__(self, sock, name, pid, interval=0.1):
        super().__init__(daemon=True)
        self.admin = Admin(sock)
        self.name = name
        self.pid = pid
        self.interval = interval
        self.samples = []
        self.threads = {}  # tid -> (name, CPU seconds), last reading
        self.waits = []  # (time, syscall) of each queue worker at each sample
        self.sched = {}  # tid -> [(time, ns on a CPU, ns runnable and waiting)] of each queue worker
        self.lock = threading.Lock()
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            t = time.monotonic()
            status, r = self.admin.request("GET", f"/v1/volumes/{self.name}/replication")
            if status // 100 == 2:
                self.samples.append((t, r["state"], r["lag_seconds"]))
            else:
                self.samples.append((t, "unreplicated", None))
            self.read_threads()
            self.read_waits()
            self.done.wait(max(0.0, self.interval - (time.monotonic() - t)))

    def read_threads(self):
        now = thread_cpu(self.pid)
        with self.lock:
            self.threads.update(now)
            return dict(self.threads)

    def read_waits(self):
        """What each queue worker (vring_worker) is doing: the system call it is in, by
        /proc/TID/syscall, or "running"."""
        t = time.monotonic()
        for tid, (name, _) in list(self.threads.items()):
            if name != "vring_worker":
                continue
            try:
                with open(f"/proc/{self.pid}/task/{tid}/syscall") as f:
                    nr = f.read().split()[0]
            except (OSError, IndexError):
                continue
            self.waits.append((t, SYSCALLS.get(nr, nr if not nr.isdigit() else f"syscall {nr}")))
            try:
                with open(f"/proc/{self.pid}/task/{tid}/schedstat") as f:
                    on, waiting = (int(x) for x in f.read().split()[:2])
            except (OSError, ValueError):
                continue
            self.sched.setdefault(tid, []).append((t, on, waiting))

    def between(self, t0, t1):
        return [s for s in self.samples if t0 <= s[0] <= t1]

    def waits_between(self, t0, t1):
        """Share of the queue workers' samples in each system call between t0 and t1."""
        w = [x[1] for x in self.waits if t0 <= x[0] <= t1]
        return {k: w.count(k) / len(w) for k in set(w)}

    def sched_between(self, t0, t1):
        """The queue workers' time on a CPU and time runnable but waiting for one (the
        scheduler's own counts, /proc/TID/schedstat), each in cores, between t0 and t1."""
        on = waiting = 0
        for rows in self.sched.values():
            inside = [r for r in rows if t0 <= r[0] <= t1]
            if len(inside) >= 2:
                on += inside[-1][1] - inside[0][1]
                waiting += inside[-1][2] - inside[0][2]
        return on / 1e9 / (t1 - t0), waiting / 1e9 / (t1 - t0)

    def stop(self):
        self.done.set()
        self.join()


def thread_delta(before, after, seconds):
    """CPU cores by thread kind (names without their trailing numbers) between two readings."""
    out = {}
    for tid, (name, cpu) in after.items():
        kind = re.sub(r"[-_]?\d+$", "", name)
        out[kind] = out.get(kind, 0.0) + (cpu - before.get(tid, (name, 0.0))[1]) / seconds
    return out


class Window:
    """The CPU of a stretch of the run, in cores: zone 0's and zone 1's daemons, the delay
    lines, the client (blkbench and this driver), the kernel (its threads, interrupts and
    softirqs: writeback, the network stack), and the rest, which is what else ran on the host
    (/proc/stat's task time less all of ours: on a shared host, someone else's load)."""

    KINDS = ("zone 0", "zone 1", "delay", "client", "kernel", "other")

    def __init__(self, daemons, zones, sampler):
        self.daemons, self.zones, self.sampler = daemons, zones, sampler
        self.t0 = time.monotonic()
        self.c0 = self.procs()
        self.h0 = host_cpu()
        self.th0 = sampler.read_threads()
        self.th1 = thread_cpu(daemons[1].pid)  # the secondary's threads outlive a run

    def procs(self):
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        me = resource.getrusage(resource.RUSAGE_SELF)
        return ([cpu_seconds(p.pid) for p in self.daemons] + [self.zones.cpu()]
                + [kids.ru_utime + kids.ru_stime + me.ru_utime + me.ru_stime, kernel_threads_cpu()])

    def end(self):
        """{"cpu": cores of each of KINDS, "host": busy share of all CPUs, "threads" and
        "threads1": zone 0's and zone 1's cores by thread kind, "waits": zone 0's queue
        workers' system calls, "t0", "t1"}."""
        t1 = time.monotonic()
        wall = t1 - self.t0
        c1 = self.procs()
        h1 = host_cpu()
        ours = [(b - a) / wall for a, b in zip(self.c0, c1)]
        d = {k: (h1[k] - self.h0[k]) / CLK_TCK / wall for k in h1 if k != "cpus"}
        per_cpu = [(b1 - b0) / max(1, t1_ - t0_) for (t0_, b0), (t1_, b1) in zip(self.h0["cpus"], h1["cpus"])]
        ours[-1] += d["irq"]
        other = max(0.0, d["task"] - sum(ours[:-1]) - (ours[-1] - d["irq"]))
        return {"t0": self.t0, "t1": t1, "cpu": ours + [other], "host": d["busy"] / d["total"], "per_cpu": per_cpu,
                "threads": thread_delta(self.th0, self.sampler.read_threads(), wall),
                "threads1": thread_delta(self.th1, thread_cpu(self.daemons[1].pid), wall),
                "waits": self.sampler.waits_between(self.t0, t1), "sched": self.sampler.sched_between(self.t0, t1)}


class Zones:
    """Two network namespaces joined by a veth pair with a one-way delay on each end and,
    when asked, a rate limit: netem where the kernel has it, otherwise an NFQUEUE rule per
    namespace and scripts/delayline.c holding the packets (the rate then from tbf)."""

    def __init__(self, name, one_way_us, method, idle_b=False, split=None, control_apart=False):
        self.netns = (f"{name}-a", f"{name}-b")
        # What runs in zone 1 (its delay line here, its storaged in main): under SCHED_IDLE
        # when asked, so that it takes only the CPU zone 0 leaves, as a host of its own would.
        # With `split` (the CPU lists of zone 0 and of zone 1), each zone's storaged on its own
        # CPUs, and both delay lines (the wire) on zone 1's; each end's received packets are
        # processed (RPS) on its zone's CPUs.
        # With `control_apart`, zone 0's storaged may use both zones' CPUs: its config keeps its
        # data plane on zone 0's and moves its control plane to zone 1's, where zone 0's
        # received packets are processed too; the wire stays on zone 1's CPUs at normal
        # priority, and zone 1 under SCHED_IDLE (`idle_b`) takes only what zone 0's sender, the
        # wire and the kernel leave of them.
        self.split = split
        self.control_apart = control_apart
        self.prefix = ([], ["chrt", "--idle", "0"] if idle_b else [])
        wire = self.prefix[1]
        if split:
            self.prefix = tuple(["taskset", "-c", cpus] + p for cpus, p in zip(split, self.prefix))
            wire = self.prefix[1]
            if control_apart:
                wire = ["taskset", "-c", split[1]]
                self.prefix = (["taskset", "-c", ",".join(split)], wire + (["chrt", "--idle", "0"] if idle_b else []))
        self.veth = ("veth-a", "veth-b")  # each in its own namespace
        self.one_way_us = one_way_us
        self.delaylines = []
        self.rate = None
        for ns in self.netns:
            if os.path.exists(f"/run/netns/{ns}"):
                sys.exit(f"network namespace {ns} exists: another run's? (--netns NAME picks others)")
        for ns in self.netns:
            run("ip", "netns", "add", ns)
        run("ip", "-n", self.netns[0], "link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1],
            "netns", self.netns[1])
        for ns, dev, addr in zip(self.netns, self.veth, ADDR):
            run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "link", "set", dev, "up")
            # Socket buffers for a long fat link (25 Gbit/s × 5 ms): the host's 4 MiB
            # tcp_wmem cap would hold one connection to 4 MiB per round trip. Per namespace.
            run("ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.tcp_wmem=4096 16384 16777216",
                "net.ipv4.tcp_rmem=4096 131072 33554432")
        if split:
            rps = (split[1], split[1]) if control_apart else split
            for ns, dev, cpus in zip(self.netns, self.veth, rps):
                mask = sum(1 << int(c) for c in cpus.split(","))
                run("ip", "netns", "exec", ns, "sh", "-c", f"echo {mask:x} > /sys/class/net/{dev}/queues/rx-0/rps_cpus")
        if method in ("auto", "netem"):
            r = run("tc", "-n", self.netns[0], "qdisc", "add", "dev", self.veth[0], "root", "netem", "delay",
                    f"{one_way_us}us", check=False)
            if r.returncode == 0:
                self.method = "netem"
            elif method == "netem":
                sys.exit(f"netem: {r.stderr.strip()}")
            else:
                self.method = "nfqueue"
        else:
            self.method = "nfqueue"
        if self.method == "netem":
            self.set_rate(None)
        else:
            for ns, dev, own in zip(self.netns, self.veth, self.prefix):
                prefix = wire if split else own
                run("ip", "netns", "exec", ns, "iptables", "-t", "mangle", "-A", "PREROUTING", "-i", dev,
                    "-j", "NFQUEUE", "--queue-num", "0")
                p = subprocess.Popen([*DIE_WITH_DRIVER, "ip", "netns", "exec", ns, *prefix, os.path.join(TOOLS, "delayline"), "0",
                                      str(one_way_us)], stderr=subprocess.DEVNULL)
                self.delaylines.append(p)
            time.sleep(0.2)
            for p in self.delaylines:
                if p.poll() is not None:
                    sys.exit(f"delayline exited with {p.returncode}")

    def set_rate(self, rate_bits):
        """Limits each direction to `rate_bits` bits/s (None: no limit)."""
        self.rate = rate_bits
        for ns, dev in zip(self.netns, self.veth):
            if self.method == "netem":
                rate = ["rate", str(rate_bits)] if rate_bits else []
                run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "netem", "delay",
                    f"{self.one_way_us}us", "limit", "100000", *rate)
            elif rate_bits:
                # The bucket holds two 64 KiB GSO packets or 1 ms of the rate; the queue 25 ms.
                burst = max(128 << 10, rate_bits // 8 // 1000)
                run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", str(rate_bits),
                    "burst", str(burst), "latency", "25ms")
            else:
                run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)

    def link(self, up):
        """Takes the primary's end of the link down or up (a cut cable, as far as TCP knows)."""
        run("ip", "-n", self.netns[0], "link", "set", self.veth[0], "up" if up else "down")

    def rtt_ms(self, n=20):
        """Median TCP connect time from the primary's namespace to the secondary's, in ms."""
        server = subprocess.Popen(
            [*DIE_WITH_DRIVER, "ip", "netns", "exec", self.netns[1], sys.executable, "-c",
             "import socket\ns = socket.create_server(('%s', 7999))\nprint('up', flush=True)\n"
             "while True:\n    s.accept()[0].close()\n" % ADDR[1]],
            stdout=subprocess.PIPE, text=True)
        try:
            server.stdout.readline()
            out = run("ip", "netns", "exec", self.netns[0], sys.executable, "-c",
                      "import socket, statistics, time\nts = []\n"
                      f"for _ in range({n}):\n    t = time.perf_counter()\n"
                      f"    socket.create_connection(('{ADDR[1]}', 7999)).close()\n"
                      "    ts.append(time.perf_counter() - t)\n    time.sleep(0.02)\n"
                      "print(statistics.median(ts) * 1000)\n").stdout
            return float(out)
        finally:
            server.kill()
            server.wait()

    def stream_mbps(self, seconds=3.0):
        """MB/s of one plain TCP stream (no TLS) from the primary's namespace to the
        secondary's for `seconds`: what the link carries."""
        server = subprocess.Popen(
            [*DIE_WITH_DRIVER, "ip", "netns", "exec", self.netns[1], sys.executable, "-c",
             "import socket\ns = socket.create_server(('%s', 7998))\nprint('up', flush=True)\n"
             "c = s.accept()[0]\nn = 0\nb = bytearray(1 << 22)\n"
             "while (k := c.recv_into(b)):\n    n += k\nprint(n, flush=True)\n" % ADDR[1]],
            stdout=subprocess.PIPE, text=True)
        try:
            server.stdout.readline()
            secs = float(run("ip", "netns", "exec", self.netns[0], sys.executable, "-c",
                             "import socket, time\nc = socket.create_connection(('%s', 7998))\n"
                             "b = bytes(1 << 22)\nt = time.monotonic()\n"
                             "while time.monotonic() - t < %f:\n    c.sendall(b)\n"
                             "c.shutdown(socket.SHUT_WR)\nc.recv(1)\nprint(time.monotonic() - t)\n"
                             % (ADDR[1], seconds)).stdout)
            return int(server.stdout.readline()) / secs / 1e6
        finally:
            server.kill()
            server.wait()

    def cpu(self):
        return sum(cpu_seconds(p.pid) for p in self.delaylines if p.poll() is None)

    def close(self):
        stop(self.delaylines, timeout=5)
        for ns in self.netns:
            if os.path.exists(f"/run/netns/{ns}"):
                run("ip", "netns", "del", ns, check=False)


def disk_irq_cpus(path):
    """{IRQ: the CPUs it is handled on} of the disk under `path` (its PCI function's MSI
    interrupts that have fired), or {} when there is none to find."""
    st = os.stat(path)
    dev = os.path.realpath(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    if os.path.exists(os.path.join(dev, "partition")):
        dev = os.path.dirname(dev)
    d = os.path.realpath(os.path.join(dev, "device"))
    while d != "/" and not os.path.isdir(os.path.join(d, "msi_irqs")):
        d = os.path.dirname(d)
    if d == "/":
        return {}
    counts = {}
    with open("/proc/interrupts") as f:
        for line in f:
            head, _, rest = line.partition(":")
            if head.strip().isdigit():
                counts[int(head)] = sum(int(x) for x in rest.split()[:os.cpu_count()] if x.isdigit())
    found = {}
    for irq in (int(i) for i in os.listdir(os.path.join(d, "msi_irqs"))):
        try:
            with open(f"/proc/irq/{irq}/effective_affinity_list") as f:
                cpus = parse_cpu_list(f.read())
        except OSError:
            continue
        if counts.get(irq, 0) > 0:
            found[irq] = cpus
    return found


def parse_cpu_list(text):
    """'0-2,5' -> [0, 1, 2, 5]."""
    cpus = []
    for part in text.strip().split(","):
        if "-" in part:
            a, b = part.split("-")
            cpus.extend(range(int(a), int(b) + 1))
        elif part:
            cpus.append(int(part))
    return cpus


def make_pki(d):
    """A CA and one certificate per zone naming its address (ECDSA P-256, openssl)."""
    os.makedirs(d, exist_ok=True)
    ca_key, ca = os.path.join(d, "ca.key"), os.path.join(d, "ca.pem")
    run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=bench-replication CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    nodes = []
    for i, addr in enumerate(ADDR):
        key, csr, cert = (os.path.join(d, f"node{i}.{x}") for x in ("key", "csr", "pem"))
        ext = os.path.join(d, f"node{i}.ext")
        with open(ext, "w") as f:
            f.write(f"subjectAltName=IP:{addr}\nextendedKeyUsage=serverAuth,clientAuth\n"
                    "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n")
        run("openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", key, "-out", csr, "-subj", f"/CN=zone-{i}")
        run("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-out", cert, "-days", "2",
            "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-extfile", ext)
        nodes.append((cert, key, ca))
    return nodes


# The client's CPUs (with --split-cpus, zone 0's: the guest's on the primary's host).
DISK_IRQS = {}  # with --split-cpus: zone 0's disk's IRQs and the CPUs they are handled on
CLIENT_PREFIX = []


def blkbench(sock, rw, bs, qd, runtime, ramp=0.0, span=None):
    cmd = [*DIE_WITH_DRIVER, *CLIENT_PREFIX, os.path.join(BIN, "blkbench"), "--socket", sock, "--rw", rw, "--bs", str(bs),
           "--iodepth", str(qd), "--runtime", str(runtime)]
    if ramp:
        cmd += ["--ramp", str(ramp)]
    if span:
        cmd += ["--size", str(span)]
    return json.loads(run(*cmd).stdout)


def host_cpu():
    """Jiffies of all CPUs from /proc/stat: total, busy, task (user, nice, system) and irq
    (irq, softirq); and "cpus", each CPU's (total, busy)."""
    with open("/proc/stat") as f:
        lines = [line.split() for line in f if line.startswith("cpu")]
    v = [int(x) for x in lines[0][1:]]
    cpus = []
    for line in lines[1:]:
        c = [int(x) for x in line[1:]]
        cpus.append((sum(c), sum(c) - c[3] - c[4]))
    return {"total": sum(v), "busy": sum(v) - v[3] - v[4], "task": v[0] + v[1] + v[2], "irq": v[5] + v[6],
            "cpus": cpus}


def kernel_threads_cpu():
    """CPU seconds of the kernel's threads (PF_KTHREAD), all of them."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[6]) & 0x00200000:
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def thread_cpu(pid):
    """{tid: (name, CPU seconds)} of a process's threads."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st.rsplit(")", 1)[1].split()
        out[int(tid)] = (st[st.index("(") + 1:st.rindex(")")], (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="2GiB", help="size of the compared volumes (default 2GiB)")
    ap.add_argument("--runtime", type=float, default=5, help="seconds per run (default 5)")
    ap.add_argument("--reps", type=int, default=5, help="runs per case and volume (default 5)")
    ap.add_argument("--rtt-us", type=int, default=5000, help="round trip put on the link (default 5000)")
    ap.add_argument("--seed", default="512MiB", help="data of the initial-sync volumes (default 512MiB)")
    ap.add_argument("--sync-rates", default="200mbit,1gbit,0",
                    help="link rates of the initial-sync rows, 0 for none (default 200mbit,1gbit,0)")
    ap.add_argument("--resync-mib", default="16,64,256", help="MiB written while the link is down")
    ap.add_argument("--steady", default="4k:20000,128k:200MiB,128k:60MiB@1gbit",
                    help="steady loads for the lag rows: 4k:IOPS or 128k:BYTES/s, @RATE for a link limit")
    ap.add_argument("--delay", choices=("auto", "netem", "nfqueue"), default="auto",
                    help="how the link's delay is made: netem, or an NFQUEUE and delayline (auto: netem if the kernel has it)")
    ap.add_argument("--secondary-dir", default=None,
                    help="parent of the secondary's data dir (default /dev/shm: tmpfs, so the two "
                         "zones do not share this host's one disk)")
    ap.add_argument("--zone1-idle", action="store_true",
                    help="run zone 1 (the secondary's storaged and delay line) under SCHED_IDLE: it then "
                         "takes only the CPU zone 0 leaves, an approximation of a host of its own")
    ap.add_argument("--split-cpus", action="store_true",
                    help="each zone on CPUs of its own, as two hosts: zone 0's storaged and the client on "
                         "the first half of the CPUs, zone 1's storaged and both delay lines (the wire) on "
                         "the rest; each end's packets received on its zone's CPUs")
    ap.add_argument("--control-apart", action="store_true",
                    help="with --split-cpus: zone 0's control plane (its replication sender's TLS and TCP, "
                         "its API) on zone 1's CPUs, by storaged's [cpus], and zone 0's received packets "
                         "(the replication's) processed there too; its queues and the client keep zone 0's "
                         "CPUs: a primary whose sender has a core its queue workers do not use")
    ap.add_argument("--max-other", type=float, default=0.15,
                    help="a rep during which anything else on the host took more CPU (cores) is run again (default 0.15)")
    ap.add_argument("--retries", type=int, default=3, help="how often a rep is run again at most (default 3)")
    ap.add_argument("--netns", default=f"brepl{os.getpid()}",
                    help="the zones' network namespaces are NETNS-a and NETNS-b (default brepl<pid>)")
    ap.add_argument("--quick", action="store_true",
                    help="a short run to check the script: 256MiB, 2 s, 2 reps, 64MiB seed, resync 16,64")
    ap.add_argument("--out", default=None,
                    help="where the table is written (default bench-results/; with --quick, target/bench-results/)")
    args = ap.parse_args()
    if args.out is None:
        args.out = os.path.join(ROOT, "target", "bench-results") if args.quick else os.path.join(ROOT, "bench-results")
    if args.quick:
        args.size, args.runtime, args.reps, args.seed = "256MiB", 2, 2, "64MiB"
        args.resync_mib = "16,64"
        args.steady = "4k:20000,128k:60MiB@1gbit"
    size = parse_size(args.size) // MIB * MIB
    seed = parse_size(args.seed) // MIB * MIB
    resync_sizes = [int(x) for x in args.resync_mib.split(",") if x.strip()]
    if max(resync_sizes, default=0) * MIB > size:
        sys.exit("--resync-mib: every size must fit in --size")
    sync_rates = [parse_rate(x) for x in args.sync_rates.split(",") if x.strip()]
    steady = [parse_steady(x) for x in args.steady.split(",") if x.strip()]

    # Named after the namespaces, so that scripts/bench-replication's trap finds them too.
    work = os.path.join("/var/tmp", f"bench-replication.{args.netns}")
    work_b = os.path.join(args.secondary_dir or "/dev/shm", f"bench-replication.{args.netns}")
    os.makedirs(work)
    os.makedirs(work_b)
    procs = []
    zones = None

    def cleanup():
        stop(procs)
        if zones:
            zones.close()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(work_b, ignore_errors=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        progress(f"==> zones: namespaces {args.netns}-a and {args.netns}-b, {args.rtt_us} µs round trip")
        split = None
        if args.control_apart and not args.split_cpus:
            sys.exit("--control-apart needs --split-cpus")
        if args.split_cpus:
            cpus = sorted(os.sched_getaffinity(0))
            if len(cpus) < 2:
                sys.exit("--split-cpus needs at least 2 CPUs")
            half = len(cpus) // 2
            split = (",".join(map(str, cpus[:half])), ",".join(map(str, cpus[half:])))
            # Shown in the table: where zone 0's disk's completions are handled.
            DISK_IRQS.update(disk_irq_cpus(work))
            CLIENT_PREFIX[:] = ["taskset", "-c", split[0]]
        zones = Zones(args.netns, args.rtt_us // 2, args.delay, args.zone1_idle, split, args.control_apart)
        rtt = zones.rtt_ms()
        link_mbps = zones.stream_mbps()
        progress(f"    delay by {zones.method}; TCP connect time across: {rtt:.2f} ms; one TCP stream "
                 f"carries {link_mbps:.0f} MB/s")

        nodes = make_pki(os.path.join(work, "pki"))
        daemons, admins = [], []
        for i, (ns, prefix, addr, (cert, key, ca)) in enumerate(zip(zones.netns, zones.prefix, ADDR, nodes)):
            data = os.path.join(work if i == 0 else work_b, f"zone{i}")
            os.makedirs(data)
            config = os.path.join(work, f"zone{i}.toml")
            with open(config, "w") as f:
                f.write(f'[replication]\nlisten = "{addr}:{PORT}"\ncert = "{cert}"\nkey = "{key}"\nca = "{ca}"\n')
                if i == 0 and zones.control_apart:
                    f.write(f'[cpus]\ndata_plane = "{zones.split[0]}"\ncontrol_plane = "{zones.split[1]}"\n')
            p = subprocess.Popen([*DIE_WITH_DRIVER, "ip", "netns", "exec", ns, *prefix, os.path.join(BIN, "storaged"), "--data-dir", data,
                                  "--config", config, "--metrics-addr", "off", "--log", "warn"])
            procs.append(p)
            wait_for_socket(os.path.join(data, "admin.sock"), p, f"storaged in {ns}")
            daemons.append(p)
            admins.append(Admin(os.path.join(data, "admin.sock")))
        a = admins[0]
        peer = f"{ADDR[1]}:{PORT}"

        def create(name, nbytes):
            v = a.ok("POST", "/v1/volumes", {"name": name, "size": nbytes, "tier": "mass",
                                            "preallocate": True, "encryption": "none"})
            fill(v["backing"]["path"], nbytes)
            return v["socket"]

        def replicate(name, mode="async"):
            return a.request("POST", f"/v1/volumes/{name}/replication",
                             {"peer": peer, "mode": mode, "rpo_seconds": 5})

        def wait_replicating(name, timeout=600):
            """Polls every 100 ms until `name` is replicating and caught up (lag 0); returns the
            time (monotonic) it got there."""
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                r = a.replication(name)
                if r["state"] == "replicating" and r["consistent"] and r["lag_seconds"] == 0.0:
                    return time.monotonic()
                time.sleep(0.1)
            sys.exit(f"{name}: not replicating after {timeout} s: {a.replication(name)}")

        progress(f"==> volumes on zone 0: plain, repl, control ({size // MIB} MiB each, filled)")
        socks = {n: create(n, size) for n in ("plain", "repl", "control")}
        progress("==> initial sync of repl on the unlimited link")
        sync_rows = []

        def start_replication(name):
            """POST replication of `name` and wait until it is replicating with lag 0; returns
            the time (monotonic) it got there."""
            status, out = replicate(name)
            if status // 100 != 2:
                sys.exit(f"POST replication {name}: {status} {out}")
            return wait_replicating(name)

        def initial_sync(name, nbytes, rate):
            t0 = time.monotonic()
            t1 = start_replication(name)
            sent = a.metric("storaged_volume_replication_sent_bytes_total", name)
            row = {"rate": rate, "mib": nbytes / MIB, "secs": t1 - t0, "sent_mib": sent / MIB}
            progress(f"    {name}: {nbytes // MIB} MiB in {t1 - t0:.2f} s ({nbytes / MIB / (t1 - t0):.0f} MiB/s), "
                     f"link {rate_label(rate)}, {sent / MIB:.0f} MiB sent")
            sync_rows.append(row)

        initial_sync("repl", size, None)

        def unreplicate(name):
            """Ends `name`'s relationship and deletes the peer's copy: `name` is an unreplicated
            volume again, and a later replicate starts over with an initial sync."""
            a.ok("POST", f"/v1/volumes/{name}/unreplicate")
            admins[1].ok("DELETE", f"/v1/volumes/{name}")

        # Replicated against unreplicated, reps interleaved (who goes first rotates). The
        # sampler polls repl's lag throughout, so the plain runs carry the same API load.
        sampler = Sampler(a.sock, "repl", daemons[0].pid)
        sampler.start()
        results = {}
        for name, rw, bs, qd in CASES:
            runs = {"plain": [], "repl": [], "control": [], "self": []}
            ratios, controls, boths, selfs = [], [], [], []
            redone = 0
            for rep in range(args.reps):
                for attempt in range(args.retries + 1):
                    order = ["plain", "repl", "control"]
                    order = order[rep % 3:] + order[:rep % 3]
                    # The repl volume unreplicated ("self": the same volume, its relationship
                    # ended and made again), before its replicated run in even reps, after it
                    # in odd ones.
                    at = order.index("repl")
                    order[at:at + 1] = ["self", "repl"] if rep % 2 == 0 else ["repl", "self"]
                    this = {}
                    for vol in order:
                        if vol == "self":
                            unreplicate("repl")
                        elif vol == "repl" and "self" in this:
                            start_replication("repl")
                        sent0 = a.metric("storaged_volume_replication_sent_bytes_total", "repl")
                        w = Window(daemons, zones, sampler)
                        r = blkbench(socks["repl" if vol == "self" else vol], rw, bs, qd, args.runtime)
                        r.update(w.end())
                        if vol == "repl":
                            during = sampler.between(r["t0"], r["t1"])
                            t2 = wait_replicating("repl")
                            r["lags"] = [x[2] for x in during if x[2] is not None]
                            r["states"] = sorted({x[1] for x in during})
                            r["catch_up"] = t2 - r["t1"]
                            r["sent_mb"] = (a.metric("storaged_volume_replication_sent_bytes_total", "repl")
                                            - sent0) / 1e6
                        this[vol] = r
                    if rep % 2 == 1:
                        # Replicated again for the next rep, which starts with it.
                        start_replication("repl")
                    other = max(r["cpu"][-1] for r in this.values())
                    if other <= args.max_other or attempt == args.retries:
                        break
                    redone += 1
                    progress(f"    {name} rep {rep + 1}: {other:.2f} cores of someone else's load; again")
                for vol, r in this.items():
                    runs[vol].append(r)
                ratios.append(this["repl"]["iops"] / this["plain"]["iops"])
                controls.append(this["control"]["iops"] / this["plain"]["iops"])
                boths.append(2 * this["repl"]["iops"] / (this["plain"]["iops"] + this["control"]["iops"]))
                selfs.append(this["repl"]["iops"] / this["self"]["iops"])
                rr, rp = this["repl"], this["plain"]
                progress(f"    {name} rep {rep + 1}: repl unreplicated {this['self']['iops']:.0f} IOPS, "
                         f"replicated {rr['iops']:.0f} ({selfs[-1]:.3f}); plain {rp['iops']:.0f} IOPS "
                         f"(repl/plain {ratios[-1]:.3f}), control {this['control']['iops']:.0f} "
                         f"({controls[-1]:.3f}); repl lag p50/p99 {fmt(percentile(rr['lags'], 50))}/"
                         f"{fmt(percentile(rr['lags'], 99))} s, states {','.join(rr['states'])}, lag 0 "
                         f"{rr['catch_up']:.1f} s after; queue worker in fdatasync {rr['waits'].get('fdatasync', 0):.0%} "
                         f"of the repl run, {rp['waits'].get('fdatasync', 0):.0%} of the plain run; on a CPU / runnable "
                         f"{rr['sched'][0]:.2f}/{rr['sched'][1]:.2f} cores in the repl run, {rp['sched'][0]:.2f}/"
                         f"{rp['sched'][1]:.2f} in the plain run; CPU of the repl "
                         f"run: {cpu_label(rr['cpu'])} (CPUs {'/'.join(f'{c:.0%}' for c in rr['per_cpu'])} busy); of the "
                         f"plain run: {cpu_label(rp['cpu'])} (CPUs {'/'.join(f'{c:.0%}' for c in rp['per_cpu'])} busy)")
            res = {vol: {k: statistics.median(r[k] for r in rs) for k in ("iops", "mbps", "lat_p50_us", "lat_p99_us")}
                   for vol, rs in runs.items()}
            res["ratio"], res["ratios"] = statistics.median(ratios), (min(ratios), max(ratios))
            res["control"], res["controls"] = statistics.median(controls), (min(controls), max(controls))
            res["both"], res["boths"] = statistics.median(boths), (min(boths), max(boths))
            res["vs_self"], res["vs_selfs"] = statistics.median(selfs), (min(selfs), max(selfs))
            lags = [x for r in runs["repl"] for x in r["lags"]]
            res["lag"] = (percentile(lags, 50), percentile(lags, 99), max(lags, default=None))
            res["catch_up"] = (statistics.median(r["catch_up"] for r in runs["repl"]),
                               max(r["catch_up"] for r in runs["repl"]))
            res["resync_runs"] = sum(1 for r in runs["repl"] if "resync" in r["states"])
            res["sent_mbps"] = statistics.median(r["sent_mb"] / (r["t1"] - r["t0"]) for r in runs["repl"])
            for vol in ("plain", "repl"):
                res[vol]["cpu"] = [statistics.median(r["cpu"][i] for r in runs[vol]) for i in range(len(Window.KINDS))]
                res[vol]["host"] = statistics.median(r["host"] for r in runs[vol])
                res[vol]["per_cpu"] = [statistics.median(r["per_cpu"][i] for r in runs[vol])
                                       for i in range(len(runs[vol][0]["per_cpu"]))]
                for key in ("threads", "threads1"):
                    kinds = set().union(*(r[key] for r in runs[vol]))
                    res[vol][key] = {k: statistics.median(r[key].get(k, 0.0) for r in runs[vol]) for k in kinds}
                kinds = set().union(*(r["waits"] for r in runs[vol]))
                res[vol]["sched"] = tuple(statistics.median(r["sched"][i] for r in runs[vol]) for i in (0, 1))
                res[vol]["waits"] = {k: statistics.median(r["waits"].get(k, 0.0) for r in runs[vol])
                                     for k in kinds}
            res["redone"] = redone
            res["noisy"] = sum(1 for vol in runs for r in runs[vol] if r["cpu"][-1] > args.max_other)
            results[name] = res

        # Lag under steady loads the link carries: the replicated volume held to a limit.
        steady_rows = []
        ramp = 2.0
        for bs, limit, rate in steady:
            zones.set_rate(rate)
            body = {"iops_limit": limit} if bs == 4096 else {"bandwidth_limit": limit}
            a.ok("PATCH", "/v1/volumes/repl", body)
            qd = 32 if bs == 4096 else 8
            t0 = time.monotonic()
            r = blkbench(socks["repl"], "randwrite" if bs == 4096 else "write", bs, qd, 2 * args.runtime,
                         ramp=ramp)
            t1 = time.monotonic()
            t2 = wait_replicating("repl")
            during = sampler.between(t0 + ramp, t1)
            lags = [x[2] for x in during if x[2] is not None]
            row = {"bs": bs, "limit": limit, "rate": rate, "iops": r["iops"], "mbps": r["mbps"],
                   "lag": (percentile(lags, 50), percentile(lags, 99), max(lags, default=None)),
                   "states": sorted({x[1] for x in during}), "catch_up": t2 - t1}
            steady_rows.append(row)
            progress(f"    steady {steady_label(bs, limit)} on link {rate_label(rate)}: {r['mbps']:.0f} MB/s, "
                     f"lag p50/p99/max {'/'.join(fmt(x) for x in row['lag'])} s, states {','.join(row['states'])}")
            a.ok("PATCH", "/v1/volumes/repl", {"iops_limit": None} if bs == 4096 else {"bandwidth_limit": None})
        zones.set_rate(None)
        sampler.stop()

        # Initial sync against the link's bandwidth.
        for i, rate in enumerate(sync_rates):
            name = f"seed{i}"
            progress(f"==> initial sync of {seed // MIB} MiB, link {rate_label(rate)}")
            create(name, seed)
            zones.set_rate(rate)
            initial_sync(name, seed, rate)
            zones.set_rate(None)

        # Resync against dirty bytes: the link cut, D MiB written over distinct 1 MiB regions.
        resync_rows = []
        for d in resync_sizes:
            progress(f"==> resync: link down, {d} MiB written, link up")
            zones.link(False)
            t_down = time.monotonic()
            while a.replication("repl")["state"] != "disconnected":
                if time.monotonic() - t_down > 60:
                    sys.exit("repl: not disconnected 60 s after the link went down")
                time.sleep(0.1)
            detect = time.monotonic() - t_down
            # Sequential from offset 0 over a span of D MiB: one pass writes every region of it
            # (blkbench runs for a time, so longer until a run's writes cover the span).
            seconds = 1.0
            while blkbench(socks["repl"], "write", 131072, 8, seconds, span=d * MIB)["ios"] * 131072 < d * MIB:
                seconds *= 2
            sent0 = a.metric("storaged_volume_replication_sent_bytes_total", "repl")
            t_up = time.monotonic()
            zones.link(True)
            # The dirty map's count is published with the link's status updates, which a
            # link in backoff does not make: its largest value until the end is the resync's.
            dirty, t_conn = a.metric("storaged_volume_replication_resync_bytes", "repl"), None
            while True:
                r = a.replication("repl")
                now = time.monotonic()
                dirty = max(dirty, a.metric("storaged_volume_replication_resync_bytes", "repl"))
                if r["state"] != "disconnected" and t_conn is None:
                    t_conn = now
                if r["state"] == "replicating" and r["lag_seconds"] == 0.0:
                    t_done = now
                    break
                if now - t_up > 600:
                    sys.exit(f"repl: not replicating 600 s after the link came up: {r}")
                time.sleep(0.05)
            sent = a.metric("storaged_volume_replication_sent_bytes_total", "repl") - sent0
            row = {"mib": d, "dirty_mib": dirty / MIB, "detect": detect, "total": t_done - t_up,
                   "reconnect": t_conn - t_up, "resync": t_done - t_conn, "sent_mib": sent / MIB}
            resync_rows.append(row)
            progress(f"    {d} MiB: dirty {row['dirty_mib']:.0f} MiB, link up → replicating {row['total']:.1f} s "
                     f"(reconnect {row['reconnect']:.1f} s, resync {row['resync']:.1f} s), sent {row['sent_mib']:.0f} MiB")

        # Sync mode: a write answered once the peer has it.
        progress("==> sync mode")
        sync_size = min(size, 256 * MIB)
        socks["syncvol"] = create("syncvol", sync_size)
        status, out = replicate("syncvol", "sync")
        sync = {"status": status, "answer": out}
        if status // 100 == 2:
            wait_replicating("syncvol")
            lat = {"syncvol": [], "plain": []}
            for rep in range(args.reps):
                for vol in (("syncvol", "plain") if rep % 2 == 0 else ("plain", "syncvol")):
                    lat[vol].append(blkbench(socks[vol], "randwrite", 4096, 1, args.runtime, span=sync_size))
                progress(f"    rep {rep + 1}: sync p50/p99 {lat['syncvol'][-1]['lat_p50_us']:.0f}/"
                         f"{lat['syncvol'][-1]['lat_p99_us']:.0f} µs, unreplicated "
                         f"{lat['plain'][-1]['lat_p50_us']:.0f}/{lat['plain'][-1]['lat_p99_us']:.0f} µs")
            sync["runs"] = {v: {k: statistics.median(r[k] for r in rs) for k in ("iops", "lat_p50_us", "lat_p99_us")}
                            for v, rs in lat.items()}
        else:
            progress(f"    POST replication mode sync: {status} {out}")

        lines = report(args, size, seed, rtt, link_mbps, zones, results, steady_rows, sync_rows, resync_rows, sync)
        variant = (("-split-cpus" if args.split_cpus else "") + ("-control-apart" if args.control_apart else "")
                   + ("-zone1-idle" if args.zone1_idle else ""))
        write_table(lines, args.out, f"replication{variant}{'-quick' if args.quick else ''}.md")
    finally:
        cleanup()


def parse_rate(s):
    """'200mbit', '1gbit', '0' (no limit) -> bits/s or None."""
    s = s.strip().lower()
    units = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "bit": 1}
    for u, m in units.items():
        if s.endswith(u):
            return int(float(s[:-len(u)]) * m) or None
    return int(s) or None


def rate_label(rate):
    if not rate:
        return "unlimited"
    return f"{rate / 1e9:g} Gbit/s" if rate >= 10**9 else f"{rate / 1e6:g} Mbit/s"


def parse_steady(s):
    """'4k:20000' (IOPS), '128k:200MiB' (bytes/s), with an optional '@1gbit' link rate."""
    load, _, rate = s.partition("@")
    kind, _, limit = load.partition(":")
    if kind not in ("4k", "128k") or not limit:
        sys.exit(f"--steady: {s!r} is not 4k:IOPS or 128k:BYTES")
    bs = 4096 if kind == "4k" else 131072
    return bs, int(limit) if bs == 4096 else parse_size(limit), parse_rate(rate) if rate else None


def cpu_label(cpu):
    return ", ".join(f"{k} {c:.2f}" for k, c in zip(Window.KINDS, cpu))


def steady_label(bs, limit):
    if bs == 4096:
        return f"4k randwrite QD32 at {limit} IOPS ({limit * 4096 / 1e6:.0f} MB/s)"
    return f"128k seq write QD8 at {limit / MIB:.0f} MiB/s"


def report(args, size, seed, rtt, link_mbps, zones, results, steady_rows, sync_rows, resync_rows, sync):
    head = run("git", "-C", ROOT, "rev-parse", "--short", "HEAD").stdout.strip()
    dirty = run("git", "-C", ROOT, "status", "--porcelain", "--", "storaged", "crates", "Cargo.lock").stdout.strip()
    with open("/proc/cpuinfo") as f:
        model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / (1 << 20)
    fs = run("df", "--output=fstype", "/var/tmp").stdout.split()[-1]
    link = (f"netem delay {args.rtt_us // 2} µs on each end" if zones.method == "netem" else
            f"{args.rtt_us // 2} µs on each end, held by an NFQUEUE (scripts/delayline.c: this kernel has no netem)")
    lines = [f"# storaged replication, {datetime.datetime.now():%Y-%m-%d %H:%M}", "",
             f"Commit {head}{' (storaged modified)' if dirty else ''}. Host: {os.cpu_count()} CPUs ({model}), "
             f"{mem:.0f} GiB, kernel {os.uname().release}. Two zones on this host: network namespaces joined by "
             f"a veth pair, {link}; measured TCP connect time across {rtt:.2f} ms; socket buffers up to 16 MiB "
             f"(send) and 32 MiB (receive) in the namespaces; one plain TCP stream (no TLS) carries "
             f"{link_mbps:.0f} MB/s across (before the daemons start). A storaged in each; zone 0's data dir on "
             f"/var/tmp ({fs}), zone 1's on {args.secondary_dir or '/dev/shm (tmpfs)'}"
             f"{', so the secondary does not share the one disk' if not args.secondary_dir else ''}. Mutual TLS "
             "with an openssl CA. Volumes plain (encryption none), tier mass (no limit), preallocated and "
             f"fully written; client blkbench (blkio crate), 1 queue, on the host."
             + (" Zone 1 (its storaged and delay line) under SCHED_IDLE (--zone1-idle): it takes only the CPU "
                "zone 0 leaves, as a host of its own would; the kernel's work for its packets still runs "
                "on the shared CPUs." if args.zone1_idle and not zones.control_apart else
                " Both zones share the host's CPUs: the secondary's work takes CPU from the primary's "
                "(--zone1-idle puts zone 1 under SCHED_IDLE)."
                if not zones.split else "")
             + (f" Each zone on CPUs of its own (--split-cpus), as two hosts: zone 0's storaged and the client "
                f"on CPU {zones.split[0]}, zone 1's storaged and both delay lines (the wire) on CPU "
                f"{zones.split[1]}; each end's received packets processed there (RPS). Zone 0's replication "
                "work (the sender's TLS and TCP) shares its CPU with the queue worker."
                if zones.split and not zones.control_apart else "")
             + (f" Zone 0's queues (export, queue and io_uring workers: storaged's [cpus] data_plane) and "
                f"the client on CPU {zones.split[0]}; zone 0's control plane (its replication sender's TLS and "
                f"TCP, its API: [cpus] control_plane, --control-apart) and both delay lines (the wire) on CPU "
                f"{zones.split[1]}, with both ends' received packets processed there (RPS; zone 0 receives "
                "only the replication's): a primary whose sender has a core its queue workers do not use. "
                + (f"Zone 1's storaged there too, under SCHED_IDLE (--zone1-idle): it takes only the CPU "
                   "zone 0's sender, the wire and the kernel (zone 0's disk completions among its work) leave, "
                   "the nearest this host comes to a host of its own."
                   if args.zone1_idle else
                   f"Zone 1's storaged on CPU {zones.split[1]} too, beside the sender and the wire.")
                if zones.control_apart else "")
             + (" Zone 0's disk's interrupts: " + ", ".join(f"IRQ {i} on CPU {','.join(map(str, c))}"
                                                       for i, c in sorted(DISK_IRQS.items()))
                + " (virtio-blk's are the kernel's to place: writing their affinity is refused); where that "
                "is zone 1's CPU, zone 0's completions are handled beside the wire's work."
                if zones.split and DISK_IRQS else ""), ""]
    lines += ["## Replicated against unreplicated, same daemon, same run", "",
              f"Three volumes of {size // MIB} MiB on zone 0: plain, repl (async to zone 1, rpo 5 s), and "
              f"control (plain again: the A/A). {args.runtime:g} s per run, {args.reps} reps; in each rep repl runs "
              "twice, replicated and unreplicated (its relationship ended, the peer's copy deleted, and made "
              "again after, with an initial sync: the same volume, the issue's comparison), the unreplicated "
              "run first in even reps, last in odd ones; plain and control around them (who goes first "
              "rotates); each replicated run followed by a wait until its lag is 0 again. Paired ratios, "
              "medians of the per-rep ratios (min-max): repl/self, the replicated volume against itself "
              "unreplicated; repl/plain; A/A: control/plain; "
              "repl/both: repl against the mean of plain and control in the same rep (two volumes' files "
              "differ by as much as the A/A shows, so one reference is not enough). "
              "Lag: GET replication every 100 ms during the repl runs, all reps pooled. Catch-up: from the end "
              "of a run to lag 0 (median / max). A rep during which something else on the host took more than "
              f"{args.max_other:g} cores (\"other\" below) is run again, at most {args.retries} times. "
              "Targets: 4k at ≥ 0.95, 128k at ≥ 0.90.", "",
              "| case | plain IOPS | plain MB/s | plain p50/p99 µs | repl IOPS | repl MB/s | repl p50/p99 µs "
              "| self (repl unreplicated) IOPS | repl/self (min-max) | repl/plain (min-max) | A/A control/plain (min-max) "
              "| repl/both (min-max) "
              "| reps run again; runs kept with other load |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, *_ in CASES:
        r = results[name]
        p, q = r["plain"], r["repl"]
        lines.append(f"| {name} | {p['iops']:.0f} | {p['mbps']:.0f} | {p['lat_p50_us']:.0f}/{p['lat_p99_us']:.0f} "
                     f"| {q['iops']:.0f} | {q['mbps']:.0f} | {q['lat_p50_us']:.0f}/{q['lat_p99_us']:.0f} "
                     f"| {r['self']['iops']:.0f} | {r['vs_self']:.3f} ({r['vs_selfs'][0]:.2f}-{r['vs_selfs'][1]:.2f}) "
                     f"| {r['ratio']:.3f} ({r['ratios'][0]:.2f}-{r['ratios'][1]:.2f}) "
                     f"| {r['control']:.3f} ({r['controls'][0]:.2f}-{r['controls'][1]:.2f}) "
                     f"| {r['both']:.3f} ({r['boths'][0]:.2f}-{r['boths'][1]:.2f}) "
                     f"| {r['redone']}; {r['noisy']} of {4 * args.reps} |")
    lines += ["", "| case | repl lag p50 / p99 / max s | lag 0 again after s (median / max) | repl runs with a resync "
              "| replication link MB/s (frames sent) |", "|---|---|---|---|---|"]
    for name, *_ in CASES:
        r = results[name]
        lines.append(f"| {name} | {' / '.join(fmt(x) for x in r['lag'])} | {r['catch_up'][0]:.1f} / "
                     f"{r['catch_up'][1]:.1f} | {r['resync_runs']} of {args.reps} | {r['sent_mbps']:.0f} |")
    lines += ["", f"CPU during the runs, in cores of the host's {os.cpu_count()} (medians of the runs): each zone's "
              "storaged, the delay lines, the client (blkbench and this driver), the kernel (its threads, "
              "interrupts and softirqs: writeback, the network stack), and other: the host's task time less all "
              "of those, i.e. someone else's load. By thread: names without their numbers; a queue's worker "
              "(vring_worker) ends with its connection, so its last 100 ms may be missing. Zone 0's queue "
              "worker: what it was doing at each 100 ms sample (/proc/TID/syscall): running, or the system "
              "call it waited in; and, by the scheduler's own counts (/proc/TID/schedstat), its time on a "
              "CPU and its time runnable but waiting for one, in cores. Busy by CPU: each CPU's share not "
              "idle (/proc/stat).", "",
              "| case | volume | " + " | ".join(Window.KINDS) + " | host busy | busy by CPU | zone 0 by thread "
              "| zone 0's queue worker | zone 1 by thread |",
              "|---|---|" + "---|" * len(Window.KINDS) + "---|---|---|---|---|"]
    for name, *_ in CASES:
        for vol in ("plain", "repl"):
            v = results[name][vol]
            top, top1 = (sorted(((c, k) for k, c in v[key].items() if c >= 0.01), reverse=True)
                         for key in ("threads", "threads1"))
            waits = sorted(((c, k) for k, c in v["waits"].items() if c >= 0.01), reverse=True)
            lines.append(f"| {name} | {vol} | " + " | ".join(f"{c:.2f}" for c in v["cpu"])
                         + f" | {v['host']:.0%} | {', '.join(f'{i}: {c:.0%}' for i, c in enumerate(v['per_cpu']))} "
                         f"| {', '.join(f'{k} {c:.2f}' for c, k in top)} "
                         f"| {', '.join(f'{k} {c:.0%}' for c, k in waits)}; on a CPU {v['sched'][0]:.2f}, "
                         f"runnable {v['sched'][1]:.2f} "
                         f"| {', '.join(f'{k} {c:.2f}' for c, k in top1)} |")
    lines += ["", "## Lag under steady loads the link carries", "",
              f"repl held to a limit (its QoS bucket), {2 * args.runtime:g} s measured after 2 s spending the burst; "
              "lag sampled every 100 ms. Target: p99 < 1 s.", "",
              "| load | link | achieved MB/s | lag p50 / p99 / max s | states seen | catch-up s |",
              "|---|---|---|---|---|---|"]
    for r in steady_rows:
        lines.append(f"| {steady_label(r['bs'], r['limit'])} | {rate_label(r['rate'])} | {r['mbps']:.0f} "
                     f"| {' / '.join(fmt(x) for x in r['lag'])} | {', '.join(r['states'])} | {r['catch_up']:.1f} |")
    lines += ["", "## Initial sync against the link's bandwidth", "",
              "From POST replication to `replicating` with lag 0 (polled every 100 ms); the volume fully "
              "written through its backing file first. MiB/s is the volume's data over that time; link MiB/s "
              "its rate (unlimited: what one plain TCP stream carried); sent is the frames' bytes "
              "(storaged_volume_replication_sent_bytes_total).", "",
              "| volume data MiB | link | time s | MiB/s | link MiB/s | of the link | sent MiB |",
              "|---|---|---|---|---|---|---|"]
    for r in sync_rows:
        mibs = r["mib"] / r["secs"]
        link_mibs = r["rate"] / 8 / MIB if r["rate"] else link_mbps * 1e6 / MIB
        lines.append(f"| {r['mib']:.0f} | {rate_label(r['rate'])} | {r['secs']:.2f} | {mibs:.0f} | {fmt(link_mibs, '.0f')} "
                     f"| {fmt(mibs / link_mibs if link_mibs else None)} | {r['sent_mib']:.0f} |")
    lines += ["", "## Resync against dirty bytes", "",
              "repl replicating; its end of the link taken down (`ip link set down`), then, once the primary "
              "says `disconnected`, D MiB written sequentially over D distinct 1 MiB regions, then the link up. "
              "Dirty: the largest storaged_volume_replication_resync_bytes seen from just before the link comes "
              "up to the end (the gauge moves with the link's status updates). Reconnect: link up to "
              "the state leaving `disconnected` (the sender's backoff, 1 s doubling to 10 s); resync: from "
              "there to `replicating` with lag 0. Sent: frame bytes from link up to the end.", "",
              "| written MiB | dirty MiB | cut noticed after s | link up → replicating s | reconnect s "
              "| resync s | resync MiB/s | sent MiB | sent / dirty |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in resync_rows:
        lines.append(f"| {r['mib']} | {r['dirty_mib']:.0f} | {r['detect']:.1f} | {r['total']:.1f} | {r['reconnect']:.1f} "
                     f"| {r['resync']:.2f} | {fmt(r['dirty_mib'] / r['resync'] if r['resync'] > 0 else None, '.0f')} "
                     f"| {r['sent_mib']:.0f} | {fmt(r['sent_mib'] / r['dirty_mib'] if r['dirty_mib'] else None)} |")
    lines += ["", "## Sync mode", "",
              "4k randwrite QD1 on a volume replicated in sync mode against the unreplicated one, reps alternated.", "",
              "| volume | IOPS | p50 µs | p99 µs |", "|---|---|---|---|"]
    if "runs" in sync:
        for vol, label in (("plain", "unreplicated"), ("syncvol", "sync-replicated")):
            s = sync["runs"][vol]
            lines.append(f"| {label} | {s['iops']:.0f} | {s['lat_p50_us']:.0f} | {s['lat_p99_us']:.0f} |")
    else:
        answer = sync["answer"].get("error", sync["answer"]) if isinstance(sync["answer"], dict) else sync["answer"]
        lines.append(f"| sync-replicated | not built (POST replication answered {sync['status']}: {answer}) | | |")
    return lines


if __name__ == "__main__":
    main()
