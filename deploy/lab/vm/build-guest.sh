#!/usr/bin/env bash
# Build (or reuse) the lab guest: Debian's stock kernel, never installed on the host
# (apt-get download + dpkg -x), and a busybox initramfs with nbd.ko, e1000.ko,
# Debian's nbd-client and its libraries, and the static swap verifier.
# usage: build-guest.sh OUTDIR      -> OUTDIR/vmlinuz, OUTDIR/initrd.img
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build-guest.sh OUTDIR}
mkdir -p "$out"
stamp=$(cat "$here/init" "$here/swaptest.c" "$0" | sha256sum | cut -c1-16)
if [[ -f "$out/initrd.img" && -f "$out/vmlinuz" && "$(cat "$out/stamp" 2>/dev/null)" == "$stamp" ]]; then
  exit 0
fi

resolve() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}'; }
download() { (cd "$work" && apt-get download -qq -o APT::Sandbox::User=root "$1" >/dev/null 2>&1); }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pkg=$(resolve)
if [[ -z "$pkg" ]] || ! download "$pkg"; then
  apt-get update -qq  # stale or missing package lists: refresh once and retry
  pkg=$(resolve)
  [[ -n "$pkg" ]] || { echo "build-guest: cannot resolve linux-image-amd64" >&2; exit 1; }
  download "$pkg" || { echo "build-guest: apt-get download $pkg failed" >&2; exit 1; }
fi
dpkg -x "$work"/linux-image-*.deb "$work/kernel"
kver=${pkg#linux-image-}
mods="$work/kernel/lib/modules/$kver/kernel"

root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,lib64,lib/x86_64-linux-gnu}
cp /bin/busybox "$root/bin/busybox"
cp "$here/init" "$root/init"
chmod +x "$root/init"
# The two modules the guest needs, where modprobe looks for them (nbd.ko and
# e1000.ko have no dependencies), so the attach plan's `modprobe nbd` works as is.
moddir="$root/lib/modules/$kver"
for ko in drivers/block/nbd.ko drivers/net/ethernet/intel/e1000/e1000.ko; do
  mkdir -p "$moddir/kernel/$(dirname "$ko")"
  cp "$mods/$ko" "$moddir/kernel/$ko"
  echo "kernel/$ko:" >> "$moddir/modules.dep"
done
cp /usr/sbin/nbd-client "$root/bin/nbd-client"
for lib in $(ldd /usr/sbin/nbd-client | grep -o '/[^ ]*'); do
  cp -L "$lib" "$root$lib" 2>/dev/null || { mkdir -p "$root$(dirname "$lib")"; cp -L "$lib" "$root$lib"; }
done
gcc -O2 -static -o "$root/bin/swaptest" "$here/swaptest.c"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initrd.img"
cp "$work/kernel/boot/vmlinuz-$kver" "$out/vmlinuz"
echo "$stamp" > "$out/stamp"
echo "$kver" > "$out/kernel-version"
