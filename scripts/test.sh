#!/usr/bin/env bash
# The whole ftvm test suite, from a fresh clone: installs what is missing, checks formatting
# and lints, builds the release binary and every test guest, then runs every test against the
# real /dev/kvm. (KVM tests fail, not skip, without /dev/kvm unless FTVM_SKIP_KVM_TESTS=1.)
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
# `ip` for the network-namespace tests (hosts of the FT and cluster scenarios).
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
# etcd: the coordinator's second store backend (its scenarios run on both); protoc builds
# the etcd client's gRPC code.
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
# socat: the real TCP client of the guest-network tests (tests/tests/net.rs, chaos.rs).
command -v socat >/dev/null 2>&1 || need_apt+=(socat)
# curl: an outside HTTPS client of the coordinator's API (tests/tests/api.rs).
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# The chaos tests put the cluster's datastore on a loop-mounted ext4 and stall it with
# fsfreeze (e2fsprogs, util-linux).
command -v mkfs.ext4 >/dev/null 2>&1 || need_apt+=(e2fsprogs)
command -v fsfreeze >/dev/null 2>&1 || need_apt+=(util-linux)
# A real Prometheus server scrapes a running cluster in tests/tests/metrics.rs (each test
# starts its own on a free port; the package's own service is not used).
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
# openssl makes the certificates of the etcd-over-TLS test (tests/tests/store.rs).
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
# systemd-analyze checks the unit files in contrib/ (tests/tests/services.rs).
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
if ((${#need_apt[@]})); then
    echo "==> installing ${need_apt[*]}"
    if [ "$(id -u)" -eq 0 ]; then apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
    else sudo apt-get update -qq && sudo apt-get install -y -qq "${need_apt[@]}"; fi
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt || true

# A real Linux kernel for the boot-protocol test: Debian's kernel package, unpacked (no install).
if [ -z "${FTVM_LINUX_KERNEL:-}" ]; then
    kdir=target/linux
    if ! ls "$kdir"/boot/vmlinuz-* >/dev/null 2>&1; then
        echo "==> fetching Debian's kernel package for the Linux boot test"
        mkdir -p "$kdir"
        [ "$(id -u)" -eq 0 ] && apt-get update -qq || true
        pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
        (cd "$kdir" && apt-get download "$pkg" >/dev/null 2>&1 && dpkg-deb --fsys-tarfile ./*.deb | tar -x ./boot/ && rm -f ./*.deb) \
            || echo "warning: could not fetch $pkg; the real-kernel test will fail" >&2
    fi
    FTVM_LINUX_KERNEL=$(ls "$PWD/$kdir"/boot/vmlinuz-* 2>/dev/null | head -1)
    export FTVM_LINUX_KERNEL
fi

if [ ! -w /dev/kvm ] && [ "${FTVM_SKIP_KVM_TESTS:-}" != 1 ]; then
    echo "warning: /dev/kvm is not usable by $(id -un); KVM tests will fail (FTVM_SKIP_KVM_TESTS=1 skips them)" >&2
fi

# One etcd for the whole run (each test takes a key prefix of its own); without
# FTVM_ETCD_ENDPOINTS the tests would start a private etcd each.
if [ -z "${FTVM_ETCD_ENDPOINTS:-}" ]; then
    etcd_dir=$(mktemp -d /tmp/ftvm-ci-etcd.XXXXXX)
    port=$((21000 + RANDOM % 20000)); peer=$((port + 1))
    echo "==> starting etcd on 127.0.0.1:$port (data in $etcd_dir)"
    etcd --name ci --data-dir "$etcd_dir/data" \
        --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
        --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
        --initial-cluster "ci=http://127.0.0.1:$peer" >"$etcd_dir/etcd.log" 2>&1 &
    etcd_pid=$!
    # (Keeps the suite's exit status: a bare `wait` here would make it etcd's 143.)
    trap 'st=$?; kill $etcd_pid 2>/dev/null; wait $etcd_pid 2>/dev/null || true; rm -rf "$etcd_dir"; exit $st' EXIT
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        sleep 0.1
    done
    export FTVM_ETCD_ENDPOINTS="http://127.0.0.1:$port"
fi

# The etcd backend is a cargo feature (it needs protoc); the test suite builds with it.
features=(--features ftvm/etcd)
echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked "${features[@]}" -- -D warnings
echo "==> cargo build --release (ftvm and every test guest)"
cargo build --release --workspace --locked "${features[@]}"
echo "==> cargo test --release"
cargo test --release --workspace --locked "${features[@]}"
