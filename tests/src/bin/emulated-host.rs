//! `emulated-host`: runs a full-boot scenario (`tests/scenarios/NAME.sh`) where it can run:
//! directly on a host whose KVM is hardware virtualization, else in the emulated host of
//! `storaged_tests::emulated_host` (QEMU TCG with SVM and nested paging). Prints the console
//! as it comes and exits 0 when the scenario passed. `scripts/emulated-host` builds what it
//! needs and calls it.

use std::process::ExitCode;
use std::time::Duration;

use storaged_tests::emulated_host::{run_scenario_with, workspace, Extras, Qemu, Runner};

const USAGE: &str =
    "usage: emulated-host [--timeout SECONDS] [--qemu] [--firecracker PATH] SCENARIO
  SCENARIO       a script of tests/scenarios without .sh: full-boot, disks, bench-boot
  --timeout      stop the run after this many seconds [default: 900]
  --qemu         give the scenario QEMU ($QEMU, from $QEMU_DIR or target/tools/qemu/x)
  --firecracker  give the scenario this Firecracker binary ($FIRECRACKER)
  --var K=V      set the scenario's variable K (bench-boot: REPS=3)";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut scenario, mut timeout) = (None, 900);
    let mut extras = Extras::default();
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--timeout" => match args.next().and_then(|v| v.parse().ok()) {
                Some(t) => timeout = t,
                None => return usage("--timeout needs a number of seconds"),
            },
            "--qemu" => match Qemu::find() {
                Ok(q) => extras.qemu = Some(q),
                Err(e) => return usage(&format!("--qemu: {e}")),
            },
            "--firecracker" => match args.next() {
                Some(p) if std::path::Path::new(&p).is_file() => {
                    extras.firecracker = Some(p.into())
                }
                _ => return usage("--firecracker needs the path of a Firecracker binary"),
            },
            "--var" => match args.next().as_deref().and_then(|kv| kv.split_once('=')) {
                Some((k, v)) if variable_name(k) && !v.contains(char::is_whitespace) => {
                    extras.vars.push((k.into(), v.into()))
                }
                _ => {
                    return usage(
                        "--var needs NAME=VALUE: a shell variable name (not PATH, WORK, \
                         IMAGES, QEMU or FIRECRACKER) and a value without spaces",
                    )
                }
            },
            _ if a.starts_with('-') => return usage(&format!("unknown option {a}")),
            _ => scenario = Some(a),
        }
    }
    let Some(scenario) = scenario else {
        return usage("which scenario?");
    };
    let script = workspace()
        .join("tests/scenarios")
        .join(format!("{scenario}.sh"));
    if !script.exists() {
        return usage(&format!(
            "no scenario {scenario} ({} does not exist)",
            script.display()
        ));
    }
    let runner = match Runner::pick() {
        Ok(r) => r,
        Err(why) => {
            eprintln!("emulated-host: cannot run a full boot here: {why}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!("emulated-host: running {scenario} {}", runner.describe());
    let outcome = run_scenario_with(
        &runner,
        &scenario,
        &extras,
        Duration::from_secs(timeout),
        true,
    );
    if outcome.passed {
        eprintln!("emulated-host: {scenario} passed");
        ExitCode::SUCCESS
    } else {
        eprintln!("emulated-host: {scenario} FAILED");
        ExitCode::FAILURE
    }
}

/// A shell variable name the scenario does not set itself.
fn variable_name(k: &str) -> bool {
    let mut chars = k.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !["PATH", "WORK", "IMAGES", "QEMU", "FIRECRACKER"].contains(&k)
}

fn usage(problem: &str) -> ExitCode {
    eprintln!("emulated-host: {problem}\n{USAGE}");
    ExitCode::from(2)
}
