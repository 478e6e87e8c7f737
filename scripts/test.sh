#!/usr/bin/env bash
# The whole ftvm test suite, from a fresh clone: installs what is missing, checks formatting
# and lints, builds the release binary and every test guest, then runs every test against the
# real /dev/kvm. (KVM tests fail, not skip, without /dev/kvm unless FTVM_SKIP_KVM_TESTS=1.)
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
if ((${#need_apt[@]})); then
    echo "==> installing ${need_apt[*]}"
    if [ "$(id -u)" -eq 0 ]; then apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
    else sudo apt-get update -qq && sudo apt-get install -y -qq "${need_apt[@]}"; fi
fi
command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt || true

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
