//! `blkbench`: a vhost-user-blk load generator on the blkio crate (libblkio's client), so that
//! storaged and qemu-storage-daemon are measured by the same code, which neither of them wrote.
//!
//! Keeps `--iodepth` requests in flight on one queue for `--runtime` seconds and prints one
//! JSON line: IOPS, MB/s, completed I/Os, p50/p99 latency in microseconds. With `--ramp`, the
//! load runs that many seconds first without being counted (to measure a rate-limited volume
//! after its burst is spent).

use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};

struct Args {
    socket: PathBuf,
    rw: String,
    bs: usize,
    iodepth: usize,
    runtime: f64,
    ramp: f64,
    size: Option<u64>,
}

const USAGE: &str = "usage: blkbench --socket PATH --rw randread|randwrite|read|write \
[--bs BYTES] [--iodepth N] [--runtime SECONDS] [--ramp SECONDS] [--size BYTES]";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        socket: PathBuf::new(),
        rw: "randread".into(),
        bs: 4096,
        iodepth: 1,
        runtime: 5.0,
        ramp: 0.0,
        size: None,
    };
    for (flag, val) in storaged_tests::flag_pairs(USAGE)? {
        let num = |v: &str| storaged_tests::flag_number(&flag, v);
        match flag.as_str() {
            "--socket" => a.socket = val.into(),
            "--rw" => a.rw = val,
            "--bs" => a.bs = num(&val)? as usize,
            "--iodepth" => a.iodepth = num(&val)? as usize,
            "--runtime" => a.runtime = val.parse().map_err(|e| format!("--runtime: {e}"))?,
            "--ramp" => a.ramp = val.parse().map_err(|e| format!("--ramp: {e}"))?,
            "--size" => a.size = Some(num(&val)?),
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    if a.socket.as_os_str().is_empty() {
        return Err(format!("--socket is required\n{USAGE}"));
    }
    if !["randread", "randwrite", "read", "write"].contains(&a.rw.as_str()) {
        return Err(format!("unknown --rw {}", a.rw));
    }
    if a.bs == 0 || !a.bs.is_multiple_of(512) || a.iodepth == 0 || a.iodepth > 256 {
        return Err("--bs must be a multiple of 512; --iodepth between 1 and 256".into());
    }
    Ok(a)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blkbench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    let a = parse_args()?;
    fn err(what: &'static str) -> impl Fn(blkio::Error) -> String {
        move |e| format!("{what}: {e}")
    }
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(err("new"))?;
    b.set_str("path", a.socket.to_str().ok_or("socket path is not UTF-8")?)
        .map_err(err("path"))?;
    b.connect().map_err(err("connect"))?;
    b.set_i32("num-queues", 1).map_err(err("num-queues"))?;
    b.set_i32("queue-size", 256).map_err(err("queue-size"))?;
    let mut q = b
        .start()
        .map_err(err("start"))?
        .queues
        .pop()
        .ok_or("no queue")?;
    let capacity = b.get_u64("capacity").map_err(err("capacity"))?;
    let span = a.size.unwrap_or(capacity).min(capacity);
    let blocks = span / a.bs as u64;
    if blocks == 0 {
        return Err(format!(
            "device of {capacity} bytes is smaller than one block"
        ));
    }
    let region_len = (a.bs * a.iodepth).div_ceil(4096) * 4096;
    let region = b.alloc_mem_region(region_len).map_err(err("alloc"))?;
    b.map_mem_region(&region).map_err(err("map"))?;
    // SAFETY: the region is mapped read-write for region_len bytes while `b` lives.
    let mem = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region_len) };
    for (i, byte) in mem.iter_mut().enumerate() {
        *byte = (i * 7) as u8;
    }
    let write = a.rw.ends_with("write");
    let random = a.rw.starts_with("rand");
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut seq: u64 = 0;
    let mut next_offset = || {
        let blk = if random {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % blocks
        } else {
            let s = seq % blocks;
            seq += 1;
            s
        };
        blk * a.bs as u64
    };
    let mut submitted_at = vec![Instant::now(); a.iodepth];
    let submit = |q: &mut blkio::Blkioq, slot: usize, off: u64| {
        let buf = (region.addr + slot * a.bs) as *mut u8;
        if write {
            q.write(off, buf, a.bs, slot, ReqFlags::empty());
        } else {
            q.read(off, buf, a.bs, slot, ReqFlags::empty());
        }
    };
    let mut start = Instant::now();
    let ramp_end = start + Duration::from_secs_f64(a.ramp);
    let mut ramping = a.ramp > 0.0;
    for (slot, at) in submitted_at.iter_mut().enumerate() {
        *at = Instant::now();
        submit(&mut q, slot, next_offset());
    }
    let deadline = ramp_end + Duration::from_secs_f64(a.runtime);
    let mut lat_us: Vec<u32> = Vec::with_capacity(1 << 20);
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..a.iodepth).map(|_| MaybeUninit::uninit()).collect();
    let mut in_flight = a.iodepth;
    let mut done: u64 = 0;
    let mut errors: u64 = 0;
    while in_flight > 0 {
        let n = q.do_io(&mut comps, 1, None, None).map_err(err("do_io"))?;
        let now = Instant::now();
        if ramping && now >= ramp_end {
            // Counting starts here; requests in flight now complete inside the window.
            ramping = false;
            start = now;
            done = 0;
            lat_us.clear();
        }
        let stop = now >= deadline;
        for c in &comps[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_ref() };
            let slot = c.user_data;
            if c.ret != 0 {
                errors += 1;
            }
            done += 1;
            lat_us.push(now.duration_since(submitted_at[slot]).as_micros() as u32);
            if stop {
                in_flight -= 1;
            } else {
                submitted_at[slot] = Instant::now();
                submit(&mut q, slot, next_offset());
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if errors > 0 {
        return Err(format!("{errors} of {done} I/Os failed"));
    }
    lat_us.sort_unstable();
    let pct = |p: f64| lat_us[((lat_us.len() as f64 - 1.0) * p) as usize];
    println!(
        "{{\"iops\": {:.0}, \"mbps\": {:.1}, \"ios\": {}, \"seconds\": {:.3}, \"lat_p50_us\": {}, \"lat_p99_us\": {}}}",
        done as f64 / secs,
        done as f64 * a.bs as f64 / secs / 1e6,
        done,
        secs,
        pct(0.5),
        pct(0.99)
    );
    Ok(())
}
