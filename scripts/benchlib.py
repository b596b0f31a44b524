"""What the benchmark drivers (bench_storage.py, bench_qos.py, bench_vmm.py) share."""

import os
import signal
import socket
import subprocess
import sys
import time


def stop(procs, timeout=30):
    """Stops the daemons of a run: SIGTERM to each still running, then SIGKILL to any that
    has not ended within `timeout` seconds."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()


def wait_for_socket(path, proc, what, timeout=30):
    """Waits until `path` accepts connections; exits if `proc` ends or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        if os.path.exists(path):
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(path)
                s.close()
                return
            except OSError:
                pass
        time.sleep(0.05)
    sys.exit(f"{what}: {path} did not appear")


def fill(path, size):
    """Writes every byte of a backing file, so reads measure data, not holes."""
    subprocess.run(
        ["fio", "--name=fill", f"--filename={path}", "--rw=write", "--bs=1M", "--direct=1",
         "--ioengine=io_uring", "--iodepth=8", f"--size={size}", "--buffer_pattern=0x5a"],
        check=True, stdout=subprocess.DEVNULL)


def write_table(lines, out_dir, name):
    """Prints a result table and writes it to OUT_DIR/NAME."""
    table = "\n".join(lines)
    print()
    print(table)
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, name)
    with open(out, "w") as f:
        f.write(table + "\n")
    print(f"\nwritten to {out}")
