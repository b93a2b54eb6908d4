#!/usr/bin/env python3
"""Live migration of a 1 GiB riscv64 guest on loopback: total time and downtime, as the
source monitor reports them (downtime: from pausing the guest at the source to the
destination's confirmation that it runs there), for an idle guest and for one rewriting
8 MiB of tmpfs in a loop. The transport is authenticated (pre-shared key), as it must be
between hosts.

Each workload boots one guest, then migrates it BENCH_RUNS times along a chain (each
destination becomes the next source), so one boot serves every run. One JSON line per
workload."""

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

WORKLOADS = {
    "idle": "echo VME-BENCH-UP; sleep 100000",
    # Non-zero data, so every rewritten page goes whole; a fresh 8 MiB each time round.
    "dirtying-8MiB-loop": "echo VME-BENCH-UP; while true; do "
                          "dd if=/dev/urandom of=/tmp/f bs=1M count=8 conv=notrunc 2>/dev/null; "
                          "done",
}
TIMEOUT = 600


def call(sock, req, timeout=TIMEOUT):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(sock)
        s.sendall((json.dumps(req) + "\n").encode())
        return json.loads(s.makefile().readline())


def drain(stream, sink=None):
    for line in iter(stream.readline, b""):
        if sink is not None:
            sink.append(line.decode(errors="replace"))


def start_destination(vmm, key, sock, log):
    proc = subprocess.Popen([vmm, "--migrate-listen", "127.0.0.1:0", "--migrate-key", key,
                             "--control-socket", sock, "--serial", "none"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline().decode(errors="replace")
        if "incoming migration on " in line:
            threading.Thread(target=drain, args=(proc.stderr, log), daemon=True).start()
            return proc, line.split("incoming migration on ")[1].split()[0]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    sys.exit("the destination did not start listening")


def main():
    runs = int(os.environ.get("BENCH_RUNS", "3"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(repo, "target"))
    vmm = os.path.join(target, "release", "vme-vmm")
    img = os.path.join(target, "images", "tiny-riscv64")
    kernel, initrd = os.path.join(img, "Image"), os.path.join(img, "initramfs.cpio")
    work = tempfile.mkdtemp(prefix="vme-bench-migrate-")
    key = os.path.join(work, "key")
    with open(key, "wb") as f:
        f.write(os.urandom(32))
    for name, run in WORKLOADS.items():
        sock = os.path.join(work, f"{name}-0.sock")
        cmdline = 'console=ttyS0 quiet panic=-1 vme.run="%s"' % run
        src = subprocess.Popen([vmm, "--arch", "riscv64", "--kernel", kernel, "--initrd", initrd,
                                "--memory", "1G", "--cmdline", cmdline, "--control-socket", sock],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)
        for line in iter(src.stdout.readline, b""):
            if b"VME-BENCH-UP" in line:
                break
        threading.Thread(target=drain, args=(src.stdout,), daemon=True).start()
        # Let the workload settle into its loop.
        time.sleep(3)
        results = []
        for i in range(runs):
            next_sock = os.path.join(work, f"{name}-{i + 1}.sock")
            log = []
            dst, addr = start_destination(vmm, key, next_sock, log)
            reply = call(sock, {"cmd": "migrate_send", "to": addr, "key": key})
            if not reply.get("ok"):
                dst.kill()
                src.kill()
                sys.exit(f"migration failed: {reply.get('error')}")
            results.append(reply["migration"])
            print(f"# {name} run {i + 1}: {reply['migration']}", file=sys.stderr)
            src.wait(timeout=60)
            src, sock = dst, next_sock
            time.sleep(2)
        if src.poll() is not None:
            sys.exit(f"the last destination ended ({src.returncode}): {''.join(log)}")
        try:
            call(sock, {"cmd": "stop"}, timeout=10)
        except (OSError, ValueError):
            pass  # the monitor may exit before its reply is out
        src.wait(timeout=60)
        line = {"bench": "migrate", "arch": "riscv64", "memory": "1G", "workload": name,
                "runs": runs, "authenticated": all(r["authenticated"] for r in results)}
        for k in ("total_ms", "downtime_ms", "rounds", "bytes_sent", "final_pages"):
            line[f"{k}_median"] = statistics.median(r[k] for r in results)
        line["downtime_ms_max"] = max(r["downtime_ms"] for r in results)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
