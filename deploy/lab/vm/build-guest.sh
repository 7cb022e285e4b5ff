#!/usr/bin/env bash
# Build (or reuse) the lab guests: Debian's stock kernel, never installed on the host
# (apt-get download + dpkg -x), and two busybox initramfs images:
#  - initrd.img: nbd.ko, e1000.ko, Debian's nbd-client and its libraries, and the
#    static swap verifier (the kernel-only lab: nbdkit and the agent stay on the host);
#  - initrd-host.img: the modules that mount this machine's root read-only over
#    virtio-9p under a tmpfs overlay (so the guest runs the real python3, nbdkit,
#    nbd-client, util-linux and the venv), the guest kernel's nbd and e1000 modules
#    indexed by depmod for the real modprobe, and the verifier (`lab vm --host-in-guest`).
# usage: build-guest.sh OUTDIR      -> OUTDIR/vmlinuz, OUTDIR/initrd.img, OUTDIR/initrd-host.img
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build-guest.sh OUTDIR}
mkdir -p "$out"
stamp=$(cat "$here/init" "$here/init-host" "$here/swaptest.c" "$0" | sha256sum | cut -c1-16)
if [[ -f "$out/initrd.img" && -f "$out/initrd-host.img" && -f "$out/vmlinuz" \
      && "$(cat "$out/stamp" 2>/dev/null)" == "$stamp" ]]; then
  exit 0
fi
need() { command -v "$1" >/dev/null || { echo "build-guest: $1 is missing ($2)" >&2; exit 1; }; }
need busybox "apt-get install busybox-static"
need depmod "apt-get install kmod"
need gcc "apt-get install gcc libc6-dev"
need cpio "apt-get install cpio"

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

# The host-in-guest image. Modules in load order (each needs only those before it).
host="$work/host"
mkdir -p "$host"/{bin,dev,proc,sys,lower,rw,newroot}
cp /bin/busybox "$host/bin/busybox"
cp "$here/init-host" "$host/init"
chmod +x "$host/init"
cp "$root/bin/swaptest" "$host/bin/swaptest"
hostmods="$host/lib/modules/$kver"
for ko in drivers/virtio/virtio.ko drivers/virtio/virtio_ring.ko \
          drivers/virtio/virtio_pci_modern_dev.ko drivers/virtio/virtio_pci_legacy_dev.ko \
          drivers/virtio/virtio_pci.ko fs/netfs/netfs.ko fs/fscache/fscache.ko net/9p/9pnet.ko \
          net/9p/9pnet_virtio.ko fs/9p/9p.ko fs/overlayfs/overlay.ko \
          drivers/net/ethernet/intel/e1000/e1000.ko drivers/block/nbd.ko; do
  [[ -f "$mods/$ko" ]] || { echo "build-guest: the kernel package has no $ko" >&2; exit 1; }
  mkdir -p "$hostmods/kernel/$(dirname "$ko")"
  cp "$mods/$ko" "$hostmods/kernel/$ko"
done
cp "$work/kernel/lib/modules/$kver"/modules.{order,builtin,builtin.modinfo} \
   "$hostmods/" 2>/dev/null || true
# The real modprobe (kmod, in the shared root) reads depmod's binary indexes.
depmod -b "$host" "$kver"
(cd "$host" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initrd-host.img"
cp "$work/kernel/boot/vmlinuz-$kver" "$out/vmlinuz"
echo "$stamp" > "$out/stamp"
echo "$kver" > "$out/kernel-version"
