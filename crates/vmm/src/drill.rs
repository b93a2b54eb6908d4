//! Test builds only (cargo feature `seccomp-drill`, never in a release of the monitor): escape
//! drills asked for over the control socket, run on the control connection's (api) thread as
//! a guest that took the monitor over would: `{"drill":"open","path":P}` (open P for
//! reading), `{"drill":"exec"}` (run /bin/sh), `{"drill":"ptrace","pid":N}` (attach to N),
//! `{"drill":"socket"}` (an AF_INET socket), `{"drill":"mount"}` (a tmpfs on /tmp).
//!
//! The reply, when the monitor survives, is `{"ok":true,"drill":...,"result":"allowed"}` or
//! `{"ok":true,"drill":...,"result":"refused: <error>"}`: the jail refused it, or the file
//! system. A seccomp filter refuses by ending the monitor (status 159) instead.

use serde::Deserialize;
use std::ffi::CString;

#[derive(Deserialize)]
struct Drill {
    drill: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    pid: Option<i32>,
}

/// The reply line to a drill request, or None when `line` is not one.
pub fn control(line: &str) -> Option<String> {
    let d: Drill = serde_json::from_str(line).ok()?;
    let result = match d.drill.as_str() {
        "open" => {
            let path = d.path.unwrap_or_default();
            std::fs::File::open(&path).map(|_| ())
        }
        "exec" => {
            let sh = CString::new("/bin/sh").unwrap_or_default();
            let argv = [sh.as_ptr(), std::ptr::null()];
            let envp = [std::ptr::null()];
            // SAFETY: execve(2) with a NUL-terminated path and null-terminated argv/envp
            // arrays that outlive the call. Should it succeed, the test sees a shell where
            // the monitor was: that is the escape being drilled.
            rc(unsafe { libc::execve(sh.as_ptr(), argv.as_ptr(), envp.as_ptr()) })
        }
        "ptrace" => {
            let pid = d.pid.unwrap_or(1);
            // SAFETY: ptrace(2) PTRACE_ATTACH with a pid and null address/data.
            let r = unsafe {
                libc::ptrace(
                    libc::PTRACE_ATTACH,
                    pid,
                    std::ptr::null_mut::<libc::c_void>(),
                    std::ptr::null_mut::<libc::c_void>(),
                )
            };
            rc(r as i32)
        }
        "socket" => {
            // SAFETY: socket(2) with integer arguments; a descriptor it returns is closed.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            if fd >= 0 {
                // SAFETY: closes the descriptor just returned.
                unsafe { libc::close(fd) };
            }
            rc(fd)
        }
        "mount" => {
            let (src, dst) = (c("tmpfs"), c("/tmp"));
            // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
            rc(unsafe {
                libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    src.as_ptr(),
                    0,
                    std::ptr::null(),
                )
            })
        }
        _ => return None,
    };
    let result = match result {
        Ok(()) => "allowed".to_string(),
        Err(e) => format!("refused: {e}"),
    };
    Some(serde_json::json!({"ok": true, "drill": d.drill, "result": result}).to_string())
}

fn c(s: &str) -> CString {
    CString::new(s).unwrap_or_default()
}

fn rc(r: i32) -> std::io::Result<()> {
    match r {
        r if r < 0 => Err(std::io::Error::last_os_error()),
        _ => Ok(()),
    }
}
