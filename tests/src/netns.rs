//! Two network namespaces joined by a veth pair: a link between two daemons that the test can
//! delay, slow down and cut, and that carries nothing else.
//!
//! [`NetPair::new`] makes `stg-PID-N-a` and `stg-PID-N-b` (N counts the pairs of this process),
//! `veth-a` (10.201.0.1/30) in the first joined to `veth-b` (10.201.0.2/30) in the second, `lo`
//! up in both, and delays what leaves each end by 2.5 ms: a 5 ms round trip. Every pair has the
//! same names inside and the same addresses, for nothing else is in its namespaces. The delay
//! is `tc netem`'s where the kernel has `sch_netem`; where it has not, it is an NFQUEUE delay
//! line of this process ([`nfqueue`]). Where neither can be set up, or namespaces cannot be
//! made, the constructor says why and [`NetPair::or_skip`] skips the test (a failure under CI,
//! see [`crate::skip`]). On drop the namespaces are deleted (the veth pair with them), and so
//! are those a killed test process left behind.
//!
//! A daemon in a namespace listens there, loopback included: [`in_netns`] runs a closure in a
//! namespace, on a thread of its own (`setns(2)` with `CLONE_NEWNET` moves only the calling
//! thread), to reach it, e.g. its metrics endpoint.

mod nfqueue;

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// One end of a [`NetPair`]: its namespace, its veth and that veth's address.
#[derive(Clone, Debug)]
pub struct End {
    pub netns: String,
    pub veth: String,
    pub addr: Ipv4Addr,
}

/// How the link's delay is made.
enum Delay {
    Netem,
    /// The delay lines of the two ends, kept for their drop, which stops them.
    Nfqueue {
        _lines: Vec<nfqueue::DelayLine>,
    },
}

/// Two namespaces joined by a veth pair with a 5 ms round trip.
pub struct NetPair {
    pub a: End,
    pub b: End,
    delay: Delay,
}

/// Each end's delay: half the round trip.
pub const ONE_WAY_DELAY: Duration = Duration::from_micros(2500);

/// What the namespaces are called: `stg-PID-N-a`, `stg-PID-N-b`.
const PREFIX: &str = "stg-";

impl NetPair {
    /// The pair, or a test skipped (under CI: failed) saying why there is none.
    pub fn or_skip() -> Option<NetPair> {
        match NetPair::new() {
            Ok(p) => Some(p),
            Err(why) => {
                crate::skip(&format!("two network namespaces joined by a veth: {why}"));
                None
            }
        }
    }

    /// Makes the pair (see the module's doc), or says why it cannot.
    pub fn new() -> Result<NetPair, String> {
        static PAIRS: AtomicU32 = AtomicU32::new(0);
        remove_abandoned();
        let n = PAIRS.fetch_add(1, Ordering::Relaxed);
        let name = |side: &str| format!("{PREFIX}{}-{n}-{side}", std::process::id());
        let a = End {
            netns: name("a"),
            veth: "veth-a".into(),
            addr: Ipv4Addr::new(10, 201, 0, 1),
        };
        let b = End {
            netns: name("b"),
            veth: "veth-b".into(),
            addr: Ipv4Addr::new(10, 201, 0, 2),
        };
        // From here on, drop deletes what was made.
        let mut pair = NetPair {
            a,
            b,
            delay: Delay::Netem,
        };
        for end in [&pair.a, &pair.b] {
            run("ip", &["netns", "add", &end.netns])
                .map_err(|e| format!("network namespaces (ip netns add): {e}"))?;
        }
        run(
            "ip",
            &[
                "link",
                "add",
                &pair.a.veth,
                "netns",
                &pair.a.netns,
                "type",
                "veth",
                "peer",
                "name",
                &pair.b.veth,
                "netns",
                &pair.b.netns,
            ],
        )
        .map_err(|e| format!("a veth pair: {e}"))?;
        for end in [&pair.a, &pair.b] {
            let addr = format!("{}/30", end.addr);
            ip_in(end, &["addr", "add", &addr, "dev", &end.veth])?;
            ip_in(end, &["link", "set", "lo", "up"])?;
            ip_in(end, &["link", "set", &end.veth, "up"])?;
        }
        pair.delay = pair.add_delay()?;
        Ok(pair)
    }

    /// netem on both ends, or else a delay line on each.
    fn add_delay(&self) -> Result<Delay, String> {
        let delay = format!("{}us", ONE_WAY_DELAY.as_micros());
        let netem = [&self.a, &self.b].iter().try_for_each(|end| {
            tc_in(
                end,
                &[
                    "qdisc", "add", "dev", &end.veth, "root", "netem", "delay", &delay,
                ],
            )
        });
        let Err(no_netem) = netem else {
            return Ok(Delay::Netem);
        };
        let mut lines = Vec::new();
        for end in [&self.a, &self.b] {
            match nfqueue::DelayLine::start(&end.netns, &end.veth, ONE_WAY_DELAY) {
                Ok(l) => lines.push(l),
                Err(e) => {
                    return Err(format!(
                        "no way to delay the link: tc netem: {no_netem}; NFQUEUE: {e}"
                    ))
                }
            }
        }
        eprintln!(
            "NOTE: no tc netem here ({no_netem}): the link's {delay} each way is an NFQUEUE \
             delay line of the test process"
        );
        Ok(Delay::Nfqueue { _lines: lines })
    }

    /// Whether the delay is netem's (else this process's delay lines).
    pub fn netem(&self) -> bool {
        matches!(self.delay, Delay::Netem)
    }

    /// Cuts the link: both veth ends down (what a pulled cable looks like, with no reset).
    pub fn link_down(&self) {
        for end in [&self.a, &self.b] {
            ip_in(end, &["link", "set", &end.veth, "down"]).unwrap();
        }
    }

    /// Restores the link cut by [`NetPair::link_down`].
    pub fn link_up(&self) {
        for end in [&self.a, &self.b] {
            ip_in(end, &["link", "set", &end.veth, "up"]).unwrap();
        }
    }

    /// Limits each direction to `mbit` Mbit/s (netem's rate where netem delays the link, a
    /// token bucket filter otherwise).
    pub fn rate(&self, mbit: u32) {
        let rate = format!("{mbit}mbit");
        let delay = format!("{}us", ONE_WAY_DELAY.as_micros());
        for end in [&self.a, &self.b] {
            let args: Vec<&str> = if self.netem() {
                vec![
                    "qdisc", "change", "dev", &end.veth, "root", "netem", "delay", &delay, "rate",
                    &rate,
                ]
            } else {
                vec![
                    "qdisc", "replace", "dev", &end.veth, "root", "tbf", "rate", &rate, "burst",
                    "256kb", "latency", "2s",
                ]
            };
            tc_in(end, &args).unwrap();
        }
    }

    /// Lifts the limit of [`NetPair::rate`].
    pub fn unlimited(&self) {
        let delay = format!("{}us", ONE_WAY_DELAY.as_micros());
        for end in [&self.a, &self.b] {
            if self.netem() {
                tc_in(
                    end,
                    &[
                        "qdisc", "change", "dev", &end.veth, "root", "netem", "delay", &delay,
                    ],
                )
                .unwrap();
            } else {
                tc_in(end, &["qdisc", "del", "dev", &end.veth, "root"]).unwrap();
            }
        }
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        // The delay lines first: their threads are in the namespaces.
        self.delay = Delay::Netem;
        for end in [&self.a, &self.b] {
            let _ = run("ip", &["netns", "del", &end.netns]);
        }
    }
}

/// Runs `f` in namespace `netns`, on a thread of its own, and returns what it returns.
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(netns).unwrap_or_else(|e| panic!("cannot enter namespace {netns}: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// Moves the calling thread into namespace `netns` (`/run/netns/NAME`, as `ip netns` keeps it).
fn enter(netns: &str) -> std::io::Result<()> {
    let f = std::fs::File::open(format!("/run/netns/{netns}"))?;
    // SAFETY: setns(2) on a namespace descriptor f owns; CLONE_NEWNET changes only this
    // thread's network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `ip ARGS` in `end`'s namespace.
fn ip_in(end: &End, args: &[&str]) -> Result<(), String> {
    let mut all = vec!["-n", &end.netns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// `tc ARGS` in `end`'s namespace.
fn tc_in(end: &End, args: &[&str]) -> Result<(), String> {
    let mut all = vec!["-n", &end.netns];
    all.extend_from_slice(args);
    run("tc", &all)
}

/// Runs a command; its stderr if it fails.
fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Deletes the namespaces of test processes that are gone (killed before their drop ran).
fn remove_abandoned() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run("ip", &["netns", "del", &name]);
        }
    }
}
