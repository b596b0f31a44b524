//! `boottime`: starts a VMM whose guest console is its standard output and times, from the
//! moment it is started, the console lines that contain each `--marker` (in order). When the
//! last marker is seen it reads the VMM's memory from `/proc/PID/status`, gives the VMM
//! `--exit-within` seconds (default 10) to end by itself (the guest powers off) and kills it
//! if it does not. Prints one JSON line: the milliseconds to each marker (and the guest's own
//! printk time when the line has one), `VmRSS`, `RssAnon`, `RssFile` and `RssShmem` in KiB,
//! and the VMM's exit code (null when it had to be killed). The same tool times
//! vmm, QEMU and Firecracker in `scripts/bench-vmm`, so they are measured alike.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const USAGE: &str =
    "usage: boottime [--timeout SECONDS] --marker TEXT [--marker TEXT ...] -- COMMAND [ARGS ...]";

fn main() -> ExitCode {
    match run() {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("boottime: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<String, String> {
    let mut args = std::env::args().skip(1);
    let (mut markers, mut timeout, mut exit_within) = (Vec::new(), 600u64, 10u64);
    let mut command = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => return Err(USAGE.into()),
            "--marker" => markers.push(args.next().ok_or("--marker needs a text")?),
            "--timeout" => {
                timeout = args
                    .next()
                    .and_then(|t| t.parse().ok())
                    .ok_or("--timeout needs a number of seconds")?
            }
            "--exit-within" => {
                exit_within = args
                    .next()
                    .and_then(|t| t.parse().ok())
                    .ok_or("--exit-within needs a number of seconds")?
            }
            "--" => {
                command = args.by_ref().collect();
                break;
            }
            _ => return Err(format!("unknown argument {a}\n{USAGE}")),
        }
    }
    if markers.is_empty() || command.is_empty() {
        return Err(USAGE.into());
    }
    let start = Instant::now();
    let mut child = Command::new(&command[0])
        .args(&command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", command[0]))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        // Lines as bytes: a console may carry anything.
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            if tx.send((start.elapsed(), text)).is_err() {
                break;
            }
            line.clear();
        }
    });
    let deadline = start + Duration::from_secs(timeout);
    let mut times = Vec::new();
    while times.len() < markers.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let (at, text) = match rx.recv_timeout(left) {
            Ok(l) => l,
            Err(_) => {
                stop(&mut child);
                return Err(format!(
                    "no '{}' on the console within {timeout} s (or the VMM ended)",
                    markers[times.len()]
                ));
            }
        };
        if text.contains(markers[times.len()].as_str()) {
            times.push((at, guest_time(&text)));
        }
    }
    // A VMM that already ended (a zombie) has no memory lines left: that is an error, not 0.
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
        .ok()
        .filter(|s| s.contains("VmRSS:"));
    let Some(status) = status else {
        stop(&mut child);
        return Err("the VMM ended before its memory could be read".into());
    };
    let exit_deadline = Instant::now() + Duration::from_secs(exit_within);
    let exit_code = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status.code(),
            Ok(None) if Instant::now() < exit_deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => {
                stop(&mut child);
                break None;
            }
        }
    };
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let marks: Vec<serde_json::Value> = markers
        .iter()
        .zip(&times)
        .map(|(m, (at, guest))| {
            // Milliseconds to a tenth: finer than any VMM's start-up varies.
            let ms = (at.as_secs_f64() * 10_000.0).round() / 10.0;
            serde_json::json!({ "marker": m, "ms": ms, "guest_s": guest })
        })
        .collect();
    Ok(serde_json::json!({
        "markers": marks,
        "rss_kib": kib("VmRSS"),
        "anon_kib": kib("RssAnon"),
        "file_kib": kib("RssFile"),
        "shmem_kib": kib("RssShmem"),
        "exit": exit_code,
    })
    .to_string())
}

/// The printk time of a kernel console line, `[   12.345678] ...`, in seconds.
fn guest_time(line: &str) -> Option<f64> {
    let rest = line.trim_start().strip_prefix('[')?;
    rest.split(']').next()?.trim().parse().ok()
}

/// Kills the VMM and reaps it.
fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}
