#!/usr/bin/env python3
"""The daemon's own costs, with riscv64 tiny guests (no KVM needed, same path for x86_64):

- create->running for BENCH_VMED_VMS (20) VMs launched at once through the REST API (create,
  then start; "running" is the start's reply, given once the monitor answers its control
  socket), p50 and p99, against the peer: the same number of monitors started at once by
  hand with the same machine, each timed from its spawn to its control socket answering.
- create->guest ready for BENCH_VMED_BOOT_VMS (4) VMs at once: until each guest's init has
  printed its ready line on the console, against the same monitors started by hand. This is
  the boot a user waits for; the line above isolates the daemon's own cost.
- GET /1.0/vms with 1,000 VM records in the store (p50, p99 of BENCH_RUNS=50 requests).
- The daemon's resident memory idle and with BENCH_VMED_RSS_VMS (50) VMs running.

One JSON line per measurement, then ratio lines (targets: create->running p50 <= 1.2x the
monitor's own, list of 1,000 in <= 20 ms).
"""

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
VMED = os.path.join(TARGET, "release", "vmed")
VMM = os.path.join(TARGET, "release", "vme-vmm")
IMAGES = os.path.join(TARGET, "images", "tiny-riscv64")
KERNEL = os.path.join(IMAGES, "Image")
INITRD = os.path.join(IMAGES, "initramfs.cpio")
VMS = int(os.environ.get("BENCH_VMED_VMS", "20"))
RSS_VMS = int(os.environ.get("BENCH_VMED_RSS_VMS", "50"))
RUNS = int(os.environ.get("BENCH_RUNS", "50"))
BOOT_VMS = int(os.environ.get("BENCH_VMED_BOOT_VMS", "4"))
RECORDS = 1000
READY = b"VME-GUEST-READY"
BOOT_TIMEOUT = 300
MEMORY = "64M"


def request(sock, method, path, body=None):
    """One HTTP/1.1 request over the daemon's Unix socket: (status, parsed JSON body)."""
    code, payload = request_raw(sock, method, path, body)
    return code, json.loads(payload) if payload else None


def request_raw(sock, method, path, body=None):
    """One HTTP/1.1 request over the daemon's Unix socket: (status, body bytes)."""
    data = b"" if body is None else json.dumps(body).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock)
        s.sendall(f"{method} {path} HTTP/1.1\r\nHost: vme\r\nConnection: close\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                  .encode() + data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, payload = reply.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), payload


def expect(sock, method, path, body, want):
    code, reply = request(sock, method, path, body)
    if code != want:
        # Printed here too: sys.exit on a worker thread of at_once is silent.
        print(f"{method} {path}: {code} {reply}", file=sys.stderr, flush=True)
        sys.exit(f"{method} {path}: {code} {reply}")
    return reply


def pct(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Daemon:
    def __init__(self, root):
        self.root = root
        self.sock = os.path.join(root, "vme.sock")
        self.proc = subprocess.Popen(
            [VMED, "--socket", self.sock, "--state-dir", os.path.join(root, "state"),
             "--stop-timeout", "1", "--cpu-overcommit", "100"] + os.environ.get("BENCH_VMED_ARGS", "").split(),
            stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                sys.exit("vmed did not open its socket")
            time.sleep(0.01)

    def create(self, name):
        expect(self.sock, "POST", "/1.0/vms", {"name": name, "arch": "riscv64",
               "kernel": KERNEL, "initrd": INITRD, "memory": MEMORY}, 201)

    def act(self, name, action):
        expect(self.sock, "PUT", f"/1.0/vms/{name}/state", {"action": action, "force": True},
               200)

    def close(self):
        self.proc.kill()
        self.proc.wait()


def at_once(n, work):
    """Runs work(i) for i in 0..n on n threads released together; their results in order."""
    results = [None] * n
    gate = threading.Barrier(n)

    def run(i):
        gate.wait()
        results[i] = work(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(r is None for r in results):
        sys.exit("a launch failed (see above)")
    return results


def same_machine(root, name, i):
    """vme-vmm's flags for the machine vmed gives a VM created as in Daemon.create: its
    cmdline, a vsock device, and the console on a socket with a ring-buffered log."""
    return [VMM, "--arch", "riscv64", "--kernel", KERNEL, "--initrd", INITRD, "--memory", MEMORY,
            "--cmdline", "console=ttyS0 quiet panic=-1",
            "--vsock", f"cid={1000 + i},uds={root}/{name}.vsock",
            "--serial", f"socket:{root}/{name}.console,log={root}/{name}.log,log_size=1048576"]


def monitors_by_hand(root, n):
    """Seconds from spawn to the control socket answering, for n monitors started at once."""
    def one(i):
        ctl = os.path.join(root, f"m{i}.sock")
        cmd = same_machine(root, f"m{i}", i) + ["--control-socket", ctl]
        start = time.monotonic()
        p = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, start_new_session=True)
        while True:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(ctl)
                    s.sendall(b'{"cmd":"status"}\n')
                    if s.recv(4096):
                        break
            except OSError:
                pass
            if p.poll() is not None:
                print(f"monitor {i} exited with {p.returncode}", file=sys.stderr)
                return None
            time.sleep(0.002)
        took = time.monotonic() - start
        procs[i] = p
        return took
    # Like the daemon's VMs, each keeps running (booting its guest) while the others start.
    procs = [None] * n
    try:
        return at_once(n, one)
    finally:
        for p in procs:
            if p:
                p.kill()
                p.wait()


def wait_for_ready(log, start, proc=None):
    """Seconds from start until the console log holds the guest's ready line."""
    while time.monotonic() - start < BOOT_TIMEOUT:
        try:
            with open(log, "rb") as f:
                if READY in f.read():
                    return time.monotonic() - start
        except FileNotFoundError:
            pass
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.01)
    print(f"no {READY.decode()} in {log}", file=sys.stderr)
    return None


def boots_by_hand(root, n):
    """Seconds from spawn to the guest's ready line, for n monitors started at once."""
    procs = [None] * n

    def one(i):
        log = os.path.join(root, f"boot{i}.log")
        start = time.monotonic()
        procs[i] = subprocess.Popen(
            same_machine(root, f"boot{i}", i) + ["--control-socket", f"{root}/boot{i}.ctl"],
            stderr=subprocess.DEVNULL, start_new_session=True)
        return wait_for_ready(log, start, procs[i])
    try:
        return at_once(n, one)
    finally:
        for p in procs:
            if p:
                p.kill()
                p.wait()


def main():
    for f in (VMED, VMM, KERNEL, INITRD):
        if not os.path.exists(f):
            sys.exit(f"{f} is missing: run `make build images` first")
    root = tempfile.mkdtemp(prefix="vme-bench-vmed-")
    daemon = None
    try:
        peer = monitors_by_hand(root, VMS)

        daemon = Daemon(root)
        idle_kib = rss_kib(daemon.proc.pid)

        def launch(i):
            start = time.monotonic()
            daemon.create(f"b{i}")
            daemon.act(f"b{i}", "start")
            return time.monotonic() - start
        ours = at_once(VMS, launch)
        for i in range(VMS):
            daemon.act(f"b{i}", "stop")
            expect(daemon.sock, "DELETE", f"/1.0/vms/b{i}", None, 200)

        peer_boot = boots_by_hand(root, BOOT_VMS)

        def launch_and_boot(i):
            start = time.monotonic()
            daemon.create(f"g{i}")
            daemon.act(f"g{i}", "start")
            return wait_for_ready(os.path.join(root, "state", "vms", f"g{i}", "console.log"),
                                  start)
        ours_boot = at_once(BOOT_VMS, launch_and_boot)
        for i in range(BOOT_VMS):
            daemon.act(f"g{i}", "stop")
            expect(daemon.sock, "DELETE", f"/1.0/vms/g{i}", None, 200)
        for tool, times in (("vme-vmm by hand", peer_boot), ("vmed", ours_boot)):
            print(json.dumps({"bench": "vmed create->guest ready", "tool": tool,
                              "vms": BOOT_VMS, "p50_ms": round(pct(times, 50) * 1e3, 1),
                              "p99_ms": round(pct(times, 99) * 1e3, 1)}), flush=True)

        for tool, times in (("vme-vmm by hand", peer), ("vmed", ours)):
            print(json.dumps({"bench": "vmed create->running", "tool": tool, "vms": VMS,
                              "p50_ms": round(pct(times, 50) * 1e3, 1),
                              "p99_ms": round(pct(times, 99) * 1e3, 1)}), flush=True)

        # 50 running VMs for the memory figure, then 1,000 records for the list.
        for i in range(RSS_VMS):
            daemon.create(f"r{i}")
            daemon.act(f"r{i}", "start")
        busy_kib = rss_kib(daemon.proc.pid)
        for i in range(RSS_VMS):
            daemon.act(f"r{i}", "stop")
        print(json.dumps({"bench": "vmed rss", "idle_kib": idle_kib,
                          f"with_{RSS_VMS}_vms_kib": busy_kib}), flush=True)

        for i in range(RSS_VMS, RECORDS):
            daemon.create(f"r{i}")
        lists = []
        for _ in range(RUNS):
            # Timed to the last byte received; the client's JSON parsing is not the daemon's.
            start = time.monotonic()
            code, payload = request_raw(daemon.sock, "GET", "/1.0/vms")
            lists.append(time.monotonic() - start)
            reply = json.loads(payload)
            if code != 200 or len(reply["metadata"]) != RECORDS:
                sys.exit(f"listed {len(reply['metadata'])} VMs, not {RECORDS}")
        print(json.dumps({"bench": "vmed list", "records": RECORDS,
                          "p50_ms": round(pct(lists, 50) * 1e3, 2),
                          "p99_ms": round(pct(lists, 99) * 1e3, 2)}), flush=True)

        print(f"ratio vmed create->running p50 ({VMS} at once): vmed / vme-vmm by hand = "
              f"{statistics.median(ours) / statistics.median(peer):.2f} (target <= 1.2)")
        print(f"ratio vmed create->guest ready p50 ({BOOT_VMS} at once): vmed / vme-vmm by "
              f"hand = {statistics.median(ours_boot) / statistics.median(peer_boot):.2f} "
              "(target <= 1.2)")
        print(f"ratio vmed list of {RECORDS}: p50 / 20 ms target = "
              f"{pct(lists, 50) / 0.020:.2f} (target <= 1)")
    finally:
        if daemon:
            daemon.close()
        # Monitors outlive their daemon by design: end this run's.
        subprocess.run(["pkill", "-KILL", "-f", root], check=False)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
