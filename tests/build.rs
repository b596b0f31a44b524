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

/// Links a guest object at `text` (its first instruction there, `_start` its entry).
fn link(obj: &Path, out: &Path, text: &str, extra: &[&str]) {
    run(Command::new("ld")
        .args(["-m", "elf_x86_64", "-static", "-nostdlib"])
        .arg(format!("-Ttext={text}"))
        .args(extra)
        .args(["-e", "_start", "-o"])
        .arg(out)
        .arg(obj));
}

/// A bzImage: one setup sector after the boot sector, with the setup header fields the boot
/// protocol (and linux-loader) look at, then the protected-mode image.
fn bzimage(body: &[u8]) -> Vec<u8> {
    let mut img = vec![0u8; 1024];
    img[0x1f1] = 1; // setup_sects
    img[0x1fe] = 0x55; // boot_flag 0xaa55
    img[0x1ff] = 0xaa;
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020cu16.to_le_bytes()); // protocol 2.12
    img[0x211] = 0x01; // loadflags: LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
    img[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
    let init_size = (body.len() as u32 + 0xfff) & !0xfff;
    img[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
    img.extend_from_slice(body);
    img
}

fn main() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/guests");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("guests");
    std::fs::create_dir_all(&out).expect("create guest dir");
    println!("cargo:rerun-if-changed={}", src.display());
    println!(
        "cargo:rerun-if-changed={}",
        src.join("common.inc").display()
    );
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
            .arg("-I")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .arg(&path));
        if stem == "bzimage" {
            // A flat image at 1 MiB behind a minimal setup header: the bzImage boot path.
            let flat = out.join("bzimage.bin");
            link(&obj, &flat, "0x100000", &["--oformat", "binary"]);
            let body = std::fs::read(&flat).expect("flat image");
            std::fs::write(out.join("bzimage.img"), bzimage(&body)).expect("write bzImage");
        } else {
            link(&obj, &elf, "0x200000", &[]);
        }
    }
    println!("cargo:rustc-env=GUEST_DIR={}", out.display());
}
