#!/usr/bin/env python3
"""Thin clone benchmark: giving a VM its own volume made from a 1 GiB image.

Host side (BENCH_RUNS runs, default 5, medians): `vme_api::overlay::thin_clone` (through the
`thin-clone` example binary, built here if missing) against `cp` + `sync FILE` of the same
base (the base is in the host's page cache for both, which favours cp), each into a new file
on the same file system. Measured: wall time, and the extra host disk the new volume takes
(st_blocks). thin_clone makes a reflink where the file system has them, else an overlay;
the line says which.

Guest side (riscv64 software machine, the tiny image, one hart): sequential O_DIRECT 1 MiB
reads and writes (busybox dd; the write ends with fsync) on a raw disk against an overlay on
a base with the same contents: reading the base through an empty overlay, writing (each
cluster allocated on first write), and reading again (now from the overlay). Times by the
guest's /proc/uptime (hundredths of a second), so sizes are a few hundred MiB.

Output: one JSON line per measurement, then ratio lines. Nothing fails on a ratio.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
VMM = os.path.join(TARGET, "release", "vme-vmm")
CLONE = os.path.join(TARGET, "release", "examples", "thin-clone")
IMAGES = os.path.join(TARGET, "images", "tiny-riscv64")
MIB = 1 << 20
GIB = 1 << 30
TIMEOUT = 600


def log(msg):
    print(f"bench/thin.py: {msg}", file=sys.stderr, flush=True)


def sig3(x):
    return float(f"{x:.3g}")


def make_base(path, size):
    """`size` bytes of random data (nothing for a file system to share or skip)."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MIB)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())


def used(path):
    return os.stat(path).st_blocks * 512


def timed(cmd):
    t = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t


def host(work, runs):
    base = os.path.join(work, "base.raw")
    log("writing a 1 GiB random base")
    make_base(base, GIB)
    with open(base, "rb") as f:  # into the page cache, for cp's sake
        while f.read(16 * MIB):
            pass
    out = {}
    kinds = set()
    for tool in ("thin-clone", "cp"):
        secs, space = [], []
        for i in range(runs):
            dest = os.path.join(work, f"{tool}-{i}")
            if tool == "cp":
                secs.append(timed(["sh", "-c", f'cp "{base}" "{dest}" && sync "{dest}"']))
            else:
                t = time.monotonic()
                made = subprocess.run([CLONE, base, dest], check=True, capture_output=True,
                                      text=True).stdout.split()[0]
                secs.append(time.monotonic() - t)
                kinds.add(made)
            space.append(used(dest))
            os.unlink(dest)
        line = {"bench": "thin", "side": "host", "tool": tool, "image_mib": GIB // MIB,
                "runs": runs, "median_ms": sig3(statistics.median(secs) * 1e3),
                "max_ms": sig3(max(secs) * 1e3),
                "extra_disk_kib": sig3(statistics.median(space) / 1024)}
        if tool == "thin-clone":
            line["made"] = ",".join(sorted(kinds))
        print(json.dumps(line), flush=True)
        out[tool] = line
    print(json.dumps({"bench": "thin-ratio", "measure": "time", "ratio": "thin-clone/cp",
                      "value": sig3(out["thin-clone"]["median_ms"] / out["cp"]["median_ms"])}),
          flush=True)
    os.unlink(base)


GUEST = ("t() {{ cut -d' ' -f1 /proc/uptime; }}; "
         "a=$(t); dd if=/dev/vda of=/dev/null bs=1M count={n} iflag=direct 2>/dev/null; "
         "echo IO read-base $a $(t); "
         "a=$(t); dd if=/dev/zero of=/dev/vda bs=1M count={n} oflag=direct conv=fsync,notrunc "
         "2>/dev/null; echo IO write-new $a $(t); "
         "a=$(t); dd if=/dev/zero of=/dev/vda bs=1M count={n} oflag=direct conv=fsync,notrunc "
         "2>/dev/null; echo IO rewrite $a $(t); "
         "a=$(t); dd if=/dev/vda of=/dev/null bs=1M count={n} iflag=direct 2>/dev/null; "
         "echo IO read-written $a $(t)")


def guest_run(disk, n):
    cmd = [VMM, "--arch", "riscv64", "--kernel", os.path.join(IMAGES, "Image"),
           "--initrd", os.path.join(IMAGES, "initramfs.cpio"), "--vcpus", "1",
           "--memory", "256M", "--disk", disk, "--cmdline",
           f'console=ttyS0 quiet panic=-1 vme.run="{GUEST.format(n=n)}"']
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    got = {}
    for line in p.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == "IO":
            secs = float(parts[3]) - float(parts[2])
            got[parts[1]] = n / max(secs, 0.01)
    if p.returncode != 0 or len(got) != 4:
        raise RuntimeError(f"vme-vmm exited {p.returncode}: {p.stderr[-400:]}")
    return got


def guest(work, runs, n):
    size = 2 * n * MIB
    base = os.path.join(work, "gbase.raw")
    make_base(base, size)
    samples = {"raw": {}, "overlay": {}}
    for i in range(runs):
        raw = os.path.join(work, "raw.img")
        subprocess.run(["cp", base, raw], check=True)
        ovl = os.path.join(work, "vm.ovl")
        subprocess.run([CLONE, base, ovl], check=True, stdout=subprocess.DEVNULL)
        for tool, disk in (("raw", f"path={raw}"), ("overlay", f"path={ovl},base={base}")):
            for k, v in guest_run(disk, n).items():
                samples[tool].setdefault(k, []).append(v)
        os.unlink(raw)
        os.unlink(ovl)
    med = {}
    for tool, per in samples.items():
        for k, vs in per.items():
            med[(tool, k)] = statistics.median(vs)
            print(json.dumps({"bench": "thin", "side": "guest", "arch": "riscv64", "tool": tool,
                              "measure": k, "mib": n, "runs": len(vs),
                              "median_mib_s": sig3(med[(tool, k)]),
                              "min_mib_s": sig3(min(vs)), "max_mib_s": sig3(max(vs))}),
                  flush=True)
    for k in ("read-base", "write-new", "rewrite", "read-written"):
        print(json.dumps({"bench": "thin-ratio", "measure": k, "ratio": "overlay/raw",
                          "value": sig3(med[("overlay", k)] / med[("raw", k)])}), flush=True)


def main():
    runs = int(os.environ.get("BENCH_RUNS", "5"))
    if not os.path.exists(CLONE):
        subprocess.run(["cargo", "build", "--release", "-p", "vme-api", "--example",
                        "thin-clone"], cwd=REPO, check=True)
    with tempfile.TemporaryDirectory(prefix="vme-bench-thin-", dir="/var/tmp") as work:
        host(work, runs)
        if os.path.exists(os.path.join(IMAGES, "Image")):
            guest(work, max(1, min(runs, 3)), int(os.environ.get("BENCH_THIN_MIB", "256")))
        else:
            log(f"no riscv64 image in {IMAGES}: `images/build.sh tiny-riscv64`; guest side skipped")


if __name__ == "__main__":
    sys.exit(main())
