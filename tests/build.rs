//! Assembles the test guests in images/guests/ (GNU `as` and `ld`, from binutils) into ELF
//! images the vmm tests boot. Their directory is exported as GUEST_DIR.

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (install binutils: apt-get install binutils)")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn main() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/guests");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("guests");
    std::fs::create_dir_all(&out).expect("create guest dir");
    println!("cargo:rerun-if-changed={}", src.display());
    let entries = std::fs::read_dir(&src).expect("images/guests");
    for e in entries {
        let path = e.expect("dir entry").path();
        if path.extension().and_then(|x| x.to_str()) != Some("S") {
            continue;
        }
        println!("cargo:rerun-if-changed={}", path.display());
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("file name");
        let obj = out.join(format!("{stem}.o"));
        let elf = out.join(format!("{stem}.elf"));
        run(Command::new("as")
            .arg("--64")
            .arg("-o")
            .arg(&obj)
            .arg(&path));
        run(Command::new("ld")
            .args([
                "-m",
                "elf_x86_64",
                "-static",
                "-nostdlib",
                "-Ttext=0x200000",
                "-e",
                "_start",
                "-o",
            ])
            .arg(&elf)
            .arg(&obj));
    }
    println!("cargo:rustc-env=GUEST_DIR={}", out.display());
}
