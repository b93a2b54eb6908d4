#!/usr/bin/env python3
"""Disk and network benchmark: vme-vmm against QEMU and the host, in one run.

Measures, on one virtio disk and one virtio-net device per VM:
  seq-read / seq-write  busybox dd, 1 MiB blocks, O_DIRECT in the guest (write ends with fsync)
  rand-read-4k          4 KiB reads at random offsets, queue depth 1, O_DIRECT (guest/vme-io.c)
  tcp-guest-to-host     busybox nc in the guest to a host listener (nc moves 1 KiB per system
  tcp-host-to-guest     call, so the guest's CPU sets its pace), and a host sender to nc
  tcp-*-bulk            the same with 256 KiB system calls (vme-io send/recv): the device path
and the host's own throughput on the same file and regions (O_DIRECT, same block sizes).
The guest side is busybox plus vme-io, a static C helper built here for the guest's
architecture and appended to the image's initramfs as a second cpio archive (with the run's
script), for the bench only; the image itself stays untouched.

riscv64: vme-vmm's software machine against qemu-system-riscv64 -M virt (TCG), same kernel
Image and initramfs, virtio-mmio on both (virtio-blk-device, virtio-net-device, vhost off),
BENCH_RUNS (3) runs alternating host / vme-vmm / QEMU. x86_64: one vme-vmm boot (about two
minutes on PVM hosts); QEMU (q35, virtio-pci, vhost off) is tried too and its line carries its
failure where it cannot start. BENCH_IO_ARCHES picks the architectures (default both).

Times: disk steps by the guest's CLOCK_MONOTONIC around the step (vme-io now: busybox's date
has no %N and /proc/uptime counts hundredths); the guest clocks of all three machines follow
host time. TCP by the receiver: guest -> host from the host listener's first byte to EOF,
host -> guest by the guest's clock around nc. Bytes are counted on both sides.

Each VM runs in a network namespace created and deleted here; its tap exists only there and
the traffic goes only between the guest and the namespace. The disk image (random bytes) is
evicted from the host's page cache before every host measurement and every boot, so every
first read reaches the host's disk.

Output: one JSON line per tool and measurement, then one line per ratio. Ratios with a target
say whether it is met; nothing fails on a ratio.
"""

import json
import mmap
import os
import random
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time

MIB = 1 << 20
TAP = "vmebench0"
GUEST_IP, HOST_IP = "10.0.2.15", "10.0.2.1"
MAC = "52:54:00:12:34:56"

# Modest sizes, in MiB unless named: the riscv64 machines are interpreters (hundreds of MiB/s
# at most); x86_64 guests on PVM hosts move well under 1 MiB/s (a 4 KiB read takes ~20-30 ms
# there), so they get small sizes. step_s bounds each guest step (busybox timeout), vm_s the
# whole run including the boot.
SIZES = {
    "riscv64": {"seq_mib": 32, "rand_span_mib": 64, "rand_ops": 2000, "net_mib": 16,
                "step_s": 120, "vm_s": 400},
    "x86_64": {"seq_mib": 4, "rand_span_mib": 64, "rand_ops": 100, "net_mib": 0.5,
               "step_s": 150, "vm_s": 1500},
}

# The guest side of one run, run by /init as vme.run="sh /vme-bench.sh". busybox ash; every
# step is bounded by `timeout` so one stuck step still leaves the others' figures.
GUEST_SCRIPT = r"""
now() {{ /bin/vme-io now; }}
t() {{ timeout {step_s} "$@"; }}
# exit=143: the step ran out of time (timeout sent SIGTERM).
fail() {{ echo "VME-IO-ERROR $1 exit=$2 $(tail -n 1 /tmp/err 2>/dev/null)"; }}
a=$(now)
if t dd if=/dev/vda of=/dev/null bs=1M count={seq} iflag=direct 2>/tmp/err; then
	echo "VME-IO seq-read bytes={seq_bytes} t0=$a t1=$(now)"
else fail seq-read $?; fi
a=$(now)
if t dd if=/dev/zero of=/dev/vda bs=1M count={seq} seek={seq} oflag=direct conv=fsync,notrunc 2>/tmp/err; then
	echo "VME-IO seq-write bytes={seq_bytes} t0=$a t1=$(now)"
else fail seq-write $?; fi
if r=$(t /bin/vme-io randread /dev/vda {rand_first} {rand_span} {rand_ops} {seed} 2>/tmp/err); then
	echo "VME-IO rand-read-4k $r"
else fail rand-read-4k $?; fi
{{ ip addr add {guest_ip}/24 dev eth0 && ip link set eth0 up; }} || fail net-setup $?
i=0
until ping -c 1 -W 1 {host_ip} >/dev/null 2>&1; do
	i=$((i + 1)); [ $i -lt 30 ] || break
done
# nc moves 1 KiB per system call: its input and output are tmpfs files, not pipes, so no
# second process competes with it for the guest's CPU.
dd if=/dev/zero of=/tmp/tx bs=64k count={net_blocks} 2>/dev/null
a=$(now)
if t nc {host_ip} 9000 </tmp/tx 2>/tmp/err; then
	echo "VME-IO tcp-guest-to-host bytes=$(wc -c </tmp/tx) t0=$a t1=$(now)"
else fail tcp-guest-to-host $?; fi
rm -f /tmp/tx
a=$(now)
if t nc {host_ip} 9001 </dev/null >/tmp/rx 2>/tmp/err; then
	b=$(now)
	echo "VME-IO tcp-host-to-guest bytes=$(wc -c </tmp/rx) t0=$a t1=$b"
else fail tcp-host-to-guest $?; fi
rm -f /tmp/rx
if r=$(t /bin/vme-io send {host_ip} 9002 {net_bytes} 2>/tmp/err); then
	echo "VME-IO tcp-guest-to-host-bulk $r"
else fail tcp-guest-to-host-bulk $?; fi
if r=$(t /bin/vme-io recv {host_ip} 9003 2>/tmp/err); then
	echo "VME-IO tcp-host-to-guest-bulk $r"
else fail tcp-host-to-guest-bulk $?; fi
"""

# The host end of the TCP measurements, run inside the namespace: one connection per port, in
# order; "sink:PORT" reads to EOF and prints SINK PORT bytes seconds (first byte to EOF),
# "source:PORT" sends argv[1] bytes and prints SOURCE PORT bytes. argv[2] bounds each wait.
HOST_PEER = r"""
import socket, sys, time
total, wait = int(sys.argv[1]), float(sys.argv[2])
roles = [r.split(":") for r in sys.argv[3:]]
def listen(port):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(port)))
    s.listen(1)
    s.settimeout(wait)
    return s
socks = [listen(port) for _, port in roles]
print("LISTENING", flush=True)
chunk = memoryview(bytes(1 << 20))
for (role, port), s in zip(roles, socks):
    c, _ = s.accept()
    if role == "sink":
        got, t0 = 0, None
        while True:
            b = c.recv(1 << 20)
            if not b:
                break
            if t0 is None:
                t0 = time.monotonic()
            got += len(b)
        secs = time.monotonic() - (t0 or time.monotonic())
        c.close()
        print("SINK", port, got, "%.6f" % secs, flush=True)
        continue
    sent = 0
    while sent < total:
        sent += c.send(chunk[:min(len(chunk), total - sent)])
    c.shutdown(socket.SHUT_WR)
    # The guest closes once it has read everything; closing first could reset the connection.
    c.settimeout(wait)
    try:
        while c.recv(65536):
            pass
    except OSError:
        pass
    c.close()
    print("SOURCE", port, sent, flush=True)
"""
PEER_ROLES = ["sink:9000", "source:9001", "sink:9002", "source:9003"]


def fail(msg):
    print(f"bench/io.py: {msg}", file=sys.stderr)
    sys.exit(1)


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# ---------------------------------------------------------------- the extra initramfs

def cpio_newc(entries):
    """A newc cpio archive of (name, mode, data) entries, with fixed owner and mtime."""
    out = bytearray()

    def add(name, mode, data, ino):
        name_b = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name_b), 0]
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + name_b)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for i, (name, mode, data) in enumerate(entries):
        add(name, mode, data, 0x7E00 + i)
    add("TRAILER!!!", 0, b"", 0)
    out.extend(b"\0" * (-len(out) % 512))
    return bytes(out)


def build_helper(arch, work, repo):
    """vme-io, static, for the guest's architecture."""
    cc = {"riscv64": "riscv64-linux-gnu-gcc", "x86_64": "gcc"}[arch]
    if not shutil.which(cc):
        fail(f"{cc} is missing: apt-get install "
             f"{'gcc-riscv64-linux-gnu' if arch == 'riscv64' else 'gcc'} (scripts/setup.sh does)")
    out = os.path.join(work, f"vme-io-{arch}")
    r = run([cc, "-static", "-O2", "-Wall", "-o", out,
             os.path.join(repo, "bench", "guest", "vme-io.c")])
    if r.returncode != 0:
        fail(f"building the guest helper with {cc} failed:\n{r.stderr}")
    return out


def bench_initrd(arch, image_dir, work, repo, sizes, seed):
    """The image's initramfs followed by a second archive with vme-io and the run's script
    (Linux unpacks concatenated archives in order); the image itself stays untouched."""
    seq = sizes["seq_mib"]
    script = GUEST_SCRIPT.format(
        seq=seq, seq_bytes=seq * MIB, rand_first=2 * seq, rand_span=sizes["rand_span_mib"],
        rand_ops=sizes["rand_ops"], seed=seed, guest_ip=GUEST_IP, host_ip=HOST_IP,
        step_s=sizes["step_s"],
        net_blocks=int(sizes["net_mib"] * 16), net_bytes=int(sizes["net_mib"] * MIB))
    with open(build_helper(arch, work, repo), "rb") as f:
        helper = f.read()
    extra = cpio_newc([("bin", 0o40755, b""), ("bin/vme-io", 0o100755, helper),
                       ("vme-bench.sh", 0o100644, script.encode())])
    with open(os.path.join(image_dir, "initramfs.cpio"), "rb") as f:
        base = f.read()
    path = os.path.join(work, f"initramfs-{arch}.cpio")
    with open(path, "wb") as f:
        f.write(base + b"\0" * (-len(base) % 512) + extra)
    return path


# ---------------------------------------------------------------- the disk image and the host

def make_disk(path, size):
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(os.urandom(MIB))
        f.flush()
        os.fsync(f.fileno())


def evict(path):
    """Drops the file's pages from the host's page cache (only this file's: the host is
    shared), so the next read reaches the disk."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def host_baseline(path, sizes, seed):
    """The host's own throughput on the file: the guest's regions, sizes and flags."""
    seq = sizes["seq_mib"]
    buf = mmap.mmap(-1, MIB)  # page-aligned, as O_DIRECT needs
    res = {}
    evict(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        t0 = time.monotonic()
        for i in range(seq):
            if os.preadv(fd, [buf], i * MIB) != MIB:
                fail(f"short O_DIRECT read from {path}")
        res["seq-read"] = {"bytes": seq * MIB, "secs": time.monotonic() - t0}
        small = memoryview(buf)[:4096]
        rng = random.Random(seed)
        first, blocks = 2 * seq * MIB, sizes["rand_span_mib"] * MIB // 4096
        ops = sizes["rand_ops"]
        t0 = time.monotonic()
        for _ in range(ops):
            os.preadv(fd, [small], first + rng.randrange(blocks) * 4096)
        res["rand-read-4k"] = {"ops": ops, "secs": time.monotonic() - t0}
    finally:
        os.close(fd)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        t0 = time.monotonic()
        for i in range(seq):
            os.pwritev(fd, [buf], (seq + i) * MIB)
        os.fsync(fd)
        res["seq-write"] = {"bytes": seq * MIB, "secs": time.monotonic() - t0}
    finally:
        os.close(fd)
    return res


# ---------------------------------------------------------------- one VM run

class Netns:
    """A network namespace for one VM, deleted (with what runs in it) on exit."""

    def __init__(self, tag):
        self.name = f"vme-bench-{os.getpid()}-{tag}"
        run(["ip", "netns", "del", self.name])
        r = run(["ip", "netns", "add", self.name])
        if r.returncode != 0:
            fail(f"ip netns add {self.name}: {r.stderr.strip()} (the bench needs root)")
        self.procs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        run(["ip", "netns", "del", self.name])

    def spawn(self, cmd, **kw):
        p = subprocess.Popen(["ip", "netns", "exec", self.name] + cmd, stdin=subprocess.DEVNULL,
                             start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def configure_tap(self, deadline):
        """Waits for the VM's monitor to create the tap, then addresses it and brings it up."""
        while run(["ip", "-n", self.name, "link", "show", TAP]).returncode != 0:
            if time.monotonic() > deadline:
                return f"the monitor did not create tap {TAP}"
            time.sleep(0.02)
        for args in (["addr", "add", f"{HOST_IP}/24", "dev", TAP], ["link", "set", TAP, "up"]):
            r = run(["ip", "-n", self.name] + args)
            if r.returncode != 0:
                return f"ip {' '.join(args)}: {r.stderr.strip()}"
        return None


def read_line(proc, deadline):
    """One line of a helper's stdout, or None by the deadline."""
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            return None
        c = os.read(proc.stdout.fileno(), 1)
        if not c:
            return None
        line += c
    return line.decode(errors="replace").strip()


def vm_run(tool, cmd, sizes, timeout, log_dir):
    """Boots one VM in its own namespace, runs the guest script, returns (results, error)."""
    results = {}
    with Netns(tool) as ns:
        net_bytes = str(int(sizes["net_mib"] * MIB))
        peer = ns.spawn(["python3", "-c", HOST_PEER, net_bytes, str(timeout)] + PEER_ROLES,
                        stdout=subprocess.PIPE)
        start = time.monotonic()
        if read_line(peer, start + 30) != "LISTENING":
            return results, "the host-side TCP peer did not start"
        err_path = os.path.join(log_dir, f"{tool}.stderr")
        with open(err_path, "wb") as err:
            vm = ns.spawn(cmd, stdout=subprocess.PIPE, stderr=err)
        tap_error = ns.configure_tap(start + 30)
        buf, error = b"", None
        while True:
            left = start + timeout - time.monotonic()
            if left <= 0:
                error = f"the guest did not finish within {timeout:.0f} s"
                break
            if not select.select([vm.stdout], [], [], min(left, 1.0))[0]:
                continue
            chunk = os.read(vm.stdout.fileno(), 65536)
            if not chunk:
                with open(err_path, errors="replace") as f:
                    tail = f.read().strip().splitlines()[-3:]
                out = buf.decode(errors="replace").strip().splitlines()[-3:]
                error = "exited before the guest finished: " + " | ".join(tail + out)
                break
            buf += chunk
            if b"VME-RUN-EXIT" in buf:
                break
        console = buf.decode(errors="replace")
        for m in re.finditer(r"VME-IO (\S+) ([^\r\n]*)", console):
            fields = dict(kv.split("=", 1) for kv in m.group(2).split() if "=" in kv)
            results[m.group(1)] = fields
        for m in re.finditer(r"VME-IO-ERROR (\S+) ?([^\r\n]*)", console):
            results[m.group(1)] = {"error": m.group(2).strip() or "failed"}
        if error is None and "VME-IO" not in console:
            error = "the guest printed no measurement"
        if tap_error and not error:
            error = tap_error
        # The peer has reported by now if the guest got through the TCP steps.
        for _ in PEER_ROLES:
            line = read_line(peer, time.monotonic() + 5)
            if line is None:
                break
            word, port, *rest = line.split()
            results.setdefault("host-peer", {})[port] = rest
    return results, error


def sig3(v):
    """Three significant digits: figures span 0.01 MiB/s (x86_64 on PVM) to GiB/s."""
    return float(f"{v:.3g}")


def mib_s(nbytes, secs):
    return nbytes / MIB / max(secs, 1e-9)


def samples_of(results):
    """Per measurement: a throughput (MiB/s) or IOPS sample from one run's results, with the
    bytes each side counted for the TCP steps."""
    out = {}
    for name in ("seq-read", "seq-write"):
        r = results.get(name, {})
        if "t0" in r:
            out[name] = {"value": mib_s(int(r["bytes"]), float(r["t1"]) - float(r["t0"]))}
        elif "error" in r:
            out[name] = {"error": r["error"]}
    r = results.get("rand-read-4k", {})
    if "ns" in r:
        out["rand-read-4k"] = {"value": int(r["ops"]) / max(int(r["ns"]) / 1e9, 1e-9)}
    elif "error" in r:
        out["rand-read-4k"] = {"error": r["error"]}
    peer = results.get("host-peer", {})
    for name, port in (("tcp-guest-to-host", "9000"), ("tcp-guest-to-host-bulk", "9002")):
        r = results.get(name, {})
        if port in peer and "bytes" in r:
            got, secs = int(peer[port][0]), float(peer[port][1])
            sent = int(r["bytes"])
            out[name] = {"value": mib_s(got, secs), "sent": sent, "received": got}
            if got != sent:
                out[name]["error"] = f"the host received {got} of {sent} bytes"
        elif "error" in r:
            out[name] = {"error": r["error"]}
    for name, port in (("tcp-host-to-guest", "9001"), ("tcp-host-to-guest-bulk", "9003")):
        r = results.get(name, {})
        if port in peer and "bytes" in r:
            got, sent = int(r["bytes"]), int(peer[port][0])
            secs = int(r["ns"]) / 1e9 if "ns" in r else float(r["t1"]) - float(r["t0"])
            out[name] = {"value": mib_s(got, secs), "sent": sent, "received": got}
            if got != sent:
                out[name]["error"] = f"the guest received {got} of {sent} bytes"
        elif "error" in r:
            out[name] = {"error": r["error"]}
    return out


# ---------------------------------------------------------------- tools per architecture

def tools_for(arch, target, initrd, disk, mem):
    vmm = os.path.join(target, "release", "vme-vmm")
    cmdline = 'console=ttyS0 quiet panic=-1 vme.run="sh /vme-bench.sh"'
    qemu_dev = ["-drive", f"file={disk},if=none,id=d0,format=raw",
                "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off"]
    common = ["-m", mem, "-smp", "1", "-nographic", "-nodefaults", "-no-reboot", "-serial",
              "stdio", "-initrd", initrd, "-append", cmdline]
    vme_dev = ["--disk", f"path={disk}", "--net", f"tap={TAP},mac={MAC}", "--rng", "off"]
    if arch == "riscv64":
        kernel = os.path.join(target, "images", "tiny-riscv64", "Image")
        tools = {"vme-vmm": [vmm, "--arch", "riscv64", "--kernel", kernel, "--initrd", initrd,
                             "--memory", mem, "--vcpus", "1", "--cmdline", cmdline] + vme_dev}
        qemu = shutil.which("qemu-system-riscv64")
        if qemu:
            tools["qemu-tcg-virt"] = [
                qemu, "-M", "virt", "-accel", "tcg", "-bios", "default", "-kernel", kernel,
                "-device", "virtio-blk-device,drive=d0",
                "-device", f"virtio-net-device,netdev=n0,mac={MAC}"] + qemu_dev + common
        return tools
    kernel = os.path.join(target, "images", "tiny", "vmlinux")
    tools = {"vme-vmm": [vmm, "--kernel", kernel, "--initrd", initrd, "--memory", mem,
                         "--vcpus", "1", "--cmdline", cmdline] + vme_dev}
    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        tools["qemu-q35"] = [
            qemu, "-M", "q35", "-enable-kvm", "-cpu", "host", "-kernel", kernel,
            "-device", "virtio-blk-pci,drive=d0",
            "-device", f"virtio-net-pci,netdev=n0,mac={MAC}"] + qemu_dev + common
    return tools


def workload(name, sizes):
    """What one measurement moved, for its JSON line."""
    if name.startswith("seq-"):
        return {"mib": sizes["seq_mib"], "block_kib": 1024}
    if name.startswith("rand-"):
        return {"ops": sizes["rand_ops"], "span_mib": sizes["rand_span_mib"], "block_kib": 4}
    return {"mib": sizes["net_mib"], "chunk_kib": 256 if name.endswith("-bulk") else 1}


RATIOS = [
    # (measure, numerator, denominator, target)
    ("seq-read", "vme-vmm", "host", 0.8),
    ("rand-read-4k", "vme-vmm", "qemu", 1.0),
    ("tcp-guest-to-host", "vme-vmm", "qemu", 1.0),
    ("tcp-host-to-guest", "vme-vmm", "qemu", 1.0),
    ("tcp-guest-to-host-bulk", "vme-vmm", "qemu", 1.0),
    ("tcp-host-to-guest-bulk", "vme-vmm", "qemu", 1.0),
    ("seq-read", "vme-vmm", "qemu", None),
    ("seq-write", "vme-vmm", "qemu", None),
    ("seq-write", "vme-vmm", "host", None),
]
UNITS = {"rand-read-4k": "iops"}


def bench_arch(arch, repo, target, work, runs):
    sizes = SIZES[arch]
    seed = 20261202
    image_dir = os.path.join(target, "images", "tiny-riscv64" if arch == "riscv64" else "tiny")
    if not os.path.isdir(image_dir):
        fail(f"{image_dir} is missing: run `make images` (or images/build.sh all) first")
    disk = os.path.join(work, "disk.img")
    make_disk(disk, (2 * sizes["seq_mib"] + sizes["rand_span_mib"]) * MIB)
    initrd = bench_initrd(arch, image_dir, work, repo, sizes, seed)
    tools = tools_for(arch, target, initrd, disk, os.environ.get("BENCH_MEMORY", "256M"))
    timeout = float(os.environ.get("BENCH_IO_TIMEOUT", sizes["vm_s"]))
    samples = {name: {} for name in ["host"] + list(tools)}
    failures = {}
    for _ in range(runs):
        host = host_baseline(disk, sizes, seed)
        for name, r in host.items():
            v = r["bytes"] / MIB / r["secs"] if "bytes" in r else r["ops"] / r["secs"]
            samples["host"].setdefault(name, []).append({"value": v})
        for tool, cmd in tools.items():
            if tool in failures:
                continue
            evict(disk)
            results, error = vm_run(tool, cmd, sizes, timeout, work)
            try:
                got = samples_of(results)
            except (KeyError, ValueError, IndexError) as e:
                got, error = {}, f"unreadable guest output ({e!r}): {results}"
            if error and not got and tool != "vme-vmm":
                failures[tool] = error  # a peer that cannot run here is tried once
                continue
            if error:
                failures.setdefault(f"{tool} (a run)", error)
            for name, s in got.items():
                samples[tool].setdefault(name, []).append(s)
    medians = {}
    for tool, per in samples.items():
        if tool in failures:
            print(json.dumps({"bench": "io", "arch": arch, "tool": tool,
                              "failure": failures[tool]}), flush=True)
            continue
        for name, ss in per.items():
            ok = [s["value"] for s in ss if "error" not in s]
            unit = UNITS.get(name, "mib_s")
            line = {"bench": "io", "arch": arch, "tool": tool, "measure": name, "runs": len(ss),
                    "ok": len(ok), **workload(name, sizes)}
            if ok:
                medians[(tool, name)] = statistics.median(ok)
                line[f"median_{unit}"] = sig3(statistics.median(ok))
                line[f"min_{unit}"] = sig3(min(ok))
                line[f"max_{unit}"] = sig3(max(ok))
            counted = [(s["sent"], s["received"]) for s in ss if "sent" in s]
            if counted:
                line["bytes_sent_received"] = counted
            errors = sorted({s["error"] for s in ss if "error" in s})
            if errors:
                line["errors"] = errors
            print(json.dumps(line), flush=True)
    for key, error in failures.items():
        if key.endswith("(a run)"):
            print(json.dumps({"bench": "io", "arch": arch, "tool": key.split()[0],
                              "warning": error}), flush=True)
    peer = next((t for t in tools if t.startswith("qemu")), None)
    for name, num, den, want in RATIOS:
        den_tool = peer if den == "qemu" else den
        line = {"bench": "io-ratio", "arch": arch, "measure": name,
                "ratio": f"{num}/{den_tool or 'qemu'}"}
        a, b = medians.get((num, name)), medians.get((den_tool, name))
        if a is not None and b:
            line["value"] = sig3(a / b)
        else:
            line["value"] = None
            if not den_tool:
                line["why"] = "QEMU is not installed"
            elif den_tool in failures:
                line["why"] = f"{den_tool} cannot run here (its line says why)"
            else:
                line["why"] = "no figure for one side (see the tool lines)"
        if want is not None:
            line["target"] = f">= {want}"
            if line["value"] is not None:
                line["met"] = line["value"] >= want
        print(json.dumps(line), flush=True)


def main():
    if os.geteuid() != 0:
        fail("needs root: it creates network namespaces and tap devices")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(repo, "target"))
    if not os.access(os.path.join(target, "release", "vme-vmm"), os.X_OK):
        fail(f"{target}/release/vme-vmm is missing: run `make build` first")
    work = os.path.join(target, f"bench-io-{os.getpid()}")
    os.makedirs(work, exist_ok=True)
    runs = int(os.environ.get("BENCH_RUNS", "3"))
    try:
        for arch in os.environ.get("BENCH_IO_ARCHES", "riscv64 x86_64").split():
            if arch not in SIZES:
                fail(f"BENCH_IO_ARCHES: unknown architecture {arch!r} (riscv64, x86_64)")
            # One x86_64 boot per bench run: on PVM hosts each takes minutes.
            bench_arch(arch, repo, target, work, runs if arch == "riscv64" else 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
