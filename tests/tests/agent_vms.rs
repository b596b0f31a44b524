//! Tenants' VMs through the agent: each a vmm process booting a test guest (the assembly
//! guests of images/guests, the agent's image catalog here), its volumes served by a real
//! storaged. The lifecycle end to end (a guest that writes its disk, read back with blkio);
//! a killed vmm started again per its policy, with its backoff and its cap; a guest power-off
//! not taken for a crash; VMs that outlive a kill -9 of the agent and are found again; another
//! tenant's VMs and volumes out of reach; bad input refused with nothing left behind.

#![allow(clippy::unwrap_used)] // test helpers: a failed step stops the test

use std::time::{Duration, Instant};

use serde_json::Value;
use storaged_tests::agent_calls::{alive, call, processes_of, tenant, vm, wait_vm};
use storaged_tests::{connect_retry, openapi_properties, wait_until, Agent, AgentClient, Storaged};

#[test]
fn a_tenants_vm_boots_writes_its_volume_and_ends_and_the_data_is_on_the_volume() {
    let s = Storaged::start();
    let a = Agent::with_guests(&s);
    let t = tenant(&a, "acme");
    let (st, v) = call(
        &t,
        "POST",
        "/v1/volumes",
        Some(r#"{"name":"data","size":"64MiB","encryption":"none"}"#),
    );
    assert_eq!(st, 201, "{v}");
    let (st, v) = call(
        &t,
        "POST",
        "/v1/vms",
        Some(
            r#"{"id":"web","memory":"64MiB","kernel":"virtio_blk.elf","volumes":[{"name":"data"}]}"#,
        ),
    );
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["state"], "running");
    // The guest writes, reads back, resets the machine twice over, then resets: vmm exits 0,
    // which on-failure does not start again.
    let v = wait_vm(&t, "web", "the guest ends", Duration::from_secs(60), |v| {
        v["state"] == "stopped"
    });
    assert_eq!(v["last_exit"]["code"], 0, "{v}");
    assert_eq!(v["last_exit"]["failure"], false);
    assert_eq!(v["restarts"], 0);
    let fields = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    let schema = |n| openapi_properties("agent/openapi.yaml", &["components", "schemas", n]);
    assert_eq!(fields(&v), schema("Vm"));
    assert_eq!(fields(&v["last_exit"]), schema("LastExit"));
    let r = t.request("GET", "/v1/vms/web/console", None).unwrap();
    assert_eq!(r.body, "virtio-blk: PASS on queue 0\n".repeat(2));
    // The volume is the VM's while the VM exists: not deleted, and storaged serves it to the
    // VM's uid only.
    let (st, v) = call(&t, "DELETE", "/v1/volumes/data", None);
    assert_eq!(st, 409, "{v}");
    let info = s.admin().volume("acme_data").unwrap();
    let owner = info.owner.expect("an owner");
    assert_eq!(owner.vm_id.as_deref(), Some("web"));
    assert!(owner.uid >= 10_000_000, "{owner:?}");
    assert_eq!(call(&t, "DELETE", "/v1/vms/web", None).0, 204);
    assert_eq!(call(&t, "GET", "/v1/vms/web", None).0, 404);
    // Then root's (the agent's) again, and what the guest wrote to sector 8 is on it.
    let info = s.admin().volume("acme_data").unwrap();
    assert_eq!(info.owner.map(|o| (o.uid, o.vm_id)), Some((0, None)));
    let mut c = connect_retry(&info.socket, 1);
    let want: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 0x5a) as u8).collect();
    assert_eq!(c.read(0, 8 * 512, 4096).unwrap(), want);
    drop(c);
    assert_eq!(call(&t, "DELETE", "/v1/volumes/data", None).0, 204);
}

#[test]
fn a_killed_vmm_is_started_again_after_its_backoff_until_the_cap_and_a_stop_is_not_a_crash() {
    let s = Storaged::start();
    let mut a = Agent::with_guests(&s);
    let t = tenant(&a, "acme");
    let (st, v) = call(
        &t,
        "POST",
        "/v1/vms",
        Some(r#"{"id":"spin","memory":"32MiB","kernel":"spin.elf"}"#),
    );
    assert_eq!(st, 201, "{v}");
    let mut pid = v["pid"].as_u64().unwrap();
    let mut backoffs = Vec::new();
    // The console carries the runs before into each new one's: each run printed its line.
    let console_lines = |want: usize| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let c = t.console("spin", None).unwrap();
            if c.matches("spinning\n").count() == want {
                return;
            }
            assert!(Instant::now() < deadline, "{want} lines wanted: {c:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    for round in 1..=5u64 {
        console_lines(round as usize);
        // SAFETY: kill(2) on the vmm the agent started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let killed = Instant::now();
        let v = wait_vm(&t, "spin", "started again", Duration::from_secs(60), |v| {
            v["state"] == "running" && v["pid"].as_u64() != Some(pid)
        });
        backoffs.push(killed.elapsed());
        assert_eq!(v["restarts"], round, "{v}");
        assert_eq!(v["last_exit"]["failure"], true, "{v}");
        if round != 4 {
            assert_eq!(v["last_exit"]["signal"], 9, "{v}");
        } else {
            // Found again after the agent's restart: not its child, so no status to reap,
            // and vmm's log says no exit code: a kill.
            assert!(v["last_exit"]["signal"].is_null(), "{v}");
        }
        pid = v["pid"].as_u64().unwrap();
        if round == 3 {
            // The restarts so far are the record's: an agent restart does not reset the
            // backoff or the cap (the next waits are 8 s and 16 s, not 1 s again).
            a.kill_and_restart();
        }
    }
    // 1 s, 2 s, 4 s, ...: each wait at least its backoff, and longer than the one before.
    for (i, b) in backoffs.iter().enumerate() {
        assert!(
            *b >= Duration::from_secs(1 << i),
            "restart {i} after {b:?}: {backoffs:?}"
        );
    }
    // The sixth end within the minute is one too many.
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let v = wait_vm(&t, "spin", "left failed", Duration::from_secs(30), |v| {
        v["state"] == "failed"
    });
    assert_eq!(v["restarts"], 5);
    assert!(v["pid"].is_null());

    // Started by hand it runs again, and a stop ends it for good: the spin guest ignores its
    // power button, so once the stop's timeout has passed, vmm's shutdown ends it.
    let (st, v) = call(&t, "POST", "/v1/vms/spin/start", None);
    assert_eq!((st, v["state"].as_str()), (200, Some("running")), "{v}");
    for bad in ["abc", "301", "-1"] {
        let (st, v) = call(
            &t,
            "POST",
            &format!("/v1/vms/spin/stop?timeout_seconds={bad}"),
            None,
        );
        assert_eq!(st, 400, "{bad}: {v}");
    }
    let (st, v) = call(&t, "POST", "/v1/vms/spin/kill?timeout_seconds=1", None);
    assert_eq!(st, 400, "{v}");
    assert_eq!(
        vm(&t, "spin")["state"],
        "running",
        "the refused calls changed nothing"
    );
    let stopped = Instant::now();
    let (st, _) = call(&t, "POST", "/v1/vms/spin/stop?timeout_seconds=1", None);
    assert_eq!(st, 200);
    let v = wait_vm(&t, "spin", "stopped", Duration::from_secs(30), |v| {
        v["state"] == "stopped"
    });
    assert!(
        stopped.elapsed() >= Duration::from_secs(1),
        "the guest had its second"
    );
    assert_eq!(
        v["last_exit"]["code"],
        0,
        "the API's shutdown ends vmm with 0: {v}\n{}",
        a.log_text()
    );
    a.wait_for_log("power button pressed");
    a.wait_for_log("the guest did not power off in time");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(vm(&t, "spin")["state"], "stopped", "not started again");
}

#[test]
fn a_guest_power_off_is_not_a_failure_and_always_starts_it_again() {
    let s = Storaged::start();
    let a = Agent::with_guests(&s);
    let t = tenant(&a, "acme");
    let body = |id: &str, policy: &str| {
        format!(
            r#"{{"id":"{id}","memory":"32MiB","kernel":"poweroff.elf","restart_policy":"{policy}"}}"#
        )
    };
    assert_eq!(
        call(&t, "POST", "/v1/vms", Some(&body("calm", "on-failure"))).0,
        201
    );
    assert_eq!(
        call(&t, "POST", "/v1/vms", Some(&body("eager", "always"))).0,
        201
    );
    let v = wait_vm(
        &t,
        "calm",
        "the guest powers off",
        Duration::from_secs(30),
        |v| v["state"] == "stopped",
    );
    assert_eq!(
        (v["last_exit"]["code"].as_i64(), v["restarts"].as_u64()),
        (Some(0), Some(0)),
        "{v}"
    );
    let v = wait_vm(&t, "eager", "started again", Duration::from_secs(30), |v| {
        v["restarts"].as_u64() >= Some(1)
    });
    assert_eq!(v["last_exit"]["failure"], false, "{v}");
    assert_eq!(vm(&t, "calm")["restarts"], 0);
    assert_eq!(call(&t, "POST", "/v1/vms/eager/kill", None).0, 200);
}

#[test]
fn vms_outlive_a_kill_9_of_the_agent_are_found_again_and_one_that_died_meanwhile_is_restarted() {
    let s = Storaged::start();
    let mut a = Agent::with_guests(&s);
    let token = a.admin().create_tenant("acme").unwrap().token;
    let t = a.client(&token);
    for id in ["one", "two"] {
        let (st, v) = call(
            &t,
            "POST",
            "/v1/vms",
            Some(&format!(
                r#"{{"id":"{id}","memory":"32MiB","kernel":"spin.elf"}}"#
            )),
        );
        assert_eq!(st, 201, "{v}");
    }
    let pid = |c: &AgentClient, id: &str| vm(c, id)["pid"].as_u64().unwrap();
    let (one, two) = (pid(&t, "one"), pid(&t, "two"));
    // The agent dies; the VMs do not.
    a.signal_and_wait(libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(500));
    assert!(alive(one) && alive(two));
    let api = a.data_dir.join("vms/acme_one/jail/run/api.sock");
    assert_eq!(
        vmm_api::VmmClient::new(&api).status().unwrap().state,
        vmm_api::VmState::Running
    );
    // One dies while the agent is away.
    // SAFETY: kill(2) on a vmm the agent started.
    unsafe { libc::kill(two as i32, libc::SIGKILL) };
    wait_until("vmm two gone", Duration::from_secs(10), || !alive(two));
    a.restart_after_stop();
    let t = a.client(&token);
    let v = vm(&t, "one");
    assert_eq!(
        (v["state"].as_str(), v["pid"].as_u64()),
        (Some("running"), Some(one)),
        "{v}"
    );
    let v = wait_vm(
        &t,
        "two",
        "two started again",
        Duration::from_secs(30),
        |v| v["state"] == "running" && v["pid"].as_u64() != Some(two),
    );
    assert_eq!(v["restarts"], 1, "{v}");
    // The found-again one is watched: its end is seen and handled by its policy.
    // SAFETY: as above.
    unsafe { libc::kill(one as i32, libc::SIGKILL) };
    wait_vm(
        &t,
        "one",
        "one started again",
        Duration::from_secs(30),
        |v| v["state"] == "running" && v["pid"].as_u64() != Some(one),
    );
    for id in ["one", "two"] {
        assert_eq!(call(&t, "DELETE", &format!("/v1/vms/{id}"), None).0, 204);
    }
}

#[test]
fn another_tenants_vms_and_volumes_are_out_of_reach_and_bad_vms_leave_nothing_behind() {
    let s = Storaged::start();
    let a = Agent::with_guests(&s);
    let acme = tenant(&a, "acme");
    let globex = tenant(&a, "globex");
    assert_eq!(
        call(
            &acme,
            "POST",
            "/v1/volumes",
            Some(r#"{"name":"data","size":"16MiB"}"#)
        )
        .0,
        201
    );
    let (st, v) = call(
        &acme,
        "POST",
        "/v1/vms",
        Some(r#"{"id":"web","memory":"32MiB","kernel":"spin.elf","volumes":[{"name":"data"}]}"#),
    );
    assert_eq!(st, 201, "{v}");
    let pid = v["pid"].as_u64().unwrap();

    // globex cannot see, stop, kill or delete acme's VM, nor use acme's volume.
    for (method, path) in [
        ("GET", "/v1/vms/web"),
        ("POST", "/v1/vms/web/stop"),
        ("POST", "/v1/vms/web/kill"),
        ("DELETE", "/v1/vms/web"),
        ("GET", "/v1/vms/web/console"),
        ("GET", "/v1/vms/web?tenant=acme"),
    ] {
        let (st, v) = call(&globex, method, path, None);
        assert_eq!(st, 404, "{method} {path}: {v}");
    }
    assert_eq!(
        call(&globex, "GET", "/v1/vms", None).1,
        Value::Array(vec![])
    );
    let (st, v) = call(
        &globex,
        "POST",
        "/v1/vms",
        Some(r#"{"id":"steal","memory":"32MiB","kernel":"spin.elf","volumes":[{"name":"data"}]}"#),
    );
    assert_eq!(st, 400, "{v}");
    assert!(alive(pid), "acme's VM untouched");
    assert_eq!(vm(&acme, "web")["state"], "running");
    // The admin sees it.
    let (st, v) = call(&a.admin(), "GET", "/v1/vms", None);
    assert_eq!((st, v.as_array().unwrap().len()), (200, 1));

    // Bad VMs: each its 4xx, and no VM, process or directory left.
    let bad = [
        (
            r#"{"memory":"32MiB","kernel":"spin.elf","colour":"red"}"#,
            400,
            "colour",
        ),
        (
            r#"{"memory":"32MiB","kernel":"/etc/passwd"}"#,
            400,
            "not a file of the image catalog",
        ),
        (
            r#"{"memory":"32MiB","kernel":"../../../../etc/passwd"}"#,
            400,
            "not a file of the image catalog",
        ),
        (
            r#"{"memory":"32MiB","kernel":"nothing.elf"}"#,
            400,
            "not a file of the image catalog",
        ),
        (
            r#"{"memory":"32MiB","kernel":"spin.elf","volumes":[{"name":"ghost"}]}"#,
            400,
            "no volume ghost",
        ),
        (
            r#"{"memory":"32MiB","kernel":"spin.elf","volumes":[{"name":"data"}]}"#,
            409,
            "attached to VM web",
        ),
        (
            r#"{"memory":"32MiB","kernel":"spin.elf","vcpus":0}"#,
            400,
            "vcpus",
        ),
        (
            r#"{"memory":"32MiB","kernel":"spin.o"}"#,
            400,
            "not a kernel",
        ),
        (r#"{"memory":"lots","kernel":"spin.elf"}"#, 400, "memory"),
        (
            r#"{"id":"Bad Id","memory":"32MiB","kernel":"spin.elf"}"#,
            400,
            "Invalid VM id",
        ),
        (
            r#"{"id":"web","memory":"64MiB","kernel":"spin.elf"}"#,
            409,
            "exists",
        ),
    ];
    for (body, want, says) in bad {
        let (st, v) = call(&acme, "POST", "/v1/vms", Some(body));
        assert_eq!(st, want, "{body}: {v}");
        let e = v["error"].as_str().unwrap_or_default();
        assert!(e.contains(says), "{body}: {e:?} lacks {says:?}");
    }
    let (_, list) = call(&acme, "GET", "/v1/vms", None);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let dirs: Vec<_> = std::fs::read_dir(a.data_dir.join("vms")).unwrap().collect();
    assert_eq!(dirs.len(), 1);
    // A retried create with the same id and spec is the same VM.
    let (st, v) = call(
        &acme,
        "POST",
        "/v1/vms",
        Some(r#"{"id":"web","memory":"32MiB","kernel":"spin.elf","volumes":[{"name":"data"}]}"#),
    );
    assert_eq!((st, v["pid"].as_u64()), (200, Some(pid)), "{v}");
    // A vmm that cannot start (the volume gone from storaged underneath) leaves no VM.
    assert_eq!(call(&acme, "POST", "/v1/vms/web/kill", None).0, 200);
    assert_eq!(call(&acme, "DELETE", "/v1/vms/web", None).0, 204);
    assert!(!a.data_dir.join("vms/acme_web").exists());
    let (_, images) = call(&acme, "GET", "/v1/images", None);
    assert!(
        images.as_array().unwrap().iter().any(|i| i == "spin.elf"),
        "{images}"
    );
}

#[test]
fn agentctl_creates_watches_and_deletes_a_vm() {
    let s = Storaged::start();
    let a = Agent::with_guests(&s);
    let token = a.admin().create_tenant("acme").unwrap().token;
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(storaged_tests::bin("agentctl"))
            .arg("--socket")
            .arg(a.socket())
            .args(["--token", &token])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "agentctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(ctl(&["images"]).contains("hello.elf"));
    let created: Value = serde_json::from_str(&ctl(&[
        "vm",
        "create",
        "--id",
        "hi",
        "--kernel",
        "hello.elf",
        "--memory",
        "32MiB",
        "--restart-policy",
        "never",
    ]))
    .unwrap();
    assert_eq!(created["restart_policy"], "never");
    let t = a.client(&token);
    wait_vm(&t, "hi", "the guest ends", Duration::from_secs(30), |v| {
        v["state"] == "stopped"
    });
    assert_eq!(ctl(&["vm", "console", "hi"]), "hello from the test guest\n");
    let listed: Value = serde_json::from_str(&ctl(&["vm", "list"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    ctl(&["vm", "delete", "hi"]);
    assert_eq!(call(&t, "GET", "/v1/vms/hi", None).0, 404);
}

#[test]
fn metrics_count_vms_by_state_launches_restarts_and_each_vms_exits_for_the_admin_only() {
    let s = Storaged::start();
    let a = Agent::with_guests(&s);
    let t = tenant(&a, "acme");
    assert_eq!(
        call(
            &t,
            "POST",
            "/v1/volumes",
            Some(r#"{"name":"data","size":"16MiB"}"#)
        )
        .0,
        201
    );
    let (st, v) = call(
        &t,
        "POST",
        "/v1/vms",
        Some(r#"{"id":"spin","memory":"32MiB","kernel":"spin.elf","volumes":[{"name":"data"}]}"#),
    );
    assert_eq!(st, 201, "{v}");
    let (st, _) = call(
        &t,
        "POST",
        "/v1/vms",
        Some(r#"{"id":"idle","memory":"32MiB","kernel":"spin.elf","start":false}"#),
    );
    assert_eq!(st, 201);
    // One restart, by the policy.
    let pid = v["pid"].as_u64().unwrap();
    // SAFETY: kill(2) on the vmm the agent started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    wait_vm(&t, "spin", "started again", Duration::from_secs(30), |v| {
        v["state"] == "running" && v["pid"].as_u64() != Some(pid)
    });
    let scrape = || a.admin().request("GET", "/metrics", None).unwrap();
    let m = || {
        let r = scrape();
        assert_eq!(r.status, 200, "{}", r.body);
        r.body
    };
    let value = |text: &str, series: &str| storaged_tests::metric_value(text, series);
    wait_until(
        "the launch latency observed twice",
        Duration::from_secs(10),
        || value(&m(), "agent_vm_launch_seconds_count") == Some(2.0),
    );
    // The vCPU's exits of the running VM, read from its vmm (the guest prints: port writes).
    wait_until("the VM's exits counted", Duration::from_secs(10), || {
        value(
            &m(),
            r#"agent_vm_vcpu_exits_total{kind="io_out",tenant="acme",vm="spin"}"#,
        )
        .is_some_and(|n| n > 0.0)
    });
    let text = m();
    assert_eq!(
        value(&text, r#"agent_vms{state="running"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, r#"agent_vms{state="stopped"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(&text, r#"agent_vms{state="failed"}"#),
        Some(0.0),
        "{text}"
    );
    assert_eq!(value(&text, "agent_vm_launches_total"), Some(2.0), "{text}");
    assert_eq!(value(&text, "agent_vm_restarts_total"), Some(1.0), "{text}");
    assert_eq!(
        value(&text, r#"agent_vm_ends_total{failure="true"}"#),
        Some(1.0),
        "{text}"
    );
    storaged_tests::promtool_check(&text);
    // Tenants' names and VMs are the admin's to see.
    assert_eq!(t.request("GET", "/metrics", None).unwrap().status, 403);
    assert_eq!(
        a.client("")
            .request("GET", "/metrics", None)
            .unwrap()
            .status,
        401
    );
}

#[test]
fn concurrent_starts_make_one_vmm_and_a_delete_leaves_none() {
    let s = Storaged::start();
    let a = Agent::with_guests(&s);
    let t = tenant(&a, "acme");
    let (st, v) = call(
        &t,
        "POST",
        "/v1/vms",
        Some(r#"{"id":"web","memory":"32MiB","kernel":"spin.elf","start":false}"#),
    );
    assert_eq!(st, 201, "{v}");
    let mut uid = None;
    for _ in 0..3 {
        std::thread::scope(|sc| {
            for _ in 0..8 {
                sc.spawn(|| assert_eq!(call(&t, "POST", "/v1/vms/web/start", None).0, 200));
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        uid = vm(&t, "web")["uid"].as_u64();
        let pids = processes_of(uid.expect("a jailed vmm's uid"));
        assert_eq!(pids.len(), 1, "one vmm for the VM: {pids:?}");
        assert_eq!(vm(&t, "web")["pid"].as_u64(), Some(u64::from(pids[0])));
        assert_eq!(call(&t, "POST", "/v1/vms/web/kill", None).0, 200);
        wait_vm(&t, "web", "killed", Duration::from_secs(10), |v| {
            v["state"] == "stopped"
        });
    }
    // Starts racing a delete: whatever wins, no vmm is left without its VM.
    std::thread::scope(|sc| {
        for _ in 0..4 {
            sc.spawn(|| {
                let _ = call(&t, "POST", "/v1/vms/web/start", None);
            });
        }
        sc.spawn(|| {
            std::thread::sleep(Duration::from_millis(5));
            let _ = call(&t, "DELETE", "/v1/vms/web", None);
        });
    });
    let (st, _) = call(&t, "GET", "/v1/vms/web", None);
    if st == 200 {
        assert_eq!(call(&t, "DELETE", "/v1/vms/web", None).0, 204);
    }
    wait_until("no vmm left", Duration::from_secs(10), || {
        processes_of(uid.unwrap()).is_empty()
    });
}

#[test]
fn a_tenant_with_vms_or_volumes_is_not_deleted_and_odd_specs_are_refused_alike() {
    let s = Storaged::start();
    let a = Agent::with_guests(&s);
    let t = tenant(&a, "acme");
    assert_eq!(
        call(
            &t,
            "POST",
            "/v1/volumes",
            Some(r#"{"name":"data","size":"8MiB"}"#)
        )
        .0,
        201
    );
    let r = a
        .admin()
        .request("DELETE", "/v1/tenants/acme", None)
        .unwrap();
    assert_eq!(r.status, 409, "{}", r.body);
    // A kernel outside the catalog answers as one that does not exist: nothing to learn.
    let mut errors = Vec::new();
    for kernel in [
        "../vms/acme_web/vmm.log",
        "../vms/nobody/x",
        "nothing.elf",
        "/etc/passwd",
        "a/../spin.elf",
    ] {
        let (st, v) = call(
            &t,
            "POST",
            "/v1/vms",
            Some(&format!(r#"{{"memory":"32MiB","kernel":"{kernel}"}}"#)),
        );
        assert_eq!(st, 400, "{kernel}: {v}");
        errors.push(v["error"].as_str().unwrap().replace(kernel, "K"));
    }
    errors.dedup();
    assert_eq!(errors.len(), 1, "{errors:?}");
    for (body, says) in [
        (
            r#"{"memory":"32MiB","kernel":"spin.elf","volumes":[{"name":"data"},{"name":"data"}]}"#,
            "twice",
        ),
        (r#"{"memory":"1PiB","kernel":"spin.elf"}"#, "memory"),
        (r#"{"memory":"33MiB","kernel":"spin.elf"}"#, "memory"),
        (
            "{\"memory\":\"32MiB\",\"kernel\":\"spin.elf\",\"cmdline\":\"a\\u0000b\"}",
            "NUL",
        ),
    ] {
        let (st, v) = call(&t, "POST", "/v1/vms", Some(body));
        assert_eq!(st, 400, "{body}: {v}");
        assert!(v["error"].as_str().unwrap().contains(says), "{body}: {v}");
    }
    // A command line that looks like an option is the guest's, not vmm's.
    let (st, v) = call(
        &t,
        "POST",
        "/v1/vms",
        Some(r#"{"id":"odd","memory":"32MiB","kernel":"spin.elf","cmdline":"--help"}"#),
    );
    assert_eq!(st, 201, "{v}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(vm(&t, "odd")["state"], "running");
    assert_eq!(call(&t, "DELETE", "/v1/vms/odd", None).0, 204);
    assert_eq!(call(&t, "DELETE", "/v1/volumes/data", None).0, 204);
    let r = a
        .admin()
        .request("DELETE", "/v1/tenants/acme", None)
        .unwrap();
    assert_eq!(r.status, 204, "{}", r.body);
}

#[test]
fn each_vmm_runs_in_cgroups_of_its_own_with_the_vms_cpu_and_memory_limits() {
    let s = Storaged::start();
    let a = Agent::with_guests(&s);
    let t = tenant(&a, "acme");
    let (st, v) = call(
        &t,
        "POST",
        "/v1/vms",
        Some(r#"{"id":"web","vcpus":2,"memory":"64MiB","kernel":"spin.elf"}"#),
    );
    assert_eq!(st, 201, "{v}");
    let pid = v["pid"].as_u64().unwrap();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let path_of = |controller: &str| {
        cgroup.lines().find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, c, path) = (p.next()?, p.next()?, p.next()?);
            (c.split(',').any(|x| x == controller) || (controller.is_empty() && c.is_empty()))
                .then(|| path.to_string())
        })
    };
    let read = |p: std::path::PathBuf| {
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .trim()
            .to_string()
    };
    let limit = (64u64 << 20) + (64 << 20);
    let dirs: Vec<std::path::PathBuf> = if std::path::Path::new("/sys/fs/cgroup/cgroup.controllers")
        .exists()
        && std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .unwrap()
            .contains("memory")
    {
        let d = std::path::Path::new("/sys/fs/cgroup")
            .join(path_of("").unwrap().trim_start_matches('/'));
        assert!(d.ends_with("agent-vms/acme_web"), "{cgroup}");
        assert_eq!(read(d.join("memory.max")), limit.to_string());
        assert_eq!(read(d.join("cpu.max")), "200000 100000");
        vec![d]
    } else {
        let m = std::path::Path::new("/sys/fs/cgroup/memory")
            .join(path_of("memory").unwrap().trim_start_matches('/'));
        let c = std::path::Path::new("/sys/fs/cgroup/cpu")
            .join(path_of("cpu").unwrap().trim_start_matches('/'));
        assert!(
            m.ends_with("agent-vms/acme_web") && c.ends_with("agent-vms/acme_web"),
            "{cgroup}"
        );
        assert_eq!(read(m.join("memory.limit_in_bytes")), limit.to_string());
        assert_eq!(read(c.join("cpu.cfs_quota_us")), "200000");
        assert_eq!(read(c.join("cpu.cfs_period_us")), "100000");
        vec![m, c]
    };
    // Its cgroups go with it.
    assert_eq!(call(&t, "POST", "/v1/vms/web/kill", None).0, 200);
    wait_vm(&t, "web", "killed", Duration::from_secs(10), |v| {
        v["state"] == "stopped"
    });
    for d in &dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
}
