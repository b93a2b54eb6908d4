#!/usr/bin/env python3
"""What the audit log adds to a request: the same daemon, the same route-less path, recorded
or not.

`POST /1.0/no-such-route` is answered 404 and recorded (a state-changing method: its record is
durable before the reply); `GET /1.0/no-such-route` is answered 404 the same way and not recorded
(a read). The difference of the two is the cost of one durable append (one WAL sync). Then
BENCH_AUDIT_CLIENTS (20) clients POST at once, to show the appends sharing their syncs (group
commit). BENCH_RUNS (500) requests each; one JSON line per measurement.
"""

import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
VMED = os.path.join(TARGET, "release", "vmed")
VMM = os.path.join(TARGET, "release", "vme-vmm")
RUNS = int(os.environ.get("BENCH_RUNS", "500"))
CLIENTS = int(os.environ.get("BENCH_AUDIT_CLIENTS", "20"))


def request(sock, method, path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock)
    s.sendall(
        f"{method} {path} HTTP/1.1\r\nHost: vme\r\nConnection: close\r\n"
        "Content-Length: 0\r\n\r\n".encode()
    )
    out = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        out += b
    s.close()
    return int(out.split(b" ")[1])


def timed(sock, method, n):
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        assert request(sock, method, "/1.0/no-such-route") == 404
        lat.append((time.perf_counter() - t) * 1000)
    return lat


def line(what, lat):
    lat = sorted(lat)
    print(json.dumps({
        "bench": "audit", "what": what, "requests": len(lat),
        "p50_ms": round(statistics.median(lat), 3),
        "p99_ms": round(lat[int(len(lat) * 0.99) - 1], 3),
        "mean_ms": round(statistics.mean(lat), 3),
    }), flush=True)
    return statistics.median(lat)


def main():
    dir = tempfile.mkdtemp(prefix="vme-bench-audit-")
    sock = os.path.join(dir, "vme.sock")
    vmed = subprocess.Popen(
        [VMED, "--socket", sock, "--state-dir", os.path.join(dir, "state"), "--vmm", VMM,
         "--cgroups", "false"],
        stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 10
        while not os.path.exists(sock):
            assert time.time() < deadline, "vmed did not open its socket"
            time.sleep(0.02)
        time.sleep(0.2)
        # Alternating halves, so drift in the host's load hits both alike.
        reads, writes = [], []
        for _ in range(5):
            reads += timed(sock, "GET", RUNS // 5)
            writes += timed(sock, "POST", RUNS // 5)
        r = line("GET, not recorded", reads)
        w = line("POST, recorded", writes)
        print(json.dumps({"bench": "audit", "what": "added per recorded request",
                          "p50_ms": round(w - r, 3)}), flush=True)
        lat, lock = [], threading.Lock()

        def client():
            got = timed(sock, "POST", max(RUNS // CLIENTS, 1))
            with lock:
                lat.extend(got)
        t = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t
        line(f"POST, recorded, {CLIENTS} clients at once", lat)
        print(json.dumps({"bench": "audit", "what": f"recorded requests per second, {CLIENTS} "
                          "clients", "value": round(len(lat) / wall)}), flush=True)
    finally:
        vmed.kill()
        vmed.wait()
        shutil.rmtree(dir, ignore_errors=True)


if __name__ == "__main__":
    main()
