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

echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo build --release (ftvm and every test guest)"
cargo build --release --workspace --locked
echo "==> cargo test --release"
cargo test --release --workspace --locked
