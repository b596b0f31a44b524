//! The binaries' command lines. (Also makes `cargo test --workspace` build the binaries that
//! the cross-process tests in `tests/` start.)

use std::process::Command;

fn help(bin: &str) -> String {
    let out = Command::new(bin)
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success(), "{bin} --help failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn storaged_help_names_the_data_dir_config_and_defaults() {
    let h = help(env!("CARGO_BIN_EXE_storaged"));
    for needle in [
        "--data-dir",
        "--config",
        "--metrics-addr",
        "admin.sock",
        "9563",
    ] {
        assert!(h.contains(needle), "storaged --help lacks {needle}:\n{h}");
    }
}

#[test]
fn storagectl_help_lists_every_command() {
    let h = help(env!("CARGO_BIN_EXE_storagectl"));
    for cmd in [
        "create", "list", "get", "resize", "set-tier", "delete", "info", "--socket",
    ] {
        assert!(h.contains(cmd), "storagectl --help lacks {cmd}:\n{h}");
    }
}

#[test]
fn storaged_without_a_data_dir_exits_non_zero_saying_so() {
    let out = Command::new(env!("CARGO_BIN_EXE_storaged"))
        .env_remove("STORAGED_DATA_DIR")
        .output()
        .expect("run storaged");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--data-dir"));
}
