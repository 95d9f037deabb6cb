#!/usr/bin/env bash
# Runs a command inside a small VM that has a real soft-RoCE device (rdma_rxe),
# for machines whose kernel has none (CONFIG_INFINIBAND off): Debian's own
# kernel boots in qemu (TCG) from an initramfs built here, loads rdma_rxe on a
# veth pair, and runs the command. The VM's exit status is the command's.
#
#   scripts/softroce-vm.sh [--bin PATH]... [--timeout SECONDS] -- COMMAND [ARGS...]
#
# --bin copies a binary (with the libraries ldd shows) to /bin in the VM. The
# device is rxe0 on veth0 at 10.77.0.1/24 (inside the VM only; nothing leaves
# it); use GID index 1 (the IPv4-mapped RoCEv2 GID). The kernel and its few
# modules are cached in $PS_VM_CACHE (default ~/.cache/pslab-vm).
# Recipe and pitfalls: shared/notes/soft-roce-vm.md.
set -euo pipefail

bins=()
timeout_s=600
while (($#)); do
  case "$1" in
    --bin) bins+=("$2"); shift 2 ;;
    --timeout) timeout_s="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "softroce-vm: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
(($#)) || { echo "softroce-vm: no command given (… -- COMMAND)" >&2; exit 2; }

# --- packages ---------------------------------------------------------------
"$(dirname "${BASH_SOURCE[0]}")"/apt-need.sh qemu-system-x86 busybox-static cpio kmod iproute2 rdma-core ibverbs-providers ibverbs-utils perftest

# --- kernel and modules (cached) ---------------------------------------------
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$pkg" ] || { echo "softroce-vm: cannot find Debian's current kernel package (apt-get update?)" >&2; exit 1; }
kver=${pkg#linux-image-}
cache=${PS_VM_CACHE:-$HOME/.cache/pslab-vm}/$kver
mods=(crypto/crc32_generic net/ipv4/udp_tunnel net/ipv6/ip6_udp_tunnel drivers/infiniband/core/ib_core
      drivers/infiniband/core/ib_uverbs drivers/infiniband/sw/rxe/rdma_rxe drivers/net/veth)
if [ ! -f "$cache/vmlinuz" ]; then
  echo "softroce-vm: fetching $pkg (once)" >&2
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download "$pkg" >/dev/null && dpkg -x ./*.deb x)
  mkdir -p "$cache/modules"
  for m in "${mods[@]}"; do
    f=$(ls "$tmp/x/lib/modules/$kver/kernel/$m".ko* 2>/dev/null | head -1)
    [ -n "$f" ] || { echo "softroce-vm: $pkg has no module $m" >&2; exit 1; }
    case "$f" in
      *.xz) xz -dc "$f" > "$cache/modules/$(basename "$m").ko" ;;
      *.zst) zstd -qdc "$f" > "$cache/modules/$(basename "$m").ko" ;;
      *) cp "$f" "$cache/modules/$(basename "$m").ko" ;;
    esac
  done
  cp "$tmp/x/boot/vmlinuz-$kver" "$cache/vmlinuz.part" && mv "$cache/vmlinuz.part" "$cache/vmlinuz"
  rm -rf "$tmp"
fi

# --- initramfs ---------------------------------------------------------------
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc/libibverbs.d,modules,lib64,run}
cp /bin/busybox "$root/bin/busybox"
for l in sh mount insmod sleep cat echo poweroff mkdir ls env awk; do ln -sf busybox "$root/bin/$l"; done
copy_with_libs() { # copy a binary and its libraries to the same paths in the image
  local src=$1 dst=$2
  install -D -m 0755 "$src" "$root$dst"
  # (scripts have no libraries: ldd fails on them, which is fine)
  { ldd "$src" 2>/dev/null || true; } | { grep -oE '/[^ ]+' || true; } | while read -r lib; do
    [ -e "$root$lib" ] || install -D "$lib" "$root$lib"
  done
}
copy_with_libs "$(command -v ip)" /bin/ip
copy_with_libs "$(command -v rdma)" /bin/rdma
for t in ibv_devices ibv_devinfo ib_write_bw ib_read_bw ib_write_lat; do
  copy_with_libs "$(command -v "$t")" "/bin/$t"
done
for b in "${bins[@]}"; do copy_with_libs "$b" "/bin/$(basename "$b")"; done
# the verbs provider is loaded with dlopen: ldd does not show it
prov=$(ls /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so | head -1)
install -D "$prov" "$root$prov"
cp /etc/libibverbs.d/rxe.driver "$root/etc/libibverbs.d/"
gcc_s=$(ls /lib/x86_64-linux-gnu/libgcc_s.so.1 2>/dev/null || true)
[ -z "$gcc_s" ] || install -D "$gcc_s" "$root$gcc_s"
cp "$cache"/modules/*.ko "$root/modules/"
printf '%s\n' "$*" > "$root/cmd"
cat > "$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in crc32_generic udp_tunnel ip6_udp_tunnel ib_core ib_uverbs rdma_rxe veth; do
  insmod /modules/$m.ko || echo "@vm-warn insmod $m failed"
done
# full paths: busybox's shell would run its own `ip` applet, which cannot make veth pairs
/bin/ip link set lo up
/bin/ip link add veth0 type veth peer name veth1
/bin/ip addr add 10.77.0.1/24 dev veth0
/bin/ip link set veth0 up; /bin/ip link set veth1 up
/bin/rdma link add rxe0 type rxe netdev veth0 || echo "@vm-warn rdma link add failed"
echo "@vm-ready"
cd /tmp
export PATH=/bin:/sbin HOME=/tmp
sh /cmd
echo "@vm-exit $?"
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc 2>/dev/null | gzip -1 > "$work/initrd.gz")

# --- boot ----------------------------------------------------------------------
# the console shows the command's output; the kernel's own lines ("[   1.234567]
# ...") and the firmware's are left out. Only those: a job's log lines start with
# "[worker0]" and the like, and once an over-wide '^\[' hid every one of them.
log=$work/serial.log
set +e
timeout "$timeout_s" qemu-system-x86_64 -accel tcg -cpu max -m 2048 -smp 2 -nographic -no-reboot \
  -kernel "$cache/vmlinuz" -initrd "$work/initrd.gz" \
  -append "console=ttyS0 panic=-1 loglevel=4 edd=off" < /dev/null 2>&1 | tee "$log" \
  | grep -a --line-buffered -vE '^\[ *[0-9]+\.[0-9]+\]|SeaBIOS|iPXE|Press Ctrl-B|Booting from ROM|^.\[\?7l' || true
set -e
rc=$(grep -a -o '@vm-exit [0-9]*' "$log" | tail -1 | awk '{print $2}')
if [ -z "$rc" ]; then
  echo "softroce-vm: the VM ended without reporting the command's status (timeout ${timeout_s}s or a kernel panic); serial log tail:" >&2
  tail -20 "$log" >&2
  exit 1
fi
exit "$rc"
