//! `jail-probe`: what a jailed vmm's uid can reach, tried as a taken-over vmm would. Enters
//! the mount namespace of process `--pid` (and with it its root: the jail) unless `--host`,
//! takes `--uid` (gid the same, no supplementary groups), then tries each `--open PATH`
//! (read-only, or `--write PATH` for writing) and `--connect PATH` (a Unix socket), printing
//! one line per try: `open PATH: ok` or `open PATH: ENOENT` (the errno's name).

use std::process::ExitCode;

const USAGE: &str = "usage: jail-probe --pid PID --uid UID [--host] \
[--open PATH]... [--write PATH]... [--connect PATH]...";

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOENT) => "ENOENT".into(),
        Some(libc::EACCES) => "EACCES".into(),
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EROFS) => "EROFS".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ENOTDIR) => "ENOTDIR".into(),
        _ => e.to_string(),
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (mut pid, mut uid, mut host) = (None, None, false);
    let mut tries = Vec::new();
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--host" => host = true,
            "--pid" | "--uid" | "--open" | "--write" | "--connect" => {
                let v = args.next().ok_or(USAGE)?;
                match flag.as_str() {
                    "--pid" => pid = Some(v.parse::<i32>().map_err(|e| e.to_string())?),
                    "--uid" => uid = Some(v.parse::<u32>().map_err(|e| e.to_string())?),
                    _ => tries.push((flag, v)),
                }
            }
            _ => return Err(USAGE.into()),
        }
    }
    let uid = uid.ok_or(USAGE)?;
    if !host {
        let ns = std::fs::File::open(format!("/proc/{}/ns/mnt", pid.ok_or(USAGE)?))
            .map_err(|e| format!("its mount namespace: {e}"))?;
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a descriptor this process owns; this process has one thread.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) } < 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        std::env::set_current_dir("/").map_err(|e| e.to_string())?;
    }
    // SAFETY: plain system calls with no pointers but a null group list of length 0.
    let dropped = unsafe {
        libc::setgroups(0, std::ptr::null()) == 0
            && libc::setresgid(uid, uid, uid) == 0
            && libc::setresuid(uid, uid, uid) == 0
    };
    if !dropped {
        return Err(format!(
            "cannot take uid {uid}: {}",
            std::io::Error::last_os_error()
        ));
    }
    for (what, path) in tries {
        let result = match what.as_str() {
            "--open" => std::fs::File::open(&path).map(drop),
            "--write" => std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map(drop),
            _ => std::os::unix::net::UnixStream::connect(&path).map(drop),
        };
        let verb = what.trim_start_matches("--");
        match result {
            Ok(()) => println!("{verb} {path}: ok"),
            Err(e) => println!("{verb} {path}: {}", errno_name(&e)),
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jail-probe: {e}");
            ExitCode::FAILURE
        }
    }
}
