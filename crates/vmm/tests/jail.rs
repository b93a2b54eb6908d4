//! `--jail`: a jailed monitor boots a real guest that reports normally, and from the host we
//! check what it became: its uid/gid, no capabilities, no_new_privs, seccomp, namespaces of its
//! own, and a root holding only its files. Then the redundancy matrix (DESIGN.md principle
//! 3) with escape drills over the control socket (test-only `seccomp-drill` feature): each
//! mechanism refuses on its own with the other off.
//!
//! Needs root (the jail does). The x86_64 test boots on KVM: run this file under
//! `flock /tmp/vme-x86-boot.lock`.

mod common;

use common::{VMM, Vm, image, kvm_available, riscv_tiny_args, temp_dir};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Generous for an interpreted guest on a loaded 2-core host.
const TIMEOUT: Duration = Duration::from_secs(600);
const SECCOMP_EXIT: i32 = 159;

/// A directory the jail's uid can create sockets in.
fn owned_dir(path: &Path, id: u32) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    chown(path, Some(id), Some(id)).unwrap();
    path.to_path_buf()
}

/// A 1 MiB volume owned by `id`, mode 0600.
fn volume(path: &Path, id: u32) -> PathBuf {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, vec![0x5a; 1 << 20]).unwrap();
    chown(path, Some(id), Some(id)).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path.to_path_buf()
}

fn jail_args(dir: &Path, id: u32) -> Vec<String> {
    vec![
        "--jail".into(),
        dir.display().to_string(),
        "--jail-uid".into(),
        id.to_string(),
        "--jail-gid".into(),
        id.to_string(),
    ]
}

/// The jailed child of keeper `pid` (the process that runs the VM).
fn jailed_child(pid: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(c) = c.split_whitespace().next() {
            return c.parse().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "monitor {pid} has no jailed child"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn status_field(pid: u32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// Everything but directories under the jailed process's root, as paths inside it (its
/// /proc and the host's /sys marker left out).
fn visible_files(pid: u32) -> BTreeSet<String> {
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut out = BTreeSet::new();
    let mut todo = vec![root.clone()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let inside = Path::new("/").join(e.path().strip_prefix(&root).unwrap());
            if inside == Path::new("/proc") || inside == Path::new("/sys") {
                continue;
            }
            match e.file_type().unwrap().is_dir() {
                true => todo.push(e.path()),
                false => {
                    out.insert(inside.display().to_string());
                }
            }
        }
    }
    out
}

/// What every jailed monitor must be, seen from the host through /proc.
fn check_confined(child: u32, id: u32) {
    let ids = format!("{id}\t{id}\t{id}\t{id}");
    assert_eq!(status_field(child, "Uid"), ids);
    assert_eq!(status_field(child, "Gid"), ids);
    assert_eq!(status_field(child, "Groups"), "");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(child, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(child, "NoNewPrivs"), "1");
    assert_eq!(status_field(child, "NSpid"), format!("{child}\t1"));
    for ns in ["mnt", "pid", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{child}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "the jail shares our {ns} namespace");
    }
    let limits = std::fs::read_to_string(format!("/proc/{child}/limits")).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core")).unwrap();
    assert!(core.split_whitespace().nth(4) == Some("0"), "{core}");
    // Every thread is filtered, not only the main one.
    for t in std::fs::read_dir(format!("/proc/{child}/task")).unwrap() {
        let status = std::fs::read_to_string(t.unwrap().path().join("status")).unwrap();
        assert!(status.contains("Seccomp:\t2"), "{status}");
    }
    // The root is read-only, even to root from outside.
    let err = std::fs::File::create(format!("/proc/{child}/root/planted")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
}

#[test]
fn a_jailed_riscv_monitor_boots_sees_only_its_files_and_dies_with_its_keeper() {
    let id = 1_000_901;
    let dir = temp_dir("jail-riscv");
    let run = owned_dir(&dir.join("run"), id);
    let vol = volume(&dir.join("vol/d.img"), id);
    let ctl = run.join("ctl.sock");
    let script = r#"vme.run="echo DISK=$(head -c 4096 /dev/vda | sha256sum); sleep 600""#;
    let mut args = riscv_tiny_args("2", "128M", script);
    args.extend(jail_args(&dir.join("jail"), id));
    args.extend([
        "--seccomp".into(),
        "strict".into(),
        "--disk".into(),
        format!("path={}", vol.display()),
        "--control-socket".into(),
        ctl.display().to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let t0 = Instant::now();
    let mut vm = Vm::start(&args);
    let want = format!("DISK={}", common::sha256_hex(&[0x5a; 4096]));
    vm.wait_for(&want, TIMEOUT);
    eprintln!("jailed riscv64 guest reported after {:?}", t0.elapsed());
    let child = jailed_child(vm.pid());
    check_confined(child, id);
    // The monitor's cmdline is the keeper's only: one process per VM names its files.
    let title = std::fs::read(format!("/proc/{child}/cmdline")).unwrap();
    assert!(title.starts_with(b"vme-vmm (jailed)\0"), "{title:?}");
    let files = visible_files(child);
    let (k, i) = (
        image("tiny-riscv64", "Image"),
        image("tiny-riscv64", "initramfs.cpio"),
    );
    let want: BTreeSet<String> = [
        "/dev/urandom".to_string(),
        std::fs::canonicalize(k).unwrap().display().to_string(),
        std::fs::canonicalize(i).unwrap().display().to_string(),
        vol.display().to_string(),
        ctl.display().to_string(),
    ]
    .into();
    assert_eq!(files, want, "what the jailed monitor sees");
    // Its /proc shows its own processes only: PID 1 is itself.
    let procs: Vec<String> = std::fs::read_dir(format!("/proc/{child}/root/proc"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.parse::<u32>().is_ok())
        .collect();
    assert_eq!(procs, ["1"]);
    // The host reaches its control socket at the usual path.
    assert!(common::ctl(&ctl, "status").contains(r#""state":"running""#));
    // kill -9 of the pid a supervisor holds ends the VM too.
    // SAFETY: kill(2) with plain integers, on the monitor this test started.
    assert_eq!(unsafe { libc::kill(vm.pid() as i32, libc::SIGKILL) }, 0);
    let status = vm.wait_exit(Duration::from_secs(30));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{child}")).exists() {
        assert!(
            Instant::now() < deadline,
            "the jailed child outlived its keeper"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_jailed_x86_monitor_boots_under_strict_filters() {
    if !kvm_available() {
        assert!(
            std::env::var_os("VME_SKIP_KVM_TESTS").is_some(),
            "no /dev/kvm: run on a KVM host, or set VME_SKIP_KVM_TESTS=1 to skip knowingly"
        );
        return;
    }
    let id = 1_000_902;
    let dir = temp_dir("jail-x86");
    let run = owned_dir(&dir.join("run"), id);
    let ctl = run.join("ctl.sock");
    let (k, i) = (image("tiny", "vmlinux"), image("tiny", "initramfs.cpio"));
    let cmdline = r#"console=ttyS0 quiet panic=-1 vme.run="echo JAILED-X86-OK; sleep 600""#;
    let mut args: Vec<String> = [
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        i.to_str().unwrap(),
        "--memory",
        "256M",
        "--cmdline",
        cmdline,
        "--seccomp",
        "strict",
        "--control-socket",
        ctl.to_str().unwrap(),
    ]
    .map(String::from)
    .into();
    args.extend(jail_args(&dir.join("jail"), id));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let t0 = Instant::now();
    let mut vm = Vm::start(&args);
    vm.wait_for("JAILED-X86-OK", TIMEOUT);
    eprintln!("jailed x86_64 guest reported after {:?}", t0.elapsed());
    let child = jailed_child(vm.pid());
    check_confined(child, id);
    let files = visible_files(child);
    assert!(files.contains("/dev/kvm"), "{files:?}");
    let kvm = std::fs::metadata(format!("/proc/{child}/root/dev/kvm")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&kvm), id);
    common::ctl(&ctl, "stop");
    let status = vm.wait_exit(TIMEOUT);
    let stderr = vm.stderr.lock().unwrap().clone();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("seccomp"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn jail_flags_are_checked() {
    let out = Command::new(VMM)
        .args(["--kernel", "/k", "--jail-uid", "5", "--print-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("go with --jail DIR"));
    let out = Command::new(VMM)
        .args([
            "--kernel",
            "/k",
            "--jail",
            "/j",
            "--jail-uid",
            "0",
            "--print-config",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("uid or gid 0"));
    let out = Command::new(VMM)
        .args([
            "--kernel",
            "/k",
            "--jail",
            "/j",
            "--jail-uid",
            "7",
            "--print-config",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("[jail]") && text.contains("dir = \"/j\"") && text.contains("uid = 7"),
        "{text}"
    );
}

/// A riscv64 monitor that only waits (its guest needs not boot for a drill): `wrapper`
/// runs it (e.g. setpriv), `extra` adds flags. Its control socket is `sock`.
fn drill_target(wrapper: &[&str], extra: &[String], sock: &Path) -> std::process::Child {
    let mut args = riscv_tiny_args("1", "128M", r#"vme.run="sleep 600""#);
    args.extend([
        "--serial".into(),
        "none".into(),
        "--control-socket".into(),
        sock.display().to_string(),
    ]);
    args.extend(extra.iter().cloned());
    let mut cmd = match wrapper.split_first() {
        Some((p, rest)) => {
            let mut c = Command::new(p);
            c.args(rest).arg(VMM);
            c
        }
        None => Command::new(VMM),
    };
    let mut child = cmd
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while UnixStream::connect(sock).is_err() {
        if let Some(s) = child.try_wait().unwrap() {
            panic!("drill target exited early: {s}");
        }
        assert!(
            Instant::now() < deadline,
            "no control socket at {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

/// Sends one drill; the monitor's reply line, or None when it died on it.
fn drill(sock: &Path, req: &str) -> Option<String> {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(format!("{req}\n").as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    (!line.is_empty()).then_some(line)
}

fn refused(reply: Option<String>, why: &str, what: &str) {
    let r = reply.unwrap_or_else(|| panic!("{what}: the monitor died instead"));
    assert!(
        r.contains(r#""result":"refused"#) && r.contains(why),
        "{what}: {r}"
    );
}

fn stop(mut child: std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Memory and storage rows, each mechanism alone. B is another VM's monitor with a volume
/// of its own (another uid, mode 0600).
#[test]
#[cfg_attr(
    not(feature = "seccomp-drill"),
    ignore = "needs --features seccomp-drill"
)]
fn drill_the_jail_alone_and_file_ownership_alone_each_keep_a_monitor_from_another_vms_memory_and_volume()
 {
    let (a_id, b_id) = (1_000_911, 1_000_912);
    let dir = temp_dir("jail-matrix");
    let b_vol = volume(&dir.join("b/vol.img"), b_id);
    let b_run = owned_dir(&dir.join("b/run"), b_id);
    let b = drill_target(
        &[],
        &[
            jail_args(&dir.join("b/jail"), b_id),
            vec!["--disk".into(), format!("path={}", b_vol.display())],
        ]
        .concat(),
        &b_run.join("ctl.sock"),
    );
    let b_pid = jailed_child(b.id());
    let mem = format!(r#"{{"drill":"open","path":"/proc/{b_pid}/mem"}}"#);
    let vol = format!(r#"{{"drill":"open","path":"{}"}}"#, b_vol.display());

    // Jail on, seccomp off: B's memory and volume do not exist in A's world; neither does
    // anything else of the host's.
    let a_run = owned_dir(&dir.join("a/run"), a_id);
    let a_sock = a_run.join("ctl.sock");
    let a = drill_target(&[], &jail_args(&dir.join("a/jail"), a_id), &a_sock);
    refused(drill(&a_sock, &mem), "No such file", "jailed: B's memory");
    refused(drill(&a_sock, &vol), "No such file", "jailed: B's volume");
    refused(
        drill(&a_sock, r#"{"drill":"open","path":"/etc/shadow"}"#),
        "No such file",
        "jailed: /etc/shadow",
    );
    refused(
        drill(&a_sock, r#"{"drill":"exec"}"#),
        "No such file",
        "jailed: exec",
    );
    refused(
        drill(&a_sock, r#"{"drill":"mount"}"#),
        "not permitted",
        "jailed: mount",
    );
    refused(
        drill(&a_sock, &format!(r#"{{"drill":"ptrace","pid":{b_pid}}}"#)),
        "No such process",
        "jailed: ptrace B",
    );
    stop(a);

    // Jail off, seccomp off, A as its own uid (setpriv): ownership and mode refuse B's
    // volume, and the kernel's ptrace access check B's memory.
    let a2_sock = a_run.join("ctl2.sock");
    let id = a_id.to_string();
    let a2 = drill_target(
        &[
            "setpriv",
            "--reuid",
            &id,
            "--regid",
            &id,
            "--clear-groups",
            "--inh-caps=-all",
        ],
        &[],
        &a2_sock,
    );
    refused(
        drill(&a2_sock, &vol),
        "Permission denied",
        "unjailed: B's volume",
    );
    refused(
        drill(&a2_sock, &mem),
        "Permission denied",
        "unjailed: B's memory",
    );
    stop(a2);
    stop(b);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Seccomp alone (no jail, same uid as everything else: root): each escape the guest could
/// drive a monitor thread to try ends the monitor with status 159.
#[test]
#[cfg_attr(
    not(feature = "seccomp-drill"),
    ignore = "needs --features seccomp-drill"
)]
fn drill_seccomp_alone_ends_a_monitor_that_tries_to_escape() {
    let dir = temp_dir("jail-seccomp-drills");
    let strict = ["--seccomp".to_string(), "strict".into()];
    for (i, req) in [
        r#"{"drill":"exec"}"#,
        r#"{"drill":"ptrace","pid":1}"#,
        r#"{"drill":"socket"}"#,
        r#"{"drill":"mount"}"#,
    ]
    .into_iter()
    .enumerate()
    {
        let sock = dir.join(format!("ctl{i}.sock"));
        let mut m = drill_target(&[], &strict, &sock);
        assert_eq!(drill(&sock, req), None, "{req}: the monitor answered");
        let status = m.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(m.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(SECCOMP_EXIT), "{req}: {err}");
        assert!(
            err.contains("vme-vmm: seccomp: thread api made forbidden syscall"),
            "{err}"
        );
    }
    // The vCPU threads, where guest-driven device emulation runs, may open nothing at all
    // (no /proc/PID/mem of another monitor, no volume): the env drill makes one try.
    let sock = dir.join("ctl-vcpu.sock");
    let mut args = riscv_tiny_args("1", "128M", "");
    args.extend(strict.iter().cloned());
    args.extend(["--serial".into(), "none".into()]);
    args.extend(["--control-socket".into(), sock.display().to_string()]);
    let out = Command::new(VMM)
        .args(&args)
        .env("VME_SECCOMP_DRILL", "vcpu:openat")
        .stdout(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(SECCOMP_EXIT), "{err}");
    assert!(
        err.contains("thread vcpu made forbidden syscall 257 (openat)"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The CPU row of the redundancy matrix, mechanism 1 alone: a monitor in no cgroup of its
/// own (started by hand, as with the daemon's cgroups off) whose guest spins on every vCPU
/// takes at most its vCPU count of host CPU, because guest code runs only on the vCPU threads
/// (here one interpreted riscv64 hart; the other threads sleep). `cgroups.rs` in vmed shows
/// mechanism 2 (cgroup `cpu.max`) holding a spinner to less.
#[test]
fn cpu_without_cgroups_a_spinning_guest_takes_at_most_its_vcpus() {
    // The marker is computed so that the kernel command line cannot match it.
    let run = r#"vme.run="echo VME-SPIN$((1+1)); while :; do :; done""#;
    let args = riscv_tiny_args("1", "128M", run);
    let mut vm = Vm::start(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let own = |pid: &str| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert_eq!(
        own(&vm.pid().to_string()),
        own("self"),
        "the monitor is in the test's cgroup, none of its own"
    );
    vm.wait_for("VME-SPIN2", TIMEOUT);
    // Past the shell's start: only the loop runs now.
    std::thread::sleep(Duration::from_secs(1));
    let (cpu0, t0) = (vm.cpu_time(), Instant::now());
    std::thread::sleep(Duration::from_secs(5));
    let used = (vm.cpu_time() - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
    let threads = std::fs::read_dir(format!("/proc/{}/task", vm.pid()))
        .map(|d| d.count())
        .unwrap_or(0);
    eprintln!(
        "1 spinning vCPU, no cgroup: the monitor ({threads} threads) used {used:.3} CPU ({:?} from {cpu0:?})",
        vm.cpu_time()
    );
    assert!(
        used <= 1.1,
        "a 1-vCPU guest took {used:.3} host CPUs: guest work runs off its vCPU thread"
    );
    // Shows the guest really spins (a loaded 2-core host may give it less than a whole CPU).
    assert!(used >= 0.3, "the spinning guest used only {used:.3} CPU");
}

/// docs/threat-model.md quotes the filters' counts: it must say what the code does.
#[test]
fn the_threat_model_quotes_the_filters() {
    let out = Command::new(VMM).arg("--print-seccomp").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let table: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("| thread kind"))
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert!(table.len() > 2, "{text}");
    let doc = std::fs::read_to_string(common::repo_dir().join("docs/threat-model.md")).unwrap();
    assert!(
        doc.contains(&table.join("\n")),
        "docs/threat-model.md's syscall table is stale; the filters say:\n{}",
        table.join("\n")
    );
}
