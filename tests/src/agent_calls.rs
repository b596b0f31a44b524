//! The calls the agent tests make over and over: a request's status and JSON, a VM as the
//! API shows it, waiting for a VM to say something, a new tenant's client, the processes of a
//! jailed vmm's uid.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Agent, AgentClient};

/// A request's status and its body as JSON (null if it is none).
pub fn call(c: &AgentClient, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let r = c.request(method, path, body).unwrap();
    (
        r.status,
        serde_json::from_str(&r.body).unwrap_or(Value::Null),
    )
}

/// VM `id` as the API shows it (panics unless 200).
pub fn vm(c: &AgentClient, id: &str) -> Value {
    let (st, v) = call(c, "GET", &format!("/v1/vms/{id}"), None);
    assert_eq!(st, 200, "{v}");
    v
}

/// Waits until VM `id` says `cond`; returns what it said.
pub fn wait_vm(
    c: &AgentClient,
    id: &str,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let v = vm(c, id);
        if cond(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}; last {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether process `pid` exists.
pub fn alive(pid: u64) -> bool {
    // SAFETY: signal 0 checks that the process exists; nothing is sent.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// A new tenant's client.
pub fn tenant(a: &Agent, name: &str) -> AgentClient {
    a.client(&a.admin().create_tenant(name).unwrap().token)
}

/// The processes of real uid `uid` (a jailed vmm's, its own).
pub fn processes_of(uid: u64) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|ids| ids.split_whitespace().next()?.parse::<u64>().ok())
                    == Some(uid)
            })
        })
        .collect()
}
