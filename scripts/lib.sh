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

# need_qemu: puts QEMU 10 (qemu-system-x86_64, its firmware and the few libraries it needs that
# are not installed) in target/tools/qemu, extracted from Debian's packages without installing
# them: installing qemu-system-x86 would replace qemu-storage-daemon (qemu-utils). Used for
# QEMU's microvm beside vmm (bench-vmm) and for the emulated host with hardware virtualization
# (TCG with SVM) of the full-boot tests. QEMU 10 comes from bookworm-backports, through an apt
# configuration of its own in target/tools/apt that leaves the system's sources alone (the
# shared libraries it links are Debian 12's, installed with apt_install): under Debian 12's own QEMU 7.2 the emulated host's kernel
# crashed (a kernel stack overflow in a KVM vCPU thread) in two runs of seven.
# Prints the directory that holds usr/bin/qemu-system-x86_64 (run with
# LD_LIBRARY_PATH=DIR/usr/lib/x86_64-linux-gnu, firmware in -L DIR/usr/share/qemu and
# -L DIR/usr/share/seabios).
need_qemu() {
    local dir apt
    dir="$(repo_root)/target/tools/qemu"
    apt="$(repo_root)/target/tools/apt"
    # The libraries qemu-system-x86 10 links (its Depends, less the ones fetched below).
    apt_install libaio1 libbpf1 libfuse3-3 libglib2.0-0 libgmp10 libgnutls30 libhogweed6 \
        libibverbs1 libjpeg62-turbo libnettle8 libnuma1 libpixman-1-0 libpmem1 libpng16-16 \
        librdmacm1 libsasl2-2 libseccomp2 libudev1 liburing2 libzstd1 zlib1g >&2
    if [ ! -f "$dir/x/.qemu-10" ]; then
        echo "==> fetching QEMU 10 from bookworm-backports (extracted, not installed)" >&2
        mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
        printf 'deb http://deb.debian.org/debian bookworm main\ndeb http://deb.debian.org/debian bookworm-backports main\n' \
            >"$apt/sources.list"
        local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
            -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o APT::Sandbox::User=root)
        local tmp
        tmp="$(mktemp -d)"
        if ! apt-get "${opts[@]}" update -qq >/dev/null 2>&1 ||
            ! (cd "$tmp" && apt-get "${opts[@]}" download qemu-system-x86/bookworm-backports \
                qemu-system-common/bookworm-backports qemu-system-data/bookworm-backports \
                seabios/bookworm-backports libcapstone4 libfdt1 libslirp0 libvdeplug2 >/dev/null 2>&1); then
            echo "cannot download QEMU 10 from bookworm-backports" >&2
            rm -rf "$tmp"
            return 1
        fi
        rm -rf "$dir/x"
        mkdir -p "$dir"
        for d in "$tmp"/*.deb; do dpkg-deb -x "$d" "$dir/x"; done
        rm -rf "$tmp"
        touch "$dir/x/.qemu-10"
    fi
    echo "$dir/x"
}
