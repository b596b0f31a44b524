//! `xtsbench`: throughput of storaged's XTS-AES-256 engine on one core, 4 KiB units, to
//! compare with `openssl speed -evp aes-256-xts -bytes 4096`.
//!
//! Prints one JSON line: encrypt and decrypt GB/s (10^9 bytes per second).

use std::time::{Duration, Instant};

use storaged::crypto::{Dek, Xts, UNIT};

fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let Ok(key) = Dek::generate() else {
        eprintln!("xtsbench: cannot draw a key");
        std::process::exit(1);
    };
    let xts = Xts::new(&key);
    // 64 units (256 KiB): stays in L2, like a batch of requests in flight.
    let buf = vec![0x5au8; 64 * UNIT];
    let run = |f: &dyn Fn(&mut [u8], u64)| {
        let mut buf = buf.clone();
        let start = Instant::now();
        let mut bytes = 0u64;
        let mut unit = 0u64;
        while start.elapsed() < Duration::from_secs_f64(seconds) {
            for _ in 0..16 {
                f(&mut buf, unit);
                unit += 64;
                bytes += buf.len() as u64;
            }
        }
        bytes as f64 / start.elapsed().as_secs_f64() / 1e9
    };
    let enc = run(&|b, u| xts.encrypt_units(b, u));
    // (Decrypting what was never encrypted costs the same: no unit here is all zeros.)
    let dec = run(&|b, u| xts.decrypt_units(b, u));
    println!("{{\"encrypt_gbps\": {enc:.3}, \"decrypt_gbps\": {dec:.3}}}");
}
