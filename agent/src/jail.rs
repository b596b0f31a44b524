//! The jail each vmm runs in, after Firecracker's jailer: a uid of its own, a root holding
//! only what vmm opens, no new privileges, rlimits (its cgroups are [`crate::cgroups`]'s).
//!
//! On the host a VM's jail is `jail/` in its directory, made anew by [`prepare`] before each
//! launch: root-owned directories and empty files for the mounts to cover (their modes set
//! whatever the umask), and `run/`, empty, the VM uid's own (mode 0700), where vmm makes its
//! API socket and writes its serial log.
//! Between fork and exec the child ([`Jail::enter`]):
//!
//! 1. enters its cgroups, then unshares a mount, network, IPC and UTS namespace and makes
//!    every mount a slave of the host's: nothing it mounts reaches the host;
//! 2. binds the jail onto itself and, read-only, nosuid and nodev, onto its empty files: the
//!    vmm binary at `/vmm` and the libraries its loader lists at their own paths;
//!    the kernel and initrd at `/kernel` and `/initrd`; each disk's vhost-user socket at
//!    `/disks/N.sock`; a seccomp filter file, if one is configured, at `/seccomp.json`; the
//!    host files vmm reads ([`HOST_FILES`]) where the host has them.
//!    It binds `run/` read-write (nosuid, nodev, noexec), mounts a tmpfs on `/dev` holding
//!    only `kvm` (the VM uid's, mode 0600), and remounts the jail's root read-only;
//! 3. pivots into the jail and detaches the old root: nothing else of the host's file system
//!    can be reached (on a host whose root is the initramfs, which cannot be pivoted away
//!    from, it moves the jail over the root and chroots into it instead);
//! 4. sets the rlimits ([`rlimits`]), drops every supplementary group, takes the VM's uid
//!    and gid for its real, effective and saved ids (no way back), and sets no_new_privs;
//!
//! then execs `/vmm`. Every path the child uses is made before the fork: it only makes
//! system calls, allocating nothing. An error is its errno, which the spawn returns.
//!
//! Each VM has a uid of its own, `jail_uid_base` plus the smallest slot no other VM holds,
//! kept in its record (gid the same number). storaged gives each attached volume's socket
//! to that uid (mode 0600) and serves it to no other uid but root: one VM's vmm, taken
//! over, can neither reach nor connect to another VM's disks.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Host files vmm reads, bound into the jail at their own paths where the host has them:
/// the memory it may take, whether KVM is `kvm_pvm`, what `MADV_HUGEPAGE` does on shared
/// memory, and the loader's cache.
pub const HOST_FILES: [&str; 4] = [
    "/proc/meminfo",
    "/sys/module/kvm_pvm",
    "/sys/kernel/mm/transparent_hugepage/shmem_enabled",
    "/etc/ld.so.cache",
];

/// `/dev/kvm`'s device number (misc major 10, minor 232).
const KVM_DEV: (u32, u32) = (10, 232);

/// Errors preparing a jail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot prepare the jail at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} holds a NUL byte")]
    Nul(PathBuf),
    #[error("Cannot list the libraries of {vmm}: {reason}")]
    Libraries { vmm: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

fn cstring(p: &Path) -> Result<CString, Error> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::Nul(p.to_owned()))
}

/// The files a dynamically linked `vmm` loads (the loader included), as its loader lists
/// them (`LOADER --list VMM`, what `ldd` runs); none for a static one (no `PT_INTERP`).
pub fn libraries(vmm: &Path) -> Result<Vec<PathBuf>, Error> {
    let err = |reason: String| Error::Libraries {
        vmm: vmm.to_owned(),
        reason,
    };
    let elf = std::fs::read(vmm).map_err(|e| err(e.to_string()))?;
    let Some(loader) = interpreter(&elf).map_err(|e| err(e.into()))? else {
        return Ok(Vec::new());
    };
    let out = std::process::Command::new(&loader)
        .arg("--list")
        .arg(vmm)
        .output()
        .map_err(|e| err(format!("{}: {e}", loader.display())))?;
    if !out.status.success() {
        return Err(err(format!(
            "{} --list: {}",
            loader.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let mut libs = parse_ldd(&String::from_utf8_lossy(&out.stdout));
    if !libs.contains(&loader) {
        libs.push(loader);
    }
    Ok(libs)
}

/// The program interpreter (`PT_INTERP`) of a 64-bit little-endian ELF file; `None` for one
/// without (static).
fn interpreter(elf: &[u8]) -> Result<Option<PathBuf>, &'static str> {
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if elf.get(..6) != Some(b"\x7fELF\x02\x01".as_slice()) {
        return Err("not a 64-bit little-endian ELF file");
    }
    let short = "a truncated ELF header";
    let phoff = usize::try_from(u64_at(0x20).ok_or(short)?).map_err(|_| short)?;
    let phentsize = usize::from(u16_at(0x36).ok_or(short)?);
    let phnum = usize::from(u16_at(0x38).ok_or(short)?);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let kind = elf.get(ph..ph + 4).ok_or(short)?;
        if kind != 3u32.to_le_bytes() {
            continue;
        }
        let offset = usize::try_from(u64_at(ph + 8).ok_or(short)?).map_err(|_| short)?;
        let size = usize::try_from(u64_at(ph + 32).ok_or(short)?).map_err(|_| short)?;
        let name = elf.get(offset..offset + size).ok_or(short)?;
        let name = name.split(|b| *b == 0).next().unwrap_or_default();
        return Ok(Some(PathBuf::from(std::ffi::OsStr::from_bytes(name))));
    }
    Ok(None)
}

/// The absolute paths of the loader's `--list` lines (as `ldd` prints them): "libc.so.6 =>
/// /lib/.../libc.so.6 (0x...)" and "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has none.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = l.split_once("=> ").map_or(l, |(_, p)| p);
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// What a jail holds besides the vmm binary and its libraries.
pub struct Contents<'a> {
    pub kernel: &'a Path,
    pub initrd: Option<&'a Path>,
    /// The disks' vhost-user sockets, `/disks/N.sock` in the jail in this order.
    pub disks: &'a [PathBuf],
    /// vmm's seccomp filter file, `/seccomp.json` in the jail.
    pub seccomp_filter: Option<&'a Path>,
}

/// Where a jailed vmm finds its files.
pub struct Inside {
    pub program: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub disks: Vec<PathBuf>,
    pub api_sock: PathBuf,
    pub serial: PathBuf,
    pub seccomp_filter: Option<PathBuf>,
}

/// The rlimits of a jailed vmm with `vcpus` vCPUs: descriptors, threads (its uid is its
/// own, so RLIMIT_NPROC counts only its own), no core dumps (guest memory). No RLIMIT_FSIZE:
/// the guest's memory is a memfd of its size, which the limit would cut.
pub fn rlimits(vcpus: u8) -> [(libc::__rlimit_resource_t, u64); 3] {
    [
        (libc::RLIMIT_NOFILE, 4096),
        (libc::RLIMIT_NPROC, 64 + u64::from(vcpus)),
        (libc::RLIMIT_CORE, 0),
    ]
}

/// One bind mount: host path onto the jail's (host) path.
struct Bind {
    source: CString,
    target: CString,
}

/// A prepared jail: every path and number [`Jail::enter`] uses.
pub struct Jail {
    root: CString,
    run: CString,
    dev: CString,
    kvm: CString,
    binds: Vec<Bind>,
    uid: u32,
    rlimits: [(libc::__rlimit_resource_t, u64); 3],
    cgroup_procs: Vec<i32>,
}

/// Makes directory `path` with `mode` whatever the umask (under systemd's `UMask=0077` a
/// created 0755 would be 0700, which the VM's uid cannot search).
fn make_dir(path: &Path, mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(io_err(path)(e)),
        _ => {}
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

/// Makes `path` (under the jail's root `dir`) as a mount point for `source`: a directory for
/// a directory, else an empty file; root's, not writable by the VM's uid; its missing parents
/// 0755.
fn mount_point(dir: &Path, path: &Path, source: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(rel) = path.parent().and_then(|p| p.strip_prefix(dir).ok()) {
        let mut at = dir.to_owned();
        for c in rel.components() {
            at.push(c);
            if !at.is_dir() {
                make_dir(&at, 0o755)?;
            }
        }
    }
    if source.is_dir() {
        make_dir(path, 0o555)?;
    } else if !path.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o444)
            .open(path)
            .map_err(io_err(path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
            .map_err(io_err(path))?;
    }
    Ok(())
}

/// Prepares the jail of a vmm in `dir` (the VM's `jail/`), made anew for each launch (nothing
/// a vmm before it left there, no mount point of a host file since gone): its mount points,
/// and `run/`, empty, given to `uid`. `cgroup_procs` are the descriptors of the
/// `cgroup.procs` files it enters.
pub fn prepare(
    dir: &Path,
    uid: u32,
    vcpus: u8,
    vmm: &Path,
    libraries: &[PathBuf],
    contents: &Contents<'_>,
    cgroup_procs: Vec<i32>,
) -> Result<(Jail, Inside), Error> {
    // remove_dir_all follows no symlink the uid may have left in run/.
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(dir)(e)),
        _ => {}
    }
    make_dir(dir, 0o755)?;
    let mut binds = Vec::new();
    let mut bind = |source: &Path, inside: &Path| -> Result<PathBuf, Error> {
        let rel = inside.strip_prefix("/").unwrap_or(inside);
        let target = dir.join(rel);
        mount_point(dir, &target, source)?;
        binds.push(Bind {
            source: cstring(source)?,
            target: cstring(&target)?,
        });
        Ok(inside.to_owned())
    };
    let program = bind(vmm, Path::new("/vmm"))?;
    for lib in libraries {
        bind(lib, lib)?;
    }
    for f in HOST_FILES {
        let f = Path::new(f);
        if f.exists() {
            bind(f, f)?;
        }
    }
    let kernel = bind(contents.kernel, Path::new("/kernel"))?;
    let initrd = contents
        .initrd
        .map(|i| bind(i, Path::new("/initrd")))
        .transpose()?;
    let seccomp_filter = contents
        .seccomp_filter
        .map(|f| bind(f, Path::new("/seccomp.json")))
        .transpose()?;
    let disks = contents
        .disks
        .iter()
        .enumerate()
        .map(|(n, s)| bind(s, &PathBuf::from(format!("/disks/{n}.sock"))))
        .collect::<Result<Vec<_>, _>>()?;
    let run = dir.join("run");
    make_dir(&run, 0o700)?;
    std::os::unix::fs::chown(&run, Some(uid), Some(uid)).map_err(io_err(&run))?;
    let dev = dir.join("dev");
    make_dir(&dev, 0o755)?;
    let jail = Jail {
        root: cstring(dir)?,
        run: cstring(&run)?,
        kvm: cstring(&dev.join("kvm"))?,
        dev: cstring(&dev)?,
        binds,
        uid,
        rlimits: rlimits(vcpus),
        cgroup_procs,
    };
    let inside = Inside {
        program,
        kernel,
        initrd,
        disks,
        api_sock: PathBuf::from("/run/api.sock"),
        serial: PathBuf::from("/run/console.log"),
        seccomp_filter,
    };
    Ok((jail, inside))
}

/// `Err(errno)` when a system call returned -1.
fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Jail {
    /// Puts the calling process in the jail (the steps of the module doc). For the child
    /// between fork and exec: it makes system calls on what [`prepare`] made, nothing else.
    pub fn enter(&self) -> io::Result<()> {
        crate::cgroups::enter(&self.cgroup_procs)?;
        let null = std::ptr::null::<libc::c_char>();
        let ro = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID;
        // SAFETY: each call below is a system call given NUL-terminated strings that `self`
        // owns (alive for the call) or null where the call takes none; none keeps a pointer.
        unsafe {
            check(libc::unshare(
                libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS,
            ))?;
            check(libc::mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_SLAVE | libc::MS_REC,
                null.cast(),
            ))?;
            let root = self.root.as_ptr();
            check(libc::mount(root, root, null, libc::MS_BIND, null.cast()))?;
            for b in &self.binds {
                let t = b.target.as_ptr();
                check(libc::mount(
                    b.source.as_ptr(),
                    t,
                    null,
                    libc::MS_BIND,
                    null.cast(),
                ))?;
                check(libc::mount(null, t, null, ro | libc::MS_NODEV, null.cast()))?;
            }
            let run = self.run.as_ptr();
            check(libc::mount(run, run, null, libc::MS_BIND, null.cast()))?;
            check(libc::mount(
                null,
                run,
                null,
                libc::MS_BIND
                    | libc::MS_REMOUNT
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
                null.cast(),
            ))?;
            check(libc::mount(
                c"tmpfs".as_ptr(),
                self.dev.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NOEXEC,
                c"mode=0755,size=64k".as_ptr().cast(),
            ))?;
            check(libc::mknod(
                self.kvm.as_ptr(),
                libc::S_IFCHR | 0o600,
                libc::makedev(KVM_DEV.0, KVM_DEV.1),
            ))?;
            check(libc::chown(self.kvm.as_ptr(), self.uid, self.uid))?;
            check(libc::mount(
                null,
                root,
                null,
                ro | libc::MS_NODEV,
                null.cast(),
            ))?;
            check(libc::chdir(root))?;
            // pivot_root(".", "."): the old root stacks under the new one, then goes.
            let dot = c".".as_ptr();
            if libc::syscall(libc::SYS_pivot_root, dot, dot) == 0 {
                check(libc::umount2(dot, libc::MNT_DETACH))?;
            } else if *libc::__errno_location() == libc::EINVAL {
                // A root that is the initramfs's rootfs cannot be pivoted away from: the jail
                // is moved over it and chrooted into (as runc's no_pivot_root does); the
                // uid, without capabilities, cannot chroot out again.
                check(libc::mount(
                    dot,
                    c"/".as_ptr(),
                    null,
                    libc::MS_MOVE,
                    null.cast(),
                ))?;
                check(libc::chroot(dot))?;
            } else {
                return Err(io::Error::last_os_error());
            }
            check(libc::chdir(c"/".as_ptr()))?;
            for (resource, limit) in self.rlimits {
                let l = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                check(libc::setrlimit(resource, &l))?;
            }
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setresgid(self.uid, self.uid, self.uid))?;
            check(libc::setresuid(self.uid, self.uid, self.uid))?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines_give_the_loader_and_the_libraries_and_not_the_vdso() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f6e)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f6e)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f6e)\n";
        assert_eq!(
            parse_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn a_static_binary_has_no_interpreter_and_a_text_file_is_no_elf() {
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        assert_eq!(interpreter(&elf), Ok(None));
        assert!(interpreter(b"#!/bin/sh\n").is_err());
        assert!(interpreter(&elf[..30]).is_err());
    }

    #[test]
    fn this_test_binarys_libraries_are_listed_as_files() {
        let me = std::env::current_exe().unwrap();
        let libs = libraries(&me).unwrap();
        assert!(libs.iter().any(|l| l.to_string_lossy().contains("libc.so")));
        assert!(libs.iter().all(|l| l.is_file()), "{libs:?}");
    }
}
