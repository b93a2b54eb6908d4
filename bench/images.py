#!/usr/bin/env python3
"""The image repository's costs, on the real daemon:

- import throughput (MiB/s) of a BENCH_IMAGE_MIB (512) MiB disk blob (plus the tiny riscv64
  kernel and initrd): `vme image import FILE.tar` (the daemon streams the archive in, hashes
  every byte, writes, fsyncs, renames) and `vme image import NAME --kernel .. --disk ..`
  (the CLI also hashes the files first to write the manifest), against the peer measured in
  the same run on the same file: `sha256sum FILE` then `cp FILE DEST` and `sync DEST`.
  Median of BENCH_RUNS (3); the image and its blobs are deleted between runs, so every
  import stores the blob anew.
- launch latency (create -> running, p50 of BENCH_IMAGE_LAUNCHES=5 riscv64 tiny VMs) from
  an image (its blobs' digests are checked at create and again at start) against the same
  VM from plain kernel and initrd paths.

One JSON line per measurement, then ratio lines (import: vme / (sha256sum + cp); launch:
from image / from paths).
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
from vmed import Daemon, KERNEL, INITRD, TARGET, expect, request  # noqa: E402

VME = os.path.join(TARGET, "release", "vme")
MIB = int(os.environ.get("BENCH_IMAGE_MIB", "512"))
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
LAUNCHES = int(os.environ.get("BENCH_IMAGE_LAUNCHES", "5"))


def vme(sock, *args):
    r = subprocess.run([VME, *args], env={**os.environ, "VME_SOCKET": sock},
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"vme {' '.join(args)}: {r.stderr}")
    return r.stdout


def timed(work):
    start = time.monotonic()
    work()
    return time.monotonic() - start


def main():
    for f in (VME, KERNEL, INITRD):
        if not os.path.exists(f):
            sys.exit(f"{f} is missing: cargo build --release, make images")
    root = tempfile.mkdtemp(prefix="vme-bench-images-")
    try:
        disk = os.path.join(root, "disk.raw")
        with open(disk, "wb") as f:
            for _ in range(MIB):
                f.write(os.urandom(1 << 20))
        total_mib = (MIB * (1 << 20) + os.path.getsize(KERNEL) + os.path.getsize(INITRD)) / (1 << 20)
        d = Daemon(root)
        try:
            sock = d.sock
            files = ["--kernel", KERNEL, "--initrd", INITRD, "--disk", disk,
                     "--arch", "riscv64", "--memory", "64M"]
            # The archive, once, for the FILE.tar imports.
            vme(sock, "image", "import", "seed", *files)
            tar = os.path.join(root, "seed.tar")
            vme(sock, "image", "export", "seed", tar)
            vme(sock, "image", "rm", "seed")

            def reset(name):
                vme(sock, "image", "rm", name)
                vme(sock, "image", "prune")

            results = {"vme image import FILE.tar": [], "vme image import --kernel --disk": [],
                       "sha256sum + cp + sync": []}
            for i in range(RUNS):
                results["vme image import FILE.tar"].append(
                    timed(lambda: vme(sock, "image", "import", tar, "--name", f"t{i}")))
                reset(f"t{i}")
                results["vme image import --kernel --disk"].append(
                    timed(lambda: vme(sock, "image", "import", f"f{i}", *files)))
                reset(f"f{i}")
                dest = os.path.join(root, "copy")

                def peer():
                    for src in (KERNEL, INITRD, disk):
                        subprocess.run(["sha256sum", src], check=True, capture_output=True)
                        subprocess.run(["cp", src, dest], check=True)
                        subprocess.run(["sync", dest], check=True)
                results["sha256sum + cp + sync"].append(timed(peer))
                os.remove(dest)
            mibps = {}
            for tool, secs in results.items():
                med = statistics.median(secs)
                mibps[tool] = total_mib / med
                print(json.dumps({"bench": "image import", "tool": tool, "mib": round(total_mib, 1),
                                  "runs": RUNS, "median_s": round(med, 3),
                                  "mib_per_s": round(mibps[tool], 1)}))

            # Launch latency: from an image vs from paths.
            vme(sock, "image", "import", "tiny", "--kernel", KERNEL, "--initrd", INITRD,
                "--arch", "riscv64", "--memory", "64M")
            lat = {"from image": [], "from paths": []}
            for i in range(LAUNCHES):
                for tool, body in (("from image", {"name": f"i{i}", "image": "tiny"}),
                                   ("from paths", {"name": f"p{i}", "arch": "riscv64",
                                                   "kernel": KERNEL, "initrd": INITRD,
                                                   "memory": "64M"})):
                    start = time.monotonic()
                    expect(sock, "POST", "/1.0/vms", body, 201)
                    expect(sock, "PUT", f"/1.0/vms/{body['name']}/state", {"action": "start"}, 200)
                    lat[tool].append(time.monotonic() - start)
                    request(sock, "PUT", f"/1.0/vms/{body['name']}/state",
                            {"action": "stop", "force": True})
            for tool, secs in lat.items():
                print(json.dumps({"bench": "launch", "tool": tool, "vms": LAUNCHES,
                                  "p50_ms": round(statistics.median(secs) * 1000, 1)}))
        finally:
            d.close()
        peer = mibps["sha256sum + cp + sync"]
        for tool in ("vme image import FILE.tar", "vme image import --kernel --disk"):
            print(f"ratio image import throughput: {tool} / (sha256sum + cp + sync) = "
                  f"{mibps[tool] / peer:.2f}")
        print(f"ratio launch p50: from image / from paths = "
              f"{statistics.median(lat['from image']) / statistics.median(lat['from paths']):.2f}")
    finally:
        subprocess.run(["pkill", "-KILL", "-f", root], check=False)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
