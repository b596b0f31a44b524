# Shared helpers for the scripts in this folder. Source it; do not run it.

# apt_install PKG...: installs the Debian packages that are missing (root or sudo).
apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "==> installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# need_cargo: fails with a clear message when there is no Rust toolchain.
need_cargo() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "cargo not found: install Rust (rustup, stable >= 1.89) first" >&2
        exit 1
    fi
}

repo_root() {
    cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd
}

# need_promtool: puts Prometheus' promtool (for `promtool check metrics`) in target/tools/bin
# and prints its path. Taken from Debian's prometheus package without installing it: that
# would also install and start a Prometheus server.
need_promtool() {
    local dir
    dir="$(repo_root)/target/tools"
    if [ ! -x "$dir/bin/promtool" ]; then
        echo "==> fetching promtool from Debian's prometheus package" >&2
        local tmp sudo=""
        tmp="$(mktemp -d)"
        [ "$(id -u)" -ne 0 ] && sudo="sudo"
        # Package lists may be missing on a fresh machine: update once if the download fails.
        (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1) || {
            $sudo apt-get update -qq && (cd "$tmp" && apt-get download prometheus >/dev/null)
        }
        dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
        mkdir -p "$dir/bin"
        cp "$tmp/x/usr/bin/promtool" "$dir/bin/promtool"
        rm -rf "$tmp"
    fi
    echo "$dir/bin/promtool"
}

# need_qemu_microvm: puts Debian's qemu-system-x86_64 (with the few libraries it needs that
# are not installed) in target/tools/qemu, extracted from the packages without installing
# them: installing qemu-system-x86 would replace qemu-storage-daemon 10 (qemu-utils) by 7.2.
# Prints the directory (bin/qemu-system-x86_64, lib/, share/qemu).
need_qemu_microvm() {
    local dir
    dir="$(repo_root)/target/tools/qemu"
    if [ ! -x "$dir/x/usr/bin/qemu-system-x86_64" ]; then
        echo "==> fetching qemu-system-x86 (extracted, not installed)" >&2
        local tmp
        tmp="$(mktemp -d)"
        (cd "$tmp" && apt-get download qemu-system-x86 qemu-system-data libcapstone4 libfdt1 libslirp0 libvdeplug2 >/dev/null 2>&1) || {
            echo "cannot download qemu-system-x86" >&2
            rm -rf "$tmp"
            return 1
        }
        mkdir -p "$dir"
        for d in "$tmp"/*.deb; do dpkg-deb -x "$d" "$dir/x"; done
        rm -rf "$tmp"
    fi
    echo "$dir/x"
}
