//! The agent's API from outside, on the real binary: who each token is, what each may do
//! (the auth matrix of the tenant calls), tenants across restarts and a kill -9, bad input and
//! its 4xx, the audit log, the API on TCP as on the socket.

#![allow(clippy::unwrap_used)] // test helpers: a failed step stops the test

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;

use agent_api::Role;
use storaged_tests::{bin, openapi_properties, Agent};

/// The status of `method path` with `body`, with the admin token, or with `token`.
fn status(a: &Agent, token: &str, method: &str, path: &str, body: Option<&str>) -> u16 {
    a.client(token).request(method, path, body).unwrap().status
}

#[test]
fn the_admin_token_is_written_0600_on_first_start_and_is_the_admin() {
    let a = Agent::start();
    let path = a.data_dir.join("admin.token");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    assert_eq!(a.admin_token().len(), 64);
    let w = a.admin().whoami().unwrap();
    assert_eq!(w.role, Role::Admin);
    assert!(a.log_text().contains("admin token created"));
    assert!(
        !a.log_text().contains(&a.admin_token()),
        "the log holds the token"
    );
}

#[test]
fn no_token_a_wrong_one_and_a_revoked_one_are_refused_and_a_tenant_is_not_the_admin() {
    let a = Agent::start();
    let admin = a.admin();
    let t = admin.create_tenant("acme").unwrap();
    assert_eq!(t.name, "acme");

    // No token, a malformed header, a wrong token: 401 on every call.
    // An empty token: the client sends "Authorization: Bearer ", which carries none.
    let raw = a.client("");
    for (method, path) in [
        ("GET", "/v1/whoami"),
        ("GET", "/v1/tenants"),
        ("POST", "/v1/tenants"),
    ] {
        let r = raw.request(method, path, Some(r#"{"name":"x"}"#)).unwrap();
        assert_eq!(r.status, 401, "{method} {path} without a token: {}", r.body);
        assert!(
            r.json()["error"].as_str().unwrap().contains("bearer"),
            "{}",
            r.body
        );
        assert_eq!(
            status(&a, "nope", method, path, Some(r#"{"name":"x"}"#)),
            401
        );
    }

    // The tenant is itself, and none of the admin's calls are its.
    let tenant = a.client(&t.token);
    let w = tenant.whoami().unwrap();
    assert_eq!((w.role, w.tenant.as_deref()), (Role::Tenant, Some("acme")));
    assert_eq!(status(&a, &t.token, "GET", "/v1/tenants", None), 403);
    assert_eq!(
        status(
            &a,
            &t.token,
            "POST",
            "/v1/tenants",
            Some(r#"{"name":"evil"}"#)
        ),
        403
    );
    assert_eq!(
        status(&a, &t.token, "DELETE", "/v1/tenants/acme", None),
        403
    );
    let names: Vec<_> = admin
        .tenants()
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["acme"], "a refused call changed nothing");

    // Revoked: refused from the next call on.
    admin.delete_tenant("acme").unwrap();
    assert_eq!(status(&a, &t.token, "GET", "/v1/whoami", None), 401);
    assert!(admin.tenants().unwrap().is_empty());
}

#[test]
fn tenants_and_their_tokens_survive_a_restart_and_a_kill_9_and_the_admin_token_stays() {
    let mut a = Agent::start();
    let admin_token = a.admin_token();
    let one = a.admin().create_tenant("one").unwrap();
    let two = a.admin().create_tenant("two").unwrap();
    a.admin().delete_tenant("two").unwrap();
    a.restart();
    assert_eq!(a.admin_token(), admin_token);
    assert_eq!(
        a.client(&one.token).whoami().unwrap().tenant.as_deref(),
        Some("one")
    );
    assert_eq!(status(&a, &two.token, "GET", "/v1/whoami", None), 401);
    let three = a.admin().create_tenant("three").unwrap();
    a.kill_and_restart();
    assert_eq!(
        a.client(&three.token).whoami().unwrap().tenant.as_deref(),
        Some("three")
    );
    let names: Vec<_> = a
        .admin()
        .tenants()
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["one", "three"]);
}

#[test]
fn bad_input_gets_its_4xx_with_a_reason() {
    let a = Agent::start();
    let admin = a.admin();
    admin.create_tenant("acme").unwrap();
    let cases: [(&str, &str, Option<&str>, u16, &str); 8] = [
        (
            "POST",
            "/v1/tenants",
            Some(r#"{"name":"a","nmae":"b"}"#),
            400,
            "nmae",
        ),
        ("POST", "/v1/tenants", Some(r#"{"name":5}"#), 400, "name"),
        ("POST", "/v1/tenants", None, 400, "empty"),
        (
            "POST",
            "/v1/tenants",
            Some(r#"{"name":"Bad Name"}"#),
            400,
            "Invalid tenant name",
        ),
        (
            "POST",
            "/v1/tenants",
            Some(r#"{"name":"acme"}"#),
            409,
            "exists",
        ),
        ("DELETE", "/v1/tenants/ghost", None, 404, "ghost"),
        ("GET", "/v1/nothing", None, 404, "No such endpoint"),
        ("PUT", "/v1/tenants", Some("{}"), 405, "not allowed"),
    ];
    for (method, path, body, want, says) in cases {
        let r = admin.request(method, path, body).unwrap();
        assert_eq!(r.status, want, "{method} {path} {body:?}: {}", r.body);
        let error = r.json()["error"].as_str().unwrap_or_default().to_string();
        assert!(
            error.contains(says),
            "{method} {path}: {error:?} lacks {says:?}"
        );
    }
    let names: Vec<_> = admin
        .tenants()
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["acme"]);
}

#[test]
fn each_mutating_call_writes_one_audit_line_naming_who_and_never_a_token() {
    let a = Agent::start();
    let admin = a.admin();
    let t = admin.create_tenant("acme").unwrap();
    let _ = a
        .client(&t.token)
        .request("POST", "/v1/tenants", Some(r#"{"name":"x"}"#));
    let _ = a
        .client("wrong")
        .request("DELETE", "/v1/tenants/acme", None);
    admin.whoami().unwrap();
    admin.delete_tenant("acme").unwrap();
    // The line is written before the answer, but reaches the harness through a pipe.
    a.wait_for_log("action=DELETE /v1/tenants/acme outcome=204");
    let log = a.log_text();
    let audit: Vec<&str> = log.lines().filter(|l| l.contains(" audit: ")).collect();
    assert_eq!(audit.len(), 4, "{audit:#?}");
    let expect = [
        ("tenant=admin", "POST /v1/tenants", "outcome=201"),
        ("tenant=acme", "POST /v1/tenants", "outcome=403"),
        ("tenant=-", "DELETE /v1/tenants/acme", "outcome=401"),
        ("tenant=admin", "DELETE /v1/tenants/acme", "outcome=204"),
    ];
    for (line, (who, action, outcome)) in audit.iter().zip(expect) {
        assert!(
            line.contains(who) && line.contains(action) && line.contains(outcome),
            "{line}"
        );
    }
    for secret in [a.admin_token(), t.token] {
        assert!(!log.contains(&secret), "the log holds a token");
    }
}

#[test]
fn the_api_answers_on_its_tcp_address_as_on_its_socket() {
    let a = Agent::start();
    let addr = a.tcp_addr();
    assert!(addr.ip().is_loopback());
    let get = |token: Option<&str>| {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "GET /v1/whoami HTTP/1.1\r\nHost: agent\r\n{auth}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let ok = get(Some(&a.admin_token()));
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains(r#"{"role":"admin"}"#), "{ok}");
    let refused = get(None);
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    assert!(
        refused
            .to_ascii_lowercase()
            .contains("www-authenticate: bearer"),
        "{refused}"
    );
}

#[test]
fn a_second_agent_on_the_same_data_dir_is_refused_and_says_why() {
    let a = Agent::start();
    let out = std::process::Command::new(bin("agent"))
        .arg("--data-dir")
        .arg(&a.data_dir)
        .args(["--listen", "off"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("state database"), "{err}");
    // The first one still answers.
    a.admin().whoami().unwrap();
}

#[test]
fn the_openapi_file_names_every_field_the_api_answers_with() {
    let a = Agent::start();
    let fields = |v: serde_json::Value| {
        let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    };
    let schema = |name| openapi_properties("agent/openapi.yaml", &["components", "schemas", name]);
    let created = a
        .admin()
        .request("POST", "/v1/tenants", Some(r#"{"name":"doc"}"#))
        .unwrap()
        .json();
    assert_eq!(fields(created.clone()), schema("TenantCreated"));
    let token = created["token"].as_str().unwrap().to_string();
    let listed = a
        .admin()
        .request("GET", "/v1/tenants", None)
        .unwrap()
        .json();
    assert_eq!(fields(listed[0].clone()), schema("Tenant"));
    let whoami = a
        .client(&token)
        .request("GET", "/v1/whoami", None)
        .unwrap()
        .json();
    assert_eq!(fields(whoami), schema("Whoami"));
}

#[test]
fn with_a_certificate_the_tcp_address_serves_https_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = storaged_tests::pki::Ca::new("agent CA");
    let files = ca.issue(dir.path(), "agent", &["127.0.0.1"]);
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            files.cert.display(),
            files.key.display()
        ),
    )
    .unwrap();
    let a = Agent::start_with(&["--config", config.to_str().unwrap()]);
    assert!(
        a.log_text().contains("api_url=https://"),
        "{}",
        a.log_text()
    );
    let addr = a.tcp_addr();
    let mut tls = storaged_tests::pki::connect(addr, "127.0.0.1", None, &files.ca).unwrap();
    write!(
        tls,
        "GET /v1/whoami HTTP/1.1\r\nHost: agent\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        a.admin_token()
    )
    .unwrap();
    let mut out = String::new();
    let _ = tls.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains(r#"{"role":"admin"}"#), "{out}");
    // Plain HTTP on the same address gets no answer.
    let mut plain = std::net::TcpStream::connect(addr).unwrap();
    plain
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    write!(plain, "GET /v1/whoami HTTP/1.1\r\nHost: agent\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let _ = plain.read_to_end(&mut buf);
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    // A certificate file that is not one stops the agent at start, saying which.
    std::fs::write(&files.cert, "not a certificate").unwrap();
    let out = std::process::Command::new(bin("agent"))
        .arg("--data-dir")
        .arg(dir.path().join("other"))
        .args([
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("agent.pem"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
