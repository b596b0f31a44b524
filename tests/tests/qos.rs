//! Per-volume IOPS limits against the real daemon: the `blkio` client drives throttled and
//! unthrottled volumes side by side, the admin API changes limits on connected volumes, and
//! `/metrics` shows what happened.
//!
//! Only upper bounds are asserted on rates (completed ≤ limit × time + burst holds on any
//! machine, however slow); where a lower bound shows that a change took effect, it is far
//! below what any machine does.

#![allow(clippy::unwrap_used)] // test helpers: a failed step stops the test

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use storaged_tests::*;

const MIB: u64 = 1 << 20;

/// Runs `blkbench` (the blkio-based load generator) against a socket; returns its JSON.
fn blkbench(socket: &Path, rw: &str, iodepth: u32, seconds: f64) -> serde_json::Value {
    let out = Command::new(bin("blkbench"))
        .arg("--socket")
        .arg(socket)
        .args(["--rw", rw, "--bs", "4096"])
        .args(["--iodepth", &iodepth.to_string()])
        .args(["--runtime", &seconds.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "blkbench: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn metric(scrape: &str, series: &str) -> f64 {
    metric_value(scrape, series).unwrap_or_else(|| panic!("{series} missing:\n{scrape}"))
}

#[test]
fn a_limited_volume_stays_under_its_limit_at_qd32_while_an_unlimited_neighbour_runs() {
    let s = Storaged::start();
    let limit = 2000.0;
    let v = s.create_volume(r#"{"name":"slow","size":"256MiB","iops_limit":2000}"#);
    assert_eq!(v["limits"]["iops"], 2000);
    assert_eq!(v["limits"]["iops_source"], "override");
    let burst = v["limits"]["iops_burst"].as_f64().unwrap();
    assert_eq!(burst, limit);
    s.create_volume(r#"{"name":"free","size":"256MiB","tier":"mass"}"#);
    let (slow, free) = (s.socket_of("slow"), s.socket_of("free"));

    let neighbour = std::thread::spawn(move || blkbench(&free, "randread", 32, 3.0));
    let limited = blkbench(&slow, "randread", 32, 3.0);
    let neighbour = neighbour.join().unwrap();

    let ios = limited["ios"].as_f64().unwrap();
    let seconds = limited["seconds"].as_f64().unwrap();
    assert!(
        ios <= limit * seconds + burst,
        "{ios} I/Os in {seconds} s exceed {limit} IOPS × time + a burst of {burst}"
    );
    assert!(neighbour["ios"].as_u64().unwrap() > 0, "{neighbour}");

    let scrape = http_get(&s.metrics_url());
    // The daemon counted exactly what the client completed.
    assert_eq!(
        metric(
            &scrape,
            r#"storaged_volume_requests_total{op="read",volume="slow"}"#
        ),
        ios
    );
    assert_eq!(
        metric(
            &scrape,
            r#"storaged_volume_bytes_total{op="read",volume="slow"}"#
        ),
        ios * 4096.0
    );
    assert_eq!(
        metric(&scrape, r#"storaged_volume_iops_limit{volume="slow"}"#),
        limit
    );
    assert_eq!(
        metric(&scrape, r#"storaged_volume_iops_limit{volume="free"}"#),
        0.0
    );
    let waited = metric(
        &scrape,
        r#"storaged_volume_throttled_requests_total{volume="slow"}"#,
    );
    assert!(waited > 0.0, "no request of the limited volume waited");
    assert!(
        metric(
            &scrape,
            r#"storaged_volume_throttle_wait_seconds_total{volume="slow"}"#
        ) > 0.0
    );
    assert_eq!(
        metric(
            &scrape,
            r#"storaged_volume_throttle_wait_seconds_count{volume="slow"}"#
        ),
        waited
    );
    assert_eq!(
        metric(
            &scrape,
            r#"storaged_volume_throttled_requests_total{volume="free"}"#
        ),
        0.0
    );
    assert_eq!(
        metric(
            &scrape,
            r#"storaged_volume_inflight_requests{volume="slow"}"#
        ),
        0.0
    );
}

/// Reads 4 KiB blocks one at a time on an open connection for `span`; returns how many.
fn reads_within(c: &mut BlkClient, span: Duration) -> u64 {
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < span {
        c.read(0, (n % 1024) * 4096, 4096).unwrap();
        n += 1;
    }
    n
}

#[test]
fn limit_changes_apply_to_a_connected_volume_without_reconnecting() {
    let s = Storaged::start();
    // 1 GiB essential: 0.5 IOPS by size, so the floor (100) applies.
    let v = s.create_volume(r#"{"name":"v","size":"1GiB","tier":"essential"}"#);
    assert_eq!(v["limits"]["iops"], 100);
    assert_eq!(v["limits"]["iops_source"], "floor");
    let mut c = connect_retry(&s.socket_of("v"), 1);
    let span = Duration::from_millis(1500);
    // Bound of a phase at 100 IOPS with a 100-operation bucket.
    let slow_bound = 100 * 3 / 2 + 100 + 1;

    let n = reads_within(&mut c, span);
    assert!(n <= slow_bound, "{n} reads at 100 IOPS in 1.5 s");

    // Grow to 10 TB: essential 500 IOPS/TB gives 5000, at once, same connection.
    let patch = |body: &str| {
        let r = s
            .admin()
            .request("PATCH", "/v1/volumes/v", Some(body))
            .unwrap();
        assert_eq!(r.status, 200, "{body}: {}", r.body);
        r.json()
    };
    let v = patch(r#"{"size":"10TB"}"#);
    assert_eq!(v["limits"]["iops"], 5000);
    assert_eq!(v["limits"]["iops_source"], "tier");
    let n = reads_within(&mut c, span);
    assert!(n > slow_bound, "only {n} reads after growing to 5000 IOPS");

    // Back down with an override.
    let v = patch(r#"{"iops_limit":100}"#);
    assert_eq!(v["iops_limit"], 100);
    assert_eq!(v["limits"]["iops_source"], "override");
    let n = reads_within(&mut c, span);
    assert!(
        n <= slow_bound,
        "{n} reads at an override of 100 IOPS in 1.5 s"
    );

    // Tier change to mass with the override removed: unlimited.
    let v = patch(r#"{"tier":"mass","iops_limit":null}"#);
    assert_eq!(v["iops_limit"], serde_json::Value::Null);
    assert_eq!(v["limits"]["iops"], serde_json::Value::Null);
    assert_eq!(v["limits"]["iops_source"], "unlimited");
    let n = reads_within(&mut c, span);
    assert!(n > slow_bound, "only {n} reads once unlimited");

    // A bandwidth limit of 1 MB/s: at most 1.5 MB + a 1 MB burst in 1.5 s, i.e. 610 blocks.
    let v = patch(r#"{"bandwidth_limit":1000000}"#);
    assert_eq!(v["limits"]["bandwidth_bytes_per_second"], 1_000_000);
    assert_eq!(v["limits"]["bandwidth_source"], "override");
    let n = reads_within(&mut c, span);
    assert!(
        n <= (2_500_000 + 512) / 4096 + 1,
        "{n} 4 KiB reads at 1 MB/s in 1.5 s"
    );

    // The limits survive a restart (they are in the catalog).
    drop(c);
    let mut s = s;
    s.restart();
    let r = s.admin().get("/v1/volumes/v").unwrap();
    let v = r.json();
    assert_eq!(v["tier"], "mass");
    assert_eq!(v["bandwidth_limit"], 1_000_000);
    assert_eq!(v["limits"]["iops_source"], "unlimited");
}

#[test]
fn bad_limits_are_refused_and_change_nothing() {
    let s = Storaged::start();
    s.create_volume(r#"{"name":"v","size":"1GiB","tier":"premium"}"#);
    let before = s.admin().get("/v1/volumes").unwrap().body;
    let cases: [(&str, &str, &str, u16, &str); 10] = [
        (
            "POST",
            "/v1/volumes",
            r#"{"name":"a","size":"1GiB","iops_limit":0}"#,
            400,
            "iops_limit",
        ),
        (
            "POST",
            "/v1/volumes",
            r#"{"name":"a","size":"1GiB","iops_limit":-5}"#,
            400,
            "iops_limit",
        ),
        (
            "POST",
            "/v1/volumes",
            r#"{"name":"a","size":"1GiB","bandwidth_limit":0}"#,
            400,
            "bandwidth_limit",
        ),
        (
            "POST",
            "/v1/volumes",
            r#"{"name":"a","size":"1GiB","tier":"gold"}"#,
            400,
            "unknown tier",
        ),
        (
            "PATCH",
            "/v1/volumes/v",
            r#"{"iops_limit":0}"#,
            400,
            "iops_limit",
        ),
        (
            "PATCH",
            "/v1/volumes/v",
            r#"{"iops_limit":-1}"#,
            400,
            "iops_limit",
        ),
        (
            "PATCH",
            "/v1/volumes/v",
            r#"{"iops_limit":"fast"}"#,
            400,
            "iops_limit",
        ),
        (
            "PATCH",
            "/v1/volumes/v",
            r#"{"bandwidth_limit":"-1MiB"}"#,
            400,
            "bandwidth_limit",
        ),
        (
            "PATCH",
            "/v1/volumes/v",
            r#"{"tier":"platinum","iops_limit":500}"#,
            400,
            "unknown tier",
        ),
        (
            "PATCH",
            "/v1/volumes/nope",
            r#"{"iops_limit":500}"#,
            404,
            "does not exist",
        ),
    ];
    for (method, target, body, status, needle) in cases {
        let r = s.admin().request(method, target, Some(body)).unwrap();
        assert_eq!(r.status, status, "{method} {target} {body}: {}", r.body);
        let msg = r.json()["error"]
            .as_str()
            .unwrap_or_default()
            .to_lowercase();
        assert!(msg.contains(needle), "{body}: '{msg}' lacks '{needle}'");
    }
    assert_eq!(s.admin().get("/v1/volumes").unwrap().body, before);
}

#[test]
fn metrics_pass_promtool_and_show_limits_and_build_info() {
    let s = Storaged::start();
    s.create_volume(r#"{"name":"half","size":500000002048,"tier":"standard"}"#);
    s.create_volume(r#"{"name":"bw","size":"16MiB","tier":"mass","bandwidth_limit":"100MiB"}"#);
    let mut c = connect_retry(&s.socket_of("bw"), 1);
    for i in 0..4u64 {
        assert_eq!(c.write(0, i * MIB, &pattern(MIB as usize, 0, 3)), 0);
    }
    let scrape = http_get(&s.metrics_url());
    // 0.5 TB standard: 1500 × 0.5.
    assert_eq!(
        metric(&scrape, r#"storaged_volume_iops_limit{volume="half"}"#),
        750.0
    );
    assert_eq!(
        metric(
            &scrape,
            r#"storaged_volume_bandwidth_limit_bytes_per_second{volume="bw"}"#
        ),
        (100 * MIB) as f64
    );
    assert_eq!(
        metric(
            &scrape,
            r#"storaged_volume_bytes_total{op="write",volume="bw"}"#
        ),
        (4 * MIB) as f64
    );
    let build = format!(
        "storaged_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(metric(&scrape, &build), 1.0);

    storaged_tests::promtool_check(&scrape);
}

#[test]
fn a_request_waiting_for_tokens_stays_owed_across_ring_resets() {
    use storaged_tests::raw_frontend::*;
    const T_IN: u32 = 0;
    const HDR: u64 = BUF_BASE;
    const STATUS: u64 = BUF_BASE + 0x100;
    const DATA: u64 = BUF_BASE + 0x1000;
    let s = Storaged::start();
    let v = s.create_volume(r#"{"name":"slow","size":"64MiB","iops_limit":100}"#);
    let burst = v["limits"]["iops_burst"].as_f64().unwrap();
    let mut fe = RawFrontend::connect(&s.socket_of("slow"));
    let read = |fe: &mut RawFrontend| {
        fe.header(HDR, T_IN, 0);
        fe.chain(0, &[ro(HDR, 16), wr(DATA, 4096), wr(STATUS, 1)]);
    };
    // Empty the bucket.
    for _ in 0..burst as usize {
        read(&mut fe);
        fe.submit(0, &[ro(HDR, 16), wr(DATA, 4096), wr(STATUS, 1)]);
    }
    fe.reset_ring();
    // Then, over and over, queue a read that must wait and reset the device under it.
    let started = Instant::now();
    let (mut resets, mut served) = (0u64, 0u64);
    while started.elapsed() < Duration::from_secs(3) {
        read(&mut fe);
        fe.post(0);
        std::thread::sleep(Duration::from_millis(1));
        let (base, used) = fe.reset_ring();
        assert!(base >= used, "base {base} below the {used} chains returned");
        served += u64::from(used);
        resets += 1;
    }
    let seconds = started.elapsed().as_secs_f64();
    // Over any interval: the limit times the interval, plus at most one bucket.
    let allowed = 100.0 * seconds + burst;
    assert!(
        served as f64 <= allowed,
        "{served} reads served in {seconds:.1} s through {resets} resets: the limit allows {allowed:.0}"
    );
    assert!(
        resets as f64 > 1.5 * allowed,
        "only {resets} resets in {seconds:.1} s: too few to show anything"
    );
}

#[test]
fn discards_and_write_zeroes_on_a_device_backed_volume_take_the_time_its_bandwidth_limit_implies() {
    let Some(lo) = LoopDevice::new(256 * MIB) else {
        skip("discards_and_write_zeroes_on_a_device_backed_volume_take_the_time_its_bandwidth_limit_implies: cannot set up a loop device (needs root and losetup)");
        return;
    };
    let s = Storaged::start();
    let limit = 32.0 * MIB as f64;
    let body = serde_json::json!({
        "name": "dev", "size": "256MiB", "device": lo.dev, "encryption": "none",
        "tier": "mass", "bandwidth_limit": limit as u64,
    });
    let v = s.create_volume(&body.to_string());
    let burst = v["limits"]["bandwidth_burst_bytes"].as_f64().unwrap();
    let mut c = BlkClient::connect(&s.socket_of("dev"), 1).unwrap();
    let max = c.get_u64("max-write-zeroes-len");
    assert!(
        max > 0 && max <= 32 * MIB,
        "{max} bytes per write-zeroes request"
    );
    // 256 MiB of zeroes, in the largest requests the device offers, with and without unmap.
    let started = Instant::now();
    let mut zeroed = 0;
    while zeroed < 256 * MIB {
        let len = max.min(256 * MIB - zeroed);
        assert_eq!(c.write_zeroes(0, zeroed, len, zeroed % (2 * max) == 0), 0);
        zeroed += len;
    }
    let seconds = started.elapsed().as_secs_f64();
    // At most the limit times the interval plus one bucket: the bytes bound the time from below.
    let least = (zeroed as f64 - burst) / limit;
    assert!(
        seconds >= least * 0.95,
        "{zeroed} bytes zeroed in {seconds:.2} s; a limit of {limit} B/s allows no less than {least:.2} s"
    );
    // A discard on a block device is the device's zero-out: charged the same way.
    let max = c.get_u64("max-discard-len");
    assert!(
        max > 0 && max <= 32 * MIB,
        "{max} bytes per discard request"
    );
    let started = Instant::now();
    let mut discarded = 0;
    while discarded < 128 * MIB {
        assert_eq!(c.discard(0, discarded, max), 0);
        discarded += max;
    }
    let seconds = started.elapsed().as_secs_f64();
    let least = (discarded as f64 - burst) / limit;
    assert!(
        seconds >= least * 0.95,
        "{discarded} bytes discarded in {seconds:.2} s; the limit allows no less than {least:.2} s"
    );
}

#[test]
fn a_request_given_back_at_a_ring_stop_is_served_when_the_ring_restarts_from_the_base() {
    use storaged_tests::raw_frontend::*;
    const T_IN: u32 = 0;
    const HDR: u64 = BUF_BASE;
    const STATUS: u64 = BUF_BASE + 0x100;
    const DATA: u64 = 1 << 20;
    let s = Storaged::start();
    // 1 MB/s and a bucket of 1 MB: a 2 MiB read waits about a second for its bandwidth.
    s.create_volume(r#"{"name":"slow","size":"64MiB","tier":"mass","bandwidth_limit":1000000}"#);
    let mut fe = RawFrontend::connect(&s.socket_of("slow"));
    fe.header(HDR, T_IN, 0);
    fe.write_mem(STATUS, &[0xff]);
    fe.chain(0, &[ro(HDR, 16), wr(DATA, 2 << 20), wr(STATUS, 1)]);
    fe.post(0);
    std::thread::sleep(Duration::from_millis(50));
    let (base, used) = fe.stop_ring();
    assert_eq!(
        (base, used, fe.read_mem(STATUS, 1)[0]),
        (0, 0, 0xff),
        "the waiting read was served at the stop, unpaid, or not given back"
    );
    // As after a pause: the same rings, from the base, and no kick.
    fe.start_ring(base);
    assert_eq!(fe.wait_used(0), (2 << 20) + 1);
    assert_eq!(fe.read_mem(STATUS, 1)[0], 0);
}
