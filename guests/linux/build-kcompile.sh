#!/usr/bin/env bash
# Builds the kernel-compile benchmark guest for `ftvm-bench kernel-compile` (hardware-KVM hosts
# only; see README.md here): Debian's kernel (a bzImage) and an initramfs holding a Debian
# root with gcc, make and the `linux-source` tree. Its /init untars the source into a tmpfs,
# runs `make defconfig`, times `make -jN vmlinux` (N from `kcompile_jobs=N` on the kernel
# command line, else every CPU), prints `KCOMPILE elapsed_ms=T status=S` on the serial console
# and ends the VM through ftvm's exit device (port 0x501) with the build's status.
#
#   sudo guests/linux/build-kcompile.sh [OUT_DIR]          (default: target/kcompile)
#   cargo run --release -p ftvm-benches -- kernel-compile \
#       --kernel target/kcompile/vmlinuz --initrd target/kcompile/initramfs.cpio.gz --vcpus 4
#
# Needs root (debootstrap), network access to a Debian mirror, ~3 GB of disk; the guest needs
# about 4 GiB of RAM (the default of the benchmark's --mem-mib).
set -euo pipefail
out=${1:-target/kcompile}
suite=${SUITE:-bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
[ "$(id -u)" -eq 0 ] || { echo "run as root (debootstrap)" >&2; exit 1; }
for c in debootstrap cpio gzip gcc; do
    command -v "$c" >/dev/null || apt-get install -y "$c"
done
mkdir -p "$out"
out=$(cd "$out" && pwd)
root="$out/rootfs"

echo "==> kernel: Debian's linux-image-amd64"
kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
(cd "$out" && rm -f ./*.deb && apt-get download "$kpkg" && dpkg-deb --fsys-tarfile ./"$kpkg"_*.deb | tar -x ./boot/ && rm -f ./*.deb)
cp "$out"/boot/vmlinuz-* "$out/vmlinuz"

echo "==> root: debootstrap $suite with the kernel build's tools and linux-source"
if [ ! -x "$root/usr/bin/make" ]; then
    rm -rf "$root"
    debootstrap --variant=minbase \
        --include=gcc,make,bc,bison,flex,libelf-dev,libssl-dev,perl,xz-utils,cpio,kmod,python3,linux-source \
        "$suite" "$root" "$mirror"
fi

echo "==> the exit helper (outb to ftvm's exit device, port 0x501)"
cat > "$out/ftvm-exit.c" <<'C'
#include <stdlib.h>
#include <sys/io.h>
int main(int argc, char **argv) {
    int code = argc > 1 ? atoi(argv[1]) : 0;
    if (ioperm(0x501, 1, 1) != 0) return 99;
    outb((unsigned char)code, 0x501);
    return 0;
}
C
gcc -static -O2 -o "$root/sbin/ftvm-exit" "$out/ftvm-exit.c"

cat > "$root/init" <<'INIT'
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /build && mount -t tmpfs -o size=3g build /build
jobs=$(sed -n 's/.*kcompile_jobs=\([0-9]*\).*/\1/p' /proc/cmdline)
[ -n "$jobs" ] || jobs=$(nproc)
cd /build
tar xf /usr/src/linux-source-*.tar.xz
cd linux-source-*
make defconfig >/build/defconfig.log 2>&1
echo "KCOMPILE starting make -j$jobs vmlinux"
start=$(date +%s%N)
if make -j"$jobs" vmlinux >/build/make.log 2>&1; then status=0; else status=1; tail -20 /build/make.log; fi
end=$(date +%s%N)
echo "KCOMPILE elapsed_ms=$(( (end - start) / 1000000 )) status=$status"
sync
/sbin/ftvm-exit "$status"
INIT
chmod +x "$root/init"

echo "==> initramfs"
(cd "$root" && find . -xdev -print0 | cpio --null -o -H newc --quiet | gzip -1) > "$out/initramfs.cpio.gz"
ls -lh "$out/vmlinuz" "$out/initramfs.cpio.gz"
echo "kernel: $out/vmlinuz"
echo "initrd: $out/initramfs.cpio.gz"
