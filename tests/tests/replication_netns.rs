//! Replication over a link with a round trip: a primary storaged and its secondary in two
//! network namespaces joined by a veth pair (5 ms round trip), driven by the `blkio` client
//! with the workload of generations (`storaged_tests::generations`), and the secondary's image
//! checked after a steady state, a cut link, and kills of either side at bad moments: every
//! block at one generation or the next, none torn, none older than `consistent_at` and the RPO
//! allow. Besides: a resync after an outage sends the changed regions, not the volume; a
//! resync the writes outrun waits until they slow; an encrypted volume crosses the link and
//! lands on the peer as its ciphertext.
//!
//! Where the secondary's image is read (the primary gone, the stream ended) it is promoted
//! and read: [`secondary_image`].
//!
//! One test at a time (a lock): each runs two daemons and a writer, and on a small machine
//! two such tests would starve each other's daemons, making the RPO bound a measure of the
//! machine.

#![allow(clippy::unwrap_used)] // test helpers: a failed step stops the test

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use storaged_api::{ReplicationInfo, ReplicationMode, StartReplication};
use storaged_tests::generations::{
    check_image, unix_now, GenerationWriter, Image, Layout, WriterOptions, WriterReport, BLOCK,
    REGION,
};
use storaged_tests::netns::{in_netns, End, NetPair};
use storaged_tests::pki::Ca;
use storaged_tests::{connect_retry, metric_value, pattern, wait_until, BlkClient, Storaged};

/// The port both daemons listen on for replication, each in its own namespace.
const PORT: u16 = 7420;

/// The relationships' recovery point objective.
const RPO: u32 = 5;

/// Slack for the time checks: a cut reads the primary's clock before it takes the log's lock,
/// and a thread preempted between the two stamps its cut a little early.
const SLACK: f64 = 0.05;

/// The volume every test replicates.
const VOLUME: &str = "db";

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The primary in namespace a, its peer in namespace b, and the link between them. The
/// daemons are dropped (killed) before the namespaces.
struct Zones {
    a: Storaged,
    b: Storaged,
    net: NetPair,
    dir: tempfile::TempDir,
}

/// Two daemons of one CA in two namespaces, or `None` (the test skips, saying why) where
/// the machine cannot make them.
fn zones() -> Option<Zones> {
    let net = NetPair::or_skip()?;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("zone CA");
    let a = daemon(dir.path(), &ca, "zone-a", &net.a);
    let b = daemon(dir.path(), &ca, "zone-b", &net.b);
    Some(Zones { a, b, net, dir })
}

/// A storaged in `end`'s namespace, its certificate naming its veth address, listening there.
fn daemon(dir: &Path, ca: &Ca, name: &str, end: &End) -> Storaged {
    let node_dir = dir.join(name);
    std::fs::create_dir(&node_dir).unwrap();
    let node = ca.issue(&node_dir, name, &[&end.addr.to_string()]);
    let config = node_dir.join("storaged.toml");
    std::fs::write(
        &config,
        format!(
            "[replication]\nlisten = \"{}:{PORT}\"\n{}",
            end.addr,
            node.toml()
        ),
    )
    .unwrap();
    Storaged::start_in_netns(&end.netns, &["--config", config.to_str().unwrap()])
}

impl Zones {
    /// Creates the volume on the primary (`fields` after its name) and replicates it to the
    /// peer; returns once the initial sync is over. Its IOPS limit is far above what the
    /// machine does: the workload runs at the machine's pace, not the tier's.
    fn replicate(&self, fields: &str) {
        self.a.create_volume(&format!(
            r#"{{"name":"{VOLUME}","iops_limit":10000000,{fields}}}"#
        ));
        self.a
            .admin()
            .start_replication(
                VOLUME,
                &StartReplication {
                    peer: format!("{}:{PORT}", self.net.b.addr),
                    mode: ReplicationMode::Async,
                    rpo_seconds: RPO,
                },
            )
            .unwrap();
        wait_replication(
            &self.b,
            "the initial sync ends",
            Duration::from_secs(60),
            |r| r.consistent && r.state == "replicating",
        );
    }

    /// Both daemons' logs, for a failure's message.
    fn logs(&self) -> String {
        format!(
            "--- primary:\n{}\n--- secondary:\n{}",
            self.a.log_text(),
            self.b.log_text()
        )
    }
}

/// Waits until the volume's relationship on `s` says `cond`; returns what it said.
fn wait_replication(
    s: &Storaged,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&ReplicationInfo) -> bool,
) -> ReplicationInfo {
    let mut last = None;
    let deadline = Instant::now() + timeout;
    loop {
        let r = s.admin().replication(VOLUME).unwrap();
        if cond(&r) {
            return r;
        }
        if Instant::now() > deadline {
            panic!(
                "{what}: not within {timeout:?}; last {r:?} (before it {last:?})\n{}",
                s.log_text()
            );
        }
        last = Some(r);
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until the secondary's image is at least as recent as `t` (primary's clock).
fn wait_secondary_passes(z: &Zones, what: &str, t: f64, timeout: Duration) -> ReplicationInfo {
    let deadline = Instant::now() + timeout;
    loop {
        let r = z.b.admin().replication(VOLUME).unwrap();
        if r.consistent && r.consistent_at.is_some_and(|c| c >= t) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the secondary is not past {t:.3} within {timeout:?}: {r:?}\n{}",
            z.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The secondary's image as a failover finds it, and the `consistent_at` it is of: the
/// primary is gone (killed), so the secondary's stream ends; it is promoted, and its image
/// (its last committed epoch's) read back through its vhost-user socket.
fn secondary_image(z: &Zones, layout: &Layout) -> (Vec<Vec<u8>>, f64) {
    let r = wait_replication(
        &z.b,
        "the secondary's stream ends with its primary",
        Duration::from_secs(30),
        |r| r.state == "disconnected",
    );
    assert!(r.consistent, "{r:?}\n{}", z.logs());
    let at = r.consistent_at.expect("a consistent image has its time");
    let promoted = z.b.admin().promote(VOLUME, false).unwrap();
    assert_eq!(
        promoted.role,
        storaged_api::ReplicationRole::Primary,
        "{promoted:?}"
    );
    let mut c = storaged_tests::connect_retry(&z.b.socket_of(VOLUME), 1);
    let blocks = layout
        .offsets()
        .iter()
        .map(|&o| c.read(0, o, BLOCK).unwrap())
        .collect();
    drop(c);
    (blocks, at)
}

/// The primary's end: when it was killed, and whether it said just before that its
/// secondary was beyond the RPO.
struct Killed {
    at: f64,
    rpo_exceeded: bool,
}

/// Kills the primary (SIGKILL), reading its relationship's status just before.
fn kill_primary(z: &mut Zones) -> Killed {
    let r = z.a.admin().replication(VOLUME).unwrap();
    let at = unix_now();
    z.a.signal_and_wait(libc::SIGKILL);
    Killed {
        at,
        rpo_exceeded: r.rpo_exceeded,
    }
}

/// Checks the secondary's image against the writer's report: one generation or the next,
/// whole blocks, none older than `consistent_at` allows, none newer; and, if its primary,
/// killed, said its secondary was within the RPO, none of the workload missing but what the
/// RPO allows.
fn check_secondary(z: &Zones, layout: &Layout, report: &WriterReport, killed: &Killed) -> Image {
    let (blocks, at) = secondary_image(z, layout);
    let fail = |e: &dyn std::fmt::Display| -> ! {
        panic!(
            "the secondary's image (consistent_at {at:.6}): {e}\nlast generations: {:?}\n{}",
            &report.generations[report.generations.len().saturating_sub(5)..],
            z.logs()
        )
    };
    let image = check_image(layout, &blocks).unwrap_or_else(|e| fail(&e));
    image
        .check_time(&report.generations, at, SLACK)
        .unwrap_or_else(|e| fail(&e));
    if !killed.rpo_exceeded {
        image
            .check_recency(&report.generations, killed.at, RPO)
            .unwrap_or_else(|e| fail(&e));
    }
    eprintln!(
        "secondary image: generations {}..={} of {} flushed, consistent_at {:.3} s before the \
         kill (rpo_exceeded: {})",
        image.min,
        image.max,
        report.last_flushed(),
        killed.at - at,
        killed.rpo_exceeded
    );
    image
}

/// Waits until the secondary is past `t` and its primary has nothing left to send it (lag 0):
/// its last commit then holds every write before `t`, whatever epoch (a stream's or a
/// resync's) it passed `t` with.
fn wait_caught_up(z: &Zones, what: &str, t: f64) {
    wait_secondary_passes(z, what, t, Duration::from_secs(60));
    wait_replication(&z.a, what, Duration::from_secs(60), |r| {
        r.state == "replicating" && r.lag_seconds == Some(0.0)
    });
}

/// Waits until the primary says its secondary is within the RPO: the steady state.
fn wait_within_rpo(z: &Zones) {
    wait_replication(
        &z.a,
        "the primary's secondary is within the RPO",
        Duration::from_secs(60),
        |r| r.state == "replicating" && r.lag_seconds.is_some() && !r.rpo_exceeded,
    );
}

/// The value of `series{volume="db"}` in `s`'s metrics (0 when absent).
fn metric(s: &Storaged, series: &str) -> f64 {
    metric_value(&s.metrics(), &format!(r#"{series}{{volume="{VOLUME}"}}"#)).unwrap_or(0.0)
}

/// How many "replication: resync" lines `s` has logged.
fn resyncs(s: &Storaged) -> usize {
    log_lines(s, "replication: resync")
}

/// How many lines `s` has logged that contain `text`.
fn log_lines(s: &Storaged, text: &str) -> usize {
    s.log_text().lines().filter(|l| l.contains(text)).count()
}

/// The writer's report once it has stopped (after a kill of its daemon, it stops on its own
/// with the requests it had in flight unanswered: that is no failure here).
fn stop_writer(w: GenerationWriter, daemon_killed: bool) -> WriterReport {
    let report = w.stop();
    let slowest = report
        .generations
        .iter()
        .filter_map(|g| g.flushed.map(|f| (f - g.started, g.generation)))
        .fold((0.0, 0), |a, b| if b.0 > a.0 { b } else { a });
    eprintln!(
        "writer: {} generations flushed, the slowest ({}) in {:.3} s",
        report.last_flushed(),
        slowest.1,
        slowest.0
    );
    if let Some(e) = &report.error {
        let mut chain = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            chain = format!("{chain}: {s}");
            source = s.source();
        }
        assert!(daemon_killed, "the writer failed: {chain}");
    }
    report
}

/// A writer of `layout` on the primary, once it has flushed a few generations.
fn writer(z: &Zones, layout: &Layout, pause: Duration) -> GenerationWriter {
    writer_from(z, layout, pause, 1)
}

/// A writer of `layout` on the primary from generation `first` on, once it has flushed a few.
fn writer_from(z: &Zones, layout: &Layout, pause: Duration, first: u64) -> GenerationWriter {
    let w = GenerationWriter::start(
        &z.a.socket_of(VOLUME),
        layout.clone(),
        WriterOptions {
            queue_depth: 16,
            pause,
            first_generation: first,
        },
    );
    if !w.wait_flushed(first + 4, Duration::from_secs(30)) {
        let r = w.stop();
        panic!(
            "the writer flushed {} generations in 30 s: {:?}\n{}",
            r.last_flushed(),
            r.error,
            z.logs()
        );
    }
    w
}

/// Waits until the secondary follows the writer: its image past a generation flushed now.
fn wait_following(z: &Zones, w: &GenerationWriter) {
    let g = w.last_flushed();
    assert!(w.wait_flushed(g + 1, Duration::from_secs(30)));
    wait_secondary_passes(
        z,
        "the secondary follows the writer",
        unix_now(),
        Duration::from_secs(60),
    );
}

#[test]
fn the_link_between_the_namespaces_has_its_round_trip_and_can_be_cut() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(net) = NetPair::or_skip() else {
        return;
    };
    let b = net.b.addr;
    let listener = in_netns(&net.b.netns, || {
        std::net::TcpListener::bind((b, PORT)).unwrap()
    });
    let rtt = |net: &NetPair| {
        in_netns(&net.a.netns, || {
            let t = Instant::now();
            std::net::TcpStream::connect_timeout(&(b, PORT).into(), Duration::from_secs(2))
                .map(|_| t.elapsed())
        })
    };
    // A connect is one round trip (SYN, SYN-ACK): at least the two delays.
    let took = rtt(&net).unwrap();
    assert!(took >= Duration::from_micros(4500), "{took:?}");
    net.link_down();
    assert!(rtt(&net).is_err(), "nothing crosses a cut link");
    net.link_up();
    wait_until("the link is back", Duration::from_secs(10), || {
        rtt(&net).is_ok()
    });
    drop(listener);
}

#[test]
fn in_steady_state_the_secondary_reaches_the_last_flushed_generation_and_holds_it_after_the_primary_dies(
) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut z) = zones() else {
        return;
    };
    z.replicate(r#""size":"256MiB""#);
    let layout = Layout::spread(256 << 20, 128);
    let w = writer(&z, &layout, Duration::from_millis(5));
    wait_following(&z, &w);
    let g = w.last_flushed();
    assert!(w.wait_flushed(g + 20, Duration::from_secs(60)));
    let report = stop_writer(w, false);
    let last = report.generations.last().unwrap();
    wait_caught_up(
        &z,
        "the secondary passes the last FLUSH",
        last.flushed.unwrap(),
    );
    let killed = kill_primary(&mut z);
    assert!(!killed.rpo_exceeded);
    let image = check_secondary(&z, &layout, &report, &killed);
    assert_eq!(
        image,
        Image {
            min: last.generation,
            max: last.generation
        },
        "the image past the last FLUSH is its generation"
    );
}

#[test]
fn a_kill_9_of_the_primary_mid_stream_leaves_the_secondary_at_one_recent_generation() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut z) = zones() else {
        return;
    };
    z.replicate(r#""size":"256MiB""#);
    let layout = Layout::spread(256 << 20, 128);
    let w = writer(&z, &layout, Duration::from_millis(1));
    wait_following(&z, &w);
    wait_within_rpo(&z);
    // A second of stream, then the kill while generations are in flight.
    let g = w.last_flushed();
    assert!(w.wait_flushed(g + 20, Duration::from_secs(60)));
    std::thread::sleep(Duration::from_secs(1));
    let killed = kill_primary(&mut z);
    assert!(!killed.rpo_exceeded, "the steady state");
    let report = stop_writer(w, true);
    check_secondary(&z, &layout, &report, &killed);
}

/// How long the tests cut the link for: beyond the primary's 5 s of silence before it takes
/// the link for broken.
const OUTAGE: Duration = Duration::from_secs(8);

#[test]
fn a_link_cut_mid_stream_and_restored_leaves_the_secondary_consistent_and_following() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut z) = zones() else {
        return;
    };
    z.replicate(r#""size":"256MiB""#);
    let layout = Layout::spread(256 << 20, 128);
    let w = writer(&z, &layout, Duration::from_millis(2));
    wait_following(&z, &w);

    z.net.link_down();
    let down = Instant::now();
    // The primary's writes go on meanwhile: the guest never waits for the link.
    let g = w.last_flushed();
    assert!(
        w.wait_flushed(g + 50, Duration::from_secs(30)),
        "writes stopped while the link was down: at {} of {}",
        w.last_flushed(),
        g + 50
    );
    std::thread::sleep(OUTAGE.saturating_sub(down.elapsed()));
    z.net.link_up();
    let up = unix_now();
    wait_replication(
        &z.a,
        "the primary replicates again",
        Duration::from_secs(60),
        |r| r.state == "replicating",
    );
    wait_secondary_passes(
        &z,
        "the secondary catches up after the outage",
        up,
        Duration::from_secs(60),
    );

    let report = stop_writer(w, false);
    let last = report.generations.last().unwrap();
    wait_caught_up(
        &z,
        "the secondary passes the last FLUSH",
        last.flushed.unwrap(),
    );
    let killed = kill_primary(&mut z);
    let image = check_secondary(&z, &layout, &report, &killed);
    assert_eq!(image.min, last.generation);
}

#[test]
fn a_link_cut_while_the_stream_carries_data_is_noticed_and_the_link_made_again_through_a_resync() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(z) = zones() else {
        return;
    };
    z.replicate(r#""size":"256MiB""#);
    let layout = Layout::spread(256 << 20, 128);
    let w = writer(&z, &layout, Duration::from_millis(2));
    wait_following(&z, &w);
    let reconnects = metric(&z.a, "storaged_volume_replication_reconnects_total");
    let before = resyncs(&z.a);

    z.net.link_down();
    // A cut cable sends no reset: the primary takes 5 s of silence for a broken link.
    let r = wait_replication(
        &z.a,
        "the primary takes the cut link for down",
        Duration::from_secs(15),
        |r| r.state == "disconnected",
    );
    assert!(r.disconnected_since.is_some(), "{r:?}");
    z.net.link_up();
    let up = unix_now();
    wait_secondary_passes(
        &z,
        "the secondary catches up after the outage",
        up,
        Duration::from_secs(60),
    );
    assert!(
        resyncs(&z.a) > before,
        "the link came back through a resync\n{}",
        z.a.log_text()
    );
    assert!(metric(&z.a, "storaged_volume_replication_reconnects_total") > reconnects);
    stop_writer(w, false);
}

#[test]
fn a_kill_9_of_the_secondary_mid_apply_then_its_restart_leave_it_consistent_and_following() {
    kill_the_secondary_mid_apply(false);
}

#[test]
fn a_kill_9_of_the_secondary_mid_apply_under_writes_then_its_restart_leave_it_consistent() {
    kill_the_secondary_mid_apply(true);
}

/// Three times: the secondary killed while the stream runs, restarted on its data dir, and
/// caught up; then the primary killed mid-stream and the secondary's image checked.
/// `writing`: whether the writer goes on through the resync after each restart (else it stops
/// right after the kill, and another goes on with its generations once the secondary has
/// caught up).
fn kill_the_secondary_mid_apply(writing: bool) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut z) = zones() else {
        return;
    };
    z.replicate(r#""size":"256MiB""#);
    let layout = Layout::spread(256 << 20, 128);
    let pause = Duration::from_millis(1);
    let mut w = Some(writer(&z, &layout, pause));
    let mut before = Vec::new();
    // The receiver commits an epoch at each of the writer's FLUSHes: a kill at any moment
    // of the stream finds it staging, committing or applying one.
    for round in 0..3 {
        wait_following(&z, w.as_ref().unwrap());
        std::thread::sleep(Duration::from_millis(300 + 200 * round));
        z.b.signal_and_wait(libc::SIGKILL);
        if !writing {
            before.extend(stop_writer(w.take().unwrap(), false).generations);
        }
        let streams =
            z.b.log_text()
                .matches("replication stream from the primary")
                .count();
        z.b.restart_after_stop();
        let restarted = unix_now();
        if writing {
            // Under writes the primary always has something to send: past the restart is
            // caught up.
            wait_secondary_passes(
                &z,
                "the restarted secondary catches up",
                restarted,
                Duration::from_secs(60),
            );
        } else {
            wait_caught_up(&z, "the restarted secondary catches up", restarted);
        }
        let log = z.b.log_text();
        let recovery = log
            .lines()
            .filter(|l| l.contains("replication stream from the primary"))
            .nth(streams)
            .unwrap_or("");
        eprintln!("round {round}: the restarted secondary: {recovery}");
        if !writing {
            let next = before.last().map_or(1, |g| g.generation + 1);
            w = Some(writer_from(&z, &layout, pause, next));
        }
    }
    let w = w.unwrap();
    wait_following(&z, &w);
    let killed = kill_primary(&mut z);
    let mut report = stop_writer(w, true);
    report.generations.splice(0..0, before);
    check_secondary(&z, &layout, &report, &killed);
}

#[test]
fn a_kill_9_of_the_secondary_mid_resync_then_its_restart_leave_it_consistent_and_complete() {
    kill_the_secondary_mid_resync(false);
}

#[test]
fn a_kill_9_of_the_secondary_mid_resync_under_writes_then_its_restart_leave_it_consistent() {
    kill_the_secondary_mid_resync(true);
}

/// The link cut under the writer, a lot written meanwhile, the link back slower so that the
/// resync takes seconds, the secondary killed as soon as it is in it and restarted; once it
/// has caught up, the primary killed and the secondary's image checked. `writing`: whether
/// the writer goes on through the resync (else it has stopped before the link comes back).
fn kill_the_secondary_mid_resync(writing: bool) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut z) = zones() else {
        return;
    };
    z.replicate(r#""size":"256MiB""#);
    let layout = Layout::spread(256 << 20, 128);
    let w = writer(&z, &layout, Duration::from_millis(2));
    wait_following(&z, &w);

    // The link cut for a while, the writer going on; then a lot written beside its regions
    // (through a client of its own: a volume has one frontend at a time, so the writer stops
    // for it). More than the primary's log holds (64 MiB): its records are dropped and a
    // resync of the dirty regions follows, whether or not the primary took the link for
    // broken.
    z.net.link_down();
    let down = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let before = stop_writer(w, false);
    // (The writer's regions are every eighth: 0, 8, 16...)
    let bulk: Vec<u64> = (0..80u64)
        .map(|i| ((i / 7) * 8 + i % 7 + 1) * REGION)
        .collect();
    assert!(bulk
        .iter()
        .all(|b| !layout.regions().contains(&(b / REGION))));
    let mut c = connect_retry(&z.a.socket_of(VOLUME), 1);
    for &offset in &bulk {
        assert_eq!(c.write(0, offset, &pattern(1 << 20, offset, 9)), 0);
    }
    assert_eq!(c.flush(0), 0);
    drop(c);
    // Another writer goes on with the generations, through the resync or not.
    let w = writing.then(|| {
        writer_from(
            &z,
            &layout,
            Duration::from_millis(2),
            before.last_flushed() + 1,
        )
    });
    std::thread::sleep(OUTAGE.saturating_sub(down.elapsed()));
    // A slow link, so that the resync takes seconds.
    z.net.rate(100);
    z.net.link_up();
    let r = wait_replication(
        &z.b,
        "the secondary is in the resync",
        Duration::from_secs(60),
        |r| r.state == "resync",
    );
    z.b.signal_and_wait(libc::SIGKILL);
    eprintln!("killed the secondary in its resync: {r:?}");
    z.net.unlimited();
    z.b.restart_after_stop();
    let restarted = unix_now();
    wait_secondary_passes(
        &z,
        "the restarted secondary catches up",
        restarted,
        Duration::from_secs(120),
    );
    if !writing {
        wait_caught_up(&z, "the restarted secondary catches up", restarted);
    }
    let killed = kill_primary(&mut z);
    let mut report = match w {
        Some(w) => stop_writer(w, true),
        None => WriterReport {
            generations: Vec::new(),
            error: None,
        },
    };
    report.generations.splice(0..0, before.generations);
    let image = check_secondary(&z, &layout, &report, &killed);
    if !writing {
        assert_eq!(
            image.min,
            report.last_flushed(),
            "the last generation, whole"
        );
    }
    // The bulk data came with the resync that ended.
    let mut ro = BlkClient::connect_read_only(&z.b.socket_of(VOLUME)).unwrap();
    for &offset in &bulk {
        assert!(
            ro.read(0, offset, 1 << 20).unwrap() == pattern(1 << 20, offset, 9),
            "bulk MiB at {offset}"
        );
    }
}

#[test]
fn after_a_link_outage_the_resync_sends_about_the_changed_regions_not_the_volume() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(z) = zones() else {
        return;
    };
    z.replicate(r#""size":"1GiB","encryption":"none""#);
    let resync_bytes = |s: &Storaged| metric(s, "storaged_volume_replication_resync_bytes");
    wait_until("a clean dirty map", Duration::from_secs(30), || {
        resync_bytes(&z.a) == 0.0
    });

    z.net.link_down();
    wait_replication(
        &z.a,
        "the primary takes the link for down",
        Duration::from_secs(30),
        |r| r.state == "disconnected",
    );
    // 1 MiB in region 10, two 4 KiB writes in region 100, 2 MiB over regions 500 and 501,
    // 64 KiB in region 900: five regions changed, 3.1 MiB written.
    let mut c = connect_retry(&z.a.socket_of(VOLUME), 1);
    let writes: [(u64, usize); 5] = [
        (10 * REGION, 1 << 20),
        (100 * REGION + 8192, 4096),
        (100 * REGION + 700 * 1024, 4096),
        (500 * REGION, 2 << 20),
        (900 * REGION + (512 << 10), 64 << 10),
    ];
    for (i, &(offset, len)) in writes.iter().enumerate() {
        assert_eq!(c.write(0, offset, &pattern(len, offset, i as u8)), 0);
    }
    assert_eq!(c.flush(0), 0);
    let written = unix_now();
    let changed = 5.0 * REGION as f64;
    wait_until(
        "the dirty map names the five regions",
        Duration::from_secs(30),
        || resync_bytes(&z.a) == changed,
    );
    let sent = metric(&z.a, "storaged_volume_replication_sent_bytes_total");
    let before = resyncs(&z.a);

    z.net.link_up();
    // The primary counts what a resync sent once its commit is in: when it says so.
    wait_replication(
        &z.a,
        "the primary sees the resync committed",
        Duration::from_secs(60),
        |r| r.consistent_at.is_some_and(|t| t >= written),
    );
    let log = z.a.log_text();
    let line = log
        .lines()
        .filter(|l| l.contains("replication: resync"))
        .nth(before)
        .unwrap_or_else(|| panic!("no resync after the outage:\n{log}"));
    assert!(
        line.contains("regions=5 ") && line.contains(&format!("bytes={changed}")),
        "{line}"
    );
    let delta = metric(&z.a, "storaged_volume_replication_sent_bytes_total") - sent;
    eprintln!("the resync after the outage: {delta} bytes sent for {changed} changed");
    // The five regions whole (region granularity), and the frames around them: their headers,
    // the resync's begin and end, pings. Far from the volume's 1 GiB.
    assert!(
        delta >= changed && delta <= changed + f64::from(64u32 << 10),
        "sent {delta} bytes for {changed} changed"
    );
    let mut ro = BlkClient::connect_read_only(&z.b.socket_of(VOLUME)).unwrap();
    for (i, &(offset, len)) in writes.iter().enumerate() {
        assert!(
            ro.read(0, offset, len).unwrap() == pattern(len, offset, i as u8),
            "write {i} at {offset}"
        );
    }
}

#[test]
fn a_resync_the_writes_outrun_waits_until_they_slow_then_brings_the_secondary_level() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(z) = zones() else {
        return;
    };
    z.replicate(r#""size":"64MiB","encryption":"none""#);
    // A link of 5 MB/s and a writer going round the whole volume, 1 MiB at a time, as fast as
    // it can: the stream falls behind, the log overflows, and every resync pass would take
    // longer than the writer takes to write over all its regions again.
    z.net.rate(40);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let socket = z.a.socket_of(VOLUME);
    let w = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut c = connect_retry(&socket, 1);
            let mut round = 0u8;
            loop {
                for i in 0..64u64 {
                    assert_eq!(c.write(0, i << 20, &pattern(1 << 20, i << 20, round)), 0);
                }
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                round = round.wrapping_add(1);
            }
            assert_eq!(c.flush(0), 0);
            round
        })
    };
    wait_until(
        "a resync lost to the writes",
        Duration::from_secs(60),
        || log_lines(&z.a, "outran the resync") > 0,
    );
    // It waits while they go on: no pass is started, the regions are shown left to send and
    // the lag grows.
    let passes = resyncs(&z.a);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        resyncs(&z.a),
        passes,
        "a resync started under the same writes:\n{}",
        z.logs()
    );
    let r = z.a.admin().replication(VOLUME).unwrap();
    assert_eq!(r.state, "resync", "{r:?}");
    assert!(r.bytes_left.is_some_and(|b| b > 0), "{r:?}");
    assert!(r.lag_seconds.is_some_and(|l| l > 2.0), "{r:?}");

    // The writer stops: the resync starts within a second or two and brings the secondary
    // level with the last round.
    z.net.unlimited();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let round = w.join().unwrap();
    let flushed = unix_now();
    wait_replication(
        &z.a,
        "the resync after the writes",
        Duration::from_secs(60),
        |r| r.state == "replicating" && r.consistent_at.is_some_and(|t| t >= flushed),
    );
    assert!(
        z.a.log_text().contains("writes slowed to"),
        "the resync did not start for the writes' slowing:\n{}",
        z.logs()
    );
    let mut ro = BlkClient::connect_read_only(&z.b.socket_of(VOLUME)).unwrap();
    for i in 0..64u64 {
        assert!(
            ro.read(0, i << 20, 1 << 20).unwrap() == pattern(1 << 20, i << 20, round),
            "MiB {i} is not the last round's"
        );
    }
}

#[test]
fn an_encrypted_volume_crosses_the_link_as_ciphertext_and_the_peer_stores_the_same_bytes() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(z) = zones() else {
        return;
    };
    z.replicate(r#""size":"64MiB","encryption":"aes-xts-plain64""#);
    let capture = z.dir.path().join("link.pcap");
    let mut tcpdump = Capture::start(&z.net.a, &capture);

    // A plaintext anyone would recognise, 1 MiB of it.
    let marker = format!("PLAINTEXT-{}-MARKER", std::process::id());
    let mut data = marker.repeat((1 << 20) / marker.len() + 1).into_bytes();
    data.truncate(1 << 20);
    let offset = 8 << 20;
    let mut c = connect_retry(&z.a.socket_of(VOLUME), 1);
    assert_eq!(c.write(0, offset, &data), 0);
    assert_eq!(c.flush(0), 0);
    let written = unix_now();
    drop(c);
    wait_secondary_passes(
        &z,
        "the secondary has the write",
        written,
        Duration::from_secs(60),
    );
    // tcpdump writes what it has read when it stops, not what the kernel still holds for it:
    // the capture is stopped once it has the write's way across.
    wait_until(
        "the capture holds the write's way across the link",
        Duration::from_secs(30),
        || std::fs::metadata(&capture).is_ok_and(|m| m.len() > 1 << 20),
    );
    let pcap = tcpdump.stop();
    assert!(
        !contains(&pcap, marker.as_bytes()),
        "the plaintext crossed the link"
    );

    // At rest: the peer holds the primary's bytes, which are not the plaintext.
    let at_rest = |s: &Storaged| {
        let v = s.admin().volume(VOLUME).unwrap();
        let f = std::fs::File::open(v.backing.path()).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, offset).unwrap();
        buf
    };
    let (primary, secondary) = (at_rest(&z.a), at_rest(&z.b));
    assert!(
        primary == secondary,
        "the peer stores the primary's ciphertext"
    );
    assert!(!contains(&primary, marker.as_bytes()), "stored encrypted");
    // And it reads back as the plaintext.
    let mut ro = BlkClient::connect_read_only(&z.b.socket_of(VOLUME)).unwrap();
    assert!(ro.read(0, offset, 1 << 20).unwrap() == data);
}

/// Whether `needle` is somewhere in `hay`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `tcpdump` on a veth, in its namespace, writing a capture file.
struct Capture {
    child: std::process::Child,
    file: std::path::PathBuf,
}

impl Capture {
    /// Starts capturing every packet of `end`'s veth, whole, into `file`; returns once
    /// tcpdump listens.
    fn start(end: &End, file: &Path) -> Capture {
        use std::io::BufRead;
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &end.netns, "tcpdump", "-i", &end.veth])
            .args(["-s", "0", "-U", "-n", "-w"])
            .arg(file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("tcpdump (scripts/test installs it): {e}"));
        let stderr = child.stderr.take().unwrap();
        let mut lines = std::io::BufReader::new(stderr).lines();
        let mut said = String::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            if line.contains("listening on") {
                // Keep draining its stderr, so it never blocks on it.
                std::thread::spawn(move || lines.for_each(drop));
                return Capture {
                    child,
                    file: file.to_owned(),
                };
            }
            said.push_str(&line);
            said.push('\n');
        }
        let _ = child.wait();
        panic!("tcpdump did not start:\n{said}");
    }

    /// Stops the capture (SIGINT: tcpdump writes out what it has) and returns the file.
    fn stop(&mut self) -> Vec<u8> {
        // SAFETY: kill() with the pid of a child this test started and has not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "tcpdump: {status}");
        std::fs::read(&self.file).unwrap()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        // A test that failed before its stop: tcpdump is still running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
