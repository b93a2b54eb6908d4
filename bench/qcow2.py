#!/usr/bin/env python3
"""qcow2 import: conversion throughput of a BENCH_QCOW2_MIB (1024) MiB disk with about half
its clusters data (alternate MiBs random and zero), made qcow2 by `qemu-img convert -O qcow2`
(default 64 KiB clusters, uncompressed):

- `qcow2_to_raw` (vme-image's converter alone: sparse write, SHA-256 of every byte) against
  `qemu-img convert -O raw` of the same file (no hash), and against the same work done by
  the peers, `qemu-img convert -O raw` then `sha256sum` of the raw file; none fsyncs; MiB/s
  of the virtual size, median of BENCH_RUNS (3), the output removed between runs;
- the whole import, `vme image import NAME --kernel .. --disk D.qcow2` on the real daemon
  (the CLI hashes the file and converts it once without writing to learn the raw digest; the
  daemon receives the qcow2, checks its digest, converts, checks, fsyncs).

One JSON line per measurement, then the ratio vme / qemu-img.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vmed import Daemon, KERNEL, INITRD, TARGET  # noqa: E402

VME = os.path.join(TARGET, "release", "vme")
CONVERT = os.path.join(TARGET, "release", "examples", "qcow2_to_raw")
MIB = int(os.environ.get("BENCH_QCOW2_MIB", "1024"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))


def run(*args, env=None):
    r = subprocess.run(list(args), capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"{' '.join(args)}: {r.stderr}")
    return r.stdout


def timed(work):
    start = time.monotonic()
    work()
    return time.monotonic() - start


def main():
    for f in (VME, CONVERT, KERNEL, INITRD):
        if not os.path.exists(f):
            sys.exit(f"{f} is missing: cargo build --release --workspace --bins && "
                     "cargo build --release -p vme-image --examples; make images")
    root = tempfile.mkdtemp(prefix="vme-bench-qcow2-")
    try:
        raw = os.path.join(root, "disk.raw")
        with open(raw, "wb") as f:
            for i in range(MIB):
                f.write(os.urandom(1 << 20) if i % 2 == 0 else bytes(1 << 20))
        q = os.path.join(root, "disk.qcow2")
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, q)
        os.remove(raw)
        out = os.path.join(root, "out.raw")
        secs = {"vme-image qcow2_to_raw": [], "qemu-img convert -O raw": [],
                "qemu-img convert -O raw + sha256sum": []}
        qemu_img = ("qemu-img", "convert", "-f", "qcow2", "-O", "raw", q, out)
        for _ in range(RUNS):
            secs["vme-image qcow2_to_raw"].append(timed(lambda: run(CONVERT, q, out)))
            os.remove(out)
            secs["qemu-img convert -O raw"].append(timed(lambda: run(*qemu_img)))
            os.remove(out)
            secs["qemu-img convert -O raw + sha256sum"].append(
                timed(lambda: (run(*qemu_img), run("sha256sum", out))))
            os.remove(out)
        d = Daemon(root)
        try:
            env = {**os.environ, "VME_SOCKET": d.sock}
            imports = []
            for i in range(RUNS):
                imports.append(timed(lambda: run(
                    VME, "image", "import", f"q{i}", "--kernel", KERNEL, "--initrd", INITRD,
                    "--disk", q, "--arch", "riscv64", "--memory", "64M", env=env)))
                run(VME, "image", "rm", f"q{i}", env=env)
                run(VME, "image", "prune", env=env)
            secs["vme image import --disk D.qcow2 (whole import)"] = imports
        finally:
            d.close()
        mibps = {}
        for tool, s in secs.items():
            med = statistics.median(s)
            mibps[tool] = MIB / med
            print(json.dumps({"bench": "qcow2 to raw", "tool": tool, "virtual_mib": MIB,
                              "qcow2_mib": round(os.path.getsize(q) / (1 << 20), 1),
                              "runs": RUNS, "median_s": round(med, 3),
                              "mib_per_s": round(mibps[tool], 1)}))
        ours = mibps["vme-image qcow2_to_raw"]
        print("ratio qcow2 conversion throughput: vme-image / qemu-img = "
              f"{ours / mibps['qemu-img convert -O raw']:.2f}")
        print("ratio qcow2 conversion throughput: vme-image / (qemu-img + sha256sum) = "
              f"{ours / mibps['qemu-img convert -O raw + sha256sum']:.2f}")
    finally:
        subprocess.run(["pkill", "-KILL", "-f", root], check=False)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
