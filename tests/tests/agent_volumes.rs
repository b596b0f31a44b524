//! Tenants' volumes through the agent, on a real storaged: made in storaged under the tenant's
//! name, seen and touched by their tenant only (another tenant's are 404 everywhere, never
//! listed), the admin in every namespace; storaged's refusals passed on with their reasons;
//! nothing half-made.

#![allow(clippy::unwrap_used)] // test helpers: a failed step stops the test

use storaged_tests::{openapi_properties, Agent, AgentClient, Storaged};

fn body(r: &storaged_tests::Response) -> serde_json::Value {
    serde_json::from_str(&r.body).unwrap_or(serde_json::Value::Null)
}

/// POST /v1/volumes as `c`; the status and the answer.
fn create(c: &AgentClient, json: &str) -> (u16, serde_json::Value) {
    let r = c.request("POST", "/v1/volumes", Some(json)).unwrap();
    (r.status, body(&r))
}

fn names(c: &AgentClient, query: &str) -> Vec<String> {
    let r = c
        .request("GET", &format!("/v1/volumes{query}"), None)
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    body(&r)
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            format!(
                "{}/{}",
                v["tenant"].as_str().unwrap(),
                v["name"].as_str().unwrap()
            )
        })
        .collect()
}

#[test]
fn a_tenants_volumes_are_its_own_and_another_tenant_finds_none_of_them() {
    let s = Storaged::start();
    let a = Agent::with_storaged(&s);
    let admin = a.admin();
    let acme = a.client(&admin.create_tenant("acme").unwrap().token);
    let globex = a.client(&admin.create_tenant("globex").unwrap().token);

    let (st, v) = create(
        &acme,
        r#"{"name":"data","size":"64MiB","tier":"premium","encryption":"none"}"#,
    );
    assert_eq!(st, 201, "{v}");
    assert_eq!(
        (v["tenant"].as_str(), v["size_bytes"].as_u64()),
        (Some("acme"), Some(64 << 20))
    );
    assert_eq!(
        (v["tier"].as_str(), v["encryption"].as_str()),
        (Some("premium"), Some("none"))
    );
    // The same name in another namespace is another volume.
    assert_eq!(create(&globex, r#"{"name":"data","size":"32MiB"}"#).0, 201);
    let mut in_storaged = s.volume_names();
    in_storaged.sort();
    assert_eq!(in_storaged, ["acme_data", "globex_data"]);

    // Each tenant lists and reads its own only.
    assert_eq!(names(&acme, ""), ["acme/data"]);
    assert_eq!(names(&globex, ""), ["globex/data"]);
    let r = acme.request("GET", "/v1/volumes/data", None).unwrap();
    assert_eq!(body(&r)["size_bytes"].as_u64(), Some(64 << 20));

    // Naming the other tenant gets acme nothing of globex's, and changes nothing.
    for (method, path, json) in [
        ("GET", "/v1/volumes?tenant=globex", None),
        ("GET", "/v1/volumes/data?tenant=globex", None),
        (
            "PATCH",
            "/v1/volumes/data?tenant=globex",
            Some(r#"{"size":"1GiB"}"#),
        ),
        ("DELETE", "/v1/volumes/data?tenant=globex", None),
        (
            "POST",
            "/v1/volumes",
            Some(r#"{"name":"x","size":"4MiB","tenant":"globex"}"#),
        ),
    ] {
        let r = acme.request(method, path, json).unwrap();
        assert_eq!(r.status, 404, "{method} {path}: {}", r.body);
    }
    // A name only the other tenant has is just as absent.
    assert_eq!(create(&globex, r#"{"name":"secret","size":"4MiB"}"#).0, 201);
    let r = acme.request("GET", "/v1/volumes/secret", None).unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(
        s.admin().volume("globex_data").unwrap().size_bytes,
        32 << 20
    );
    assert_eq!(names(&globex, ""), ["globex/data", "globex/secret"]);

    // The admin sees every namespace and acts in the one it names.
    assert_eq!(
        names(&admin, ""),
        ["acme/data", "globex/data", "globex/secret"]
    );
    assert_eq!(names(&admin, "?tenant=acme"), ["acme/data"]);
    let r = admin.request("GET", "/v1/volumes/data", None).unwrap();
    assert_eq!(r.status, 400, "the admin names the tenant: {}", r.body);
    let r = admin
        .request(
            "PATCH",
            "/v1/volumes/data?tenant=globex",
            Some(r#"{"size":"64MiB"}"#),
        )
        .unwrap();
    assert_eq!(
        (r.status, body(&r)["size_bytes"].as_u64()),
        (200, Some(64 << 20)),
        "{}",
        r.body
    );
    let (st, v) = create(&admin, r#"{"name":"ops","size":"4MiB","tenant":"acme"}"#);
    assert_eq!((st, v["tenant"].as_str()), (201, Some("acme")), "{v}");

    // A delete removes the volume from storaged.
    let r = acme.request("DELETE", "/v1/volumes/data", None).unwrap();
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(!s.volume_names().contains(&"acme_data".to_string()));
    assert_eq!(names(&acme, ""), ["acme/ops"]);
}

#[test]
fn bad_volume_input_gets_its_4xx_and_leaves_nothing_behind() {
    let s = Storaged::start();
    let a = Agent::with_storaged(&s);
    let admin = a.admin();
    let t = a.client(&admin.create_tenant("acme").unwrap().token);
    assert_eq!(create(&t, r#"{"name":"data","size":"8MiB"}"#).0, 201);
    let long = "v".repeat(60);
    let cases = [
        (
            r#"{"name":"x","size":"8MiB","colour":"red"}"#.to_string(),
            400,
            "colour",
        ),
        (r#"{"name":"x","size":"lots"}"#.to_string(), 400, "size"),
        (
            r#"{"name":"Bad_Name","size":"8MiB"}"#.to_string(),
            400,
            "Invalid volume name",
        ),
        (
            format!(r#"{{"name":"{long}","size":"8MiB"}}"#),
            400,
            "too long",
        ),
        (
            r#"{"name":"data","size":"8MiB"}"#.to_string(),
            409,
            "exists",
        ),
        // storaged's refusals, with storaged's reasons.
        (
            r#"{"name":"x","size":"8MiB","tier":"golden"}"#.to_string(),
            400,
            "tier",
        ),
        (r#"{"name":"x","size":"4097"}"#.to_string(), 400, "multiple"),
    ];
    for (json, want, says) in cases {
        let (st, v) = create(&t, &json);
        assert_eq!(st, want, "{json}: {v}");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{json}: {error:?} lacks {says:?}");
    }
    // The admin creating for a tenant that does not exist.
    let (st, v) = create(&admin, r#"{"name":"x","size":"8MiB","tenant":"ghost"}"#);
    assert_eq!(st, 404, "{v}");
    // None of the refused creates left a volume or a record.
    assert_eq!(s.volume_names(), ["acme_data"]);
    assert_eq!(names(&admin, ""), ["acme/data"]);
    // A query that is not tenant=NAME.
    let r = t.request("GET", "/v1/volumes?owner=x", None).unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    // A refused create can be made again, right, under the same name.
    assert_eq!(create(&t, r#"{"name":"x","size":"8MiB"}"#).0, 201);
}

#[test]
fn a_storaged_that_is_not_there_is_a_503_that_says_so() {
    let a = Agent::start();
    let admin = a.admin();
    let t = a.client(&admin.create_tenant("acme").unwrap().token);
    let (st, v) = create(&t, r#"{"name":"data","size":"8MiB"}"#);
    assert_eq!(st, 503, "{v}");
    assert!(v["error"].as_str().unwrap().contains("storaged"), "{v}");
    // The record did not stay behind: the tenant has no volume.
    let r = t.request("GET", "/v1/volumes/data", None).unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
}

#[test]
fn volumes_survive_an_agent_restart_and_a_kill_9() {
    let s = Storaged::start();
    let mut a = Agent::with_storaged(&s);
    let token = a.admin().create_tenant("acme").unwrap().token;
    assert_eq!(
        create(&a.client(&token), r#"{"name":"data","size":"8MiB"}"#).0,
        201
    );
    a.restart();
    assert_eq!(names(&a.client(&token), ""), ["acme/data"]);
    assert_eq!(
        create(&a.client(&token), r#"{"name":"logs","size":"8MiB"}"#).0,
        201
    );
    a.kill_and_restart();
    assert_eq!(names(&a.client(&token), ""), ["acme/data", "acme/logs"]);
}

#[test]
fn the_openapi_file_names_every_field_of_a_volume() {
    let s = Storaged::start();
    let a = Agent::with_storaged(&s);
    let t = a.client(&a.admin().create_tenant("doc").unwrap().token);
    // A volume's own limits replace its tier's: the admin's to set, not the tenant's.
    let (st, v) = create(&t, r#"{"name":"data","size":"8MiB","iops_limit":900}"#);
    assert_eq!(st, 403, "{v}");
    let r = t
        .request(
            "PATCH",
            "/v1/volumes/data",
            Some(r#"{"bandwidth_limit":"1GiB"}"#),
        )
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    let (st, v) = create(
        &a.admin(),
        r#"{"name":"data","size":"8MiB","iops_limit":900,"bandwidth_limit":"10MiB","tenant":"doc"}"#,
    );
    assert_eq!(st, 201, "{v}");
    let mut fields: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    fields.sort();
    assert_eq!(
        fields,
        openapi_properties("agent/openapi.yaml", &["components", "schemas", "Volume"])
    );
    assert_eq!(
        (v["iops_limit"].as_u64(), v["bandwidth_limit"].as_u64()),
        (Some(900), Some(10 << 20))
    );
}

#[test]
fn agentctl_makes_a_tenant_and_its_volume_and_deletes_them() {
    let s = Storaged::start();
    let a = Agent::with_storaged(&s);
    let socket = a.socket();
    let ctl = |token: Option<&str>, args: &[&str]| {
        let mut c = std::process::Command::new(storaged_tests::bin("agentctl"));
        c.arg("--socket").arg(&socket);
        match token {
            Some(t) => c.args(["--token", t]),
            None => c.arg("--token-file").arg(a.data_dir.join("admin.token")),
        };
        let out = c.args(args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "agentctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let created: serde_json::Value =
        serde_json::from_str(&ctl(None, &["tenant", "create", "acme"])).unwrap();
    let token = created["token"].as_str().unwrap().to_string();
    let t = Some(token.as_str());
    assert!(ctl(t, &["whoami"]).contains("acme"));
    ctl(
        t,
        &[
            "volume", "create", "data", "--size", "16MiB", "--tier", "premium",
        ],
    );
    ctl(t, &["volume", "update", "data", "--size", "32MiB"]);
    let shown: serde_json::Value =
        serde_json::from_str(&ctl(t, &["volume", "show", "data"])).unwrap();
    assert_eq!(shown["size_bytes"].as_u64(), Some(32 << 20));
    let listed: serde_json::Value =
        serde_json::from_str(&ctl(None, &["volume", "list", "--tenant", "acme"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(s.volume_names(), ["acme_data"]);
    ctl(t, &["volume", "delete", "data"]);
    assert!(s.volume_names().is_empty());
    ctl(None, &["tenant", "delete", "acme"]);
    let out = std::process::Command::new(storaged_tests::bin("agentctl"))
        .arg("--socket")
        .arg(&socket)
        .args(["--token", &token, "whoami"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}
