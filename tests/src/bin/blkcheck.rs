//! `blkcheck`: reads a range of a vhost-user-blk device through the blkio crate (libblkio's
//! client) and checks that it holds a repeated byte pattern, e.g. the one a guest's fio wrote
//! with `--verify_pattern`. Used by the full-boot scenarios to verify, from storaged's side,
//! what the guest wrote. Prints one line; exits 1 at the first byte that differs.

use std::path::PathBuf;
use std::process::ExitCode;

use storaged_tests::{flag_number, flag_pairs, BlkClient, REGION_LEN};

const USAGE: &str =
    "usage: blkcheck --socket PATH --offset BYTES --len BYTES --pattern HEX (e.g. 5eed0fa1)";

struct Args {
    socket: PathBuf,
    offset: u64,
    len: u64,
    pattern: Vec<u8>,
}

fn parse_args() -> Result<Args, String> {
    let (mut socket, mut offset, mut len, mut pattern) = (None, 0, None, None);
    for (flag, val) in flag_pairs(USAGE)? {
        match flag.as_str() {
            "--socket" => socket = Some(PathBuf::from(val)),
            "--offset" => offset = flag_number(&flag, &val)?,
            "--len" => len = Some(flag_number(&flag, &val)?),
            "--pattern" => pattern = Some(parse_hex(&val)?),
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    Ok(Args {
        socket: socket.ok_or(format!("--socket is required\n{USAGE}"))?,
        offset,
        len: len.ok_or(format!("--len is required\n{USAGE}"))?,
        pattern: pattern.ok_or(format!("--pattern is required\n{USAGE}"))?,
    })
}

/// "5eed0fa1" (an optional 0x first) as the bytes 5e ed 0f a1.
fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    let digits = s.strip_prefix("0x").unwrap_or(s);
    if digits.is_empty() || !digits.len().is_multiple_of(2) {
        return Err(format!(
            "--pattern {s}: an even number of hex digits is needed"
        ));
    }
    (0..digits.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&digits[i..i + 2], 16).map_err(|e| format!("--pattern {s}: {e}"))
        })
        .collect()
}

fn main() -> ExitCode {
    match run() {
        Ok(msg) => {
            println!("blkcheck: {msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("blkcheck: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<String, String> {
    let a = parse_args()?;
    let mut client = BlkClient::connect_read_only(&a.socket)
        .map_err(|e| format!("connect {}: {e}", a.socket.display()))?;
    let end = a
        .offset
        .checked_add(a.len)
        .filter(|&end| end <= client.capacity())
        .ok_or(format!(
            "{} bytes at {} go past the device's {} bytes",
            a.len,
            a.offset,
            client.capacity()
        ))?;
    let mut pos = a.offset;
    while pos < end {
        let chunk = (end - pos).min(REGION_LEN as u64) as usize;
        let data = client
            .read(0, pos, chunk)
            .map_err(|ret| format!("read of {chunk} bytes at {pos} failed: {ret}"))?;
        for (i, &got) in data.iter().enumerate() {
            let at = pos + i as u64;
            let want = a.pattern[((at - a.offset) % a.pattern.len() as u64) as usize];
            if got != want {
                return Err(format!(
                    "byte {at} is {got:#04x}, the pattern has {want:#04x} there"
                ));
            }
        }
        pos += chunk as u64;
    }
    Ok(format!(
        "{} bytes at {} hold the pattern {}",
        a.len,
        a.offset,
        a.pattern
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ))
}
