#!/usr/bin/env bash
# Builds nitrile's guest image from Debian's linux-image-cloud-amd64
# (bookworm-backports): the uncompressed ELF vmlinux (PVH entry), and a
# busybox initramfs with the virtio, vsock and dm-crypt modules,
# guest/initramfs/init, the static vsock test tool built from
# guest/initramfs/vsock-echo.c, the static metadata client built from
# guest/initramfs/imds.c, udhcpc's event script guest/initramfs/udhcpc.script,
# and the SSH server: Debian's dropbear (with dropbearkey and the dbclient
# client) and the shared libraries they link. Everything is cached; a second
# run is fast.
#
#   scripts/guest-image.sh [--cache DIR]
#
# DIR defaults to $NITRILE_CACHE_DIR, else ${XDG_CACHE_HOME:-$HOME/.cache}/nitrile.
# Output, in DIR/guest-image/out/ (the path is printed on stdout):
#   vmlinux         uncompressed ELF kernel
#   initramfs       cpio newc archive (compressed with what the kernel supports)
#   cmdline         the default kernel command line
#   kernel-release  the kernel's release string (uname -r)
# Needs: apt-get, dpkg-deb, depmod (kmod), cpio, busybox-static, dropbear-bin,
# zstd/lz4/gzip, gcc
# (scripts/setup.sh installs them and adds the bookworm-backports suite).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"

cache="${NITRILE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/nitrile}"
while [ "$#" -gt 0 ]; do
    case "$1" in
        --cache) [ "$#" -ge 2 ] || { echo "guest-image.sh: --cache needs a directory" >&2; exit 2; }
                 cache="$2"; shift 2 ;;
        -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
        *) echo "guest-image.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

log() { printf 'guest-image: %s\n' "$*" >&2; }
die() { printf 'guest-image: error: %s\n' "$*" >&2; exit 1; }

meta=linux-image-cloud-amd64
suite=bookworm-backports
# Modules the init loads; their dependencies come along through modules.dep.
modules=(virtio_mmio virtio_blk virtio_net vsock vmw_vsock_virtio_transport dm_crypt)
default_cmdline="console=ttyS0 tsc_early_khz=2000000 panic=-1"
init_src="$repo/guest/initramfs/init"
vsock_src="$repo/guest/initramfs/vsock-echo.c"
imds_src="$repo/guest/initramfs/imds.c"
udhcpc_src="$repo/guest/initramfs/udhcpc.script"
busybox_bin=/bin/busybox
# The SSH server and its tools, from Debian's dropbear-bin, at the same
# paths in the guest; their shared libraries come along (found with ldd).
dropbear_pkg=dropbear-bin
dropbear_bins=(/usr/sbin/dropbear /usr/bin/dropbearkey /usr/bin/dbclient)

for tool in apt-get apt-cache dpkg-deb dpkg-query depmod cpio xz gcc ldd; do
    command -v "$tool" >/dev/null || die "$tool is missing (run scripts/setup.sh)"
done
[ -x "$busybox_bin" ] || die "$busybox_bin is missing (install busybox-static: scripts/setup.sh)"
file "$busybox_bin" 2>/dev/null | grep -q 'dynamically linked' && die "$busybox_bin is not static (install busybox-static)"
[ -f "$init_src" ] || die "missing $init_src"
[ -f "$vsock_src" ] || die "missing $vsock_src"
[ -f "$imds_src" ] || die "missing $imds_src"
[ -f "$udhcpc_src" ] || die "missing $udhcpc_src"
dropbear_version="$(dpkg-query -W -f='${Version}' "$dropbear_pkg" 2>/dev/null)" ||
    die "$dropbear_pkg is not installed (run scripts/setup.sh)"
for bin in "${dropbear_bins[@]}"; do
    [ -x "$bin" ] || die "$bin is missing (install $dropbear_pkg: scripts/setup.sh)"
done
# The shared libraries the dropbear binaries link, and the dynamic loader:
# the paths ldd names (the loader's is the one the binaries ask for).
dropbear_libs="$(ldd "${dropbear_bins[@]}" |
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// && $1 !~ /:$/ { print $1 }' | sort -u)"
[ -n "$dropbear_libs" ] || die "ldd names no libraries for ${dropbear_bins[*]}"

work="$cache/guest-image"
mkdir -p "$work/deb" "$work/out"
cache="$(cd "$cache" && pwd)"
work="$cache/guest-image"
out="$work/out"

# 1. The real kernel package behind the meta package, downloaded once.
pkg="$(apt-cache depends -t "$suite" "$meta" 2>/dev/null |
       awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }')" || true
if [ -z "$pkg" ]; then
    # Offline or no backports suite: use what was downloaded before.
    deb="$(ls -1 "$work/deb"/linux-image-*-cloud-amd64_*.deb 2>/dev/null | sort -V | tail -n 1 || true)"
    [ -n "$deb" ] || die "cannot resolve $meta in $suite (run scripts/setup.sh, which adds the suite)"
    log "apt cannot resolve $meta; using cached $(basename "$deb")"
else
    deb="$(ls -1 "$work/deb/${pkg}"_*.deb 2>/dev/null | tail -n 1 || true)"
    if [ -z "$deb" ]; then
        log "downloading $pkg from $suite"
        (cd "$work/deb" && apt-get download -q -t "$suite" "$pkg" 2>&1 |
            grep -v -e 'unsandboxed as root' -e '^Get:' -e '^Fetched' >&2 || true)
        deb="$(ls -1 "$work/deb/${pkg}"_*.deb 2>/dev/null | tail -n 1 || true)"
        [ -n "$deb" ] || die "apt-get download $pkg failed"
    fi
fi

# A stamp over every input: the kernel package, the init, the C tools, the
# udhcpc script, this script, busybox, and dropbear (its package version,
# its binaries and the libraries they link, by content).
stamp="$(cat <(sha256sum "$deb" | cut -d' ' -f1) "$init_src" "$vsock_src" "$imds_src" \
    "$udhcpc_src" "$0" <(sha256sum "$busybox_bin") <(echo "$dropbear_pkg $dropbear_version") \
    <(sha256sum "${dropbear_bins[@]}" $dropbear_libs) | sha256sum | cut -d' ' -f1)"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] &&
   [ -f "$out/vmlinux" ] && [ -f "$out/initramfs" ] && [ -f "$out/cmdline" ]; then
    log "up to date: $out"
    echo "$out"
    exit 0
fi

tmp="$(mktemp -d "$work/build.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

# 2. Extract the package and index its modules.
log "extracting $(basename "$deb")"
dpkg-deb -x "$deb" "$tmp/pkg"
release="$(ls -1 "$tmp/pkg/lib/modules" | head -n 1)"
[ -n "$release" ] || die "no /lib/modules/<release> in $(basename "$deb")"
config="$tmp/pkg/boot/config-$release"
bzimage="$tmp/pkg/boot/vmlinuz-$release"
[ -f "$config" ] && [ -f "$bzimage" ] || die "package lacks boot/config-$release or boot/vmlinuz-$release"
depmod -b "$tmp/pkg" "$release"

# 3. The uncompressed ELF vmlinux, out of the bzImage's compressed payload.
is_elf() { [ "$(head -c 4 "$1" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; }
offsets() { LC_ALL=C grep -obUaP "$1" "$bzimage" | cut -d: -f1 || true; }
extract_vmlinux() {
    local name magic cmd off
    for spec in 'zstd|\x28\xb5\x2f\xfd|zstd -dcq' \
                'lz4|\x02\x21\x4c\x18|lz4 -dcq' \
                'xz|\xfd\x37\x7a\x58\x5a\x00|xz -dcq' \
                'gzip|\x1f\x8b\x08|gzip -dcq'; do
        IFS='|' read -r name magic cmd <<<"$spec"
        command -v "${cmd%% *}" >/dev/null || continue
        for off in $(offsets "$magic"); do
            # Trailing bytes after the payload make the decompressor complain;
            # what counts is that the output is a whole ELF file.
            tail -c "+$((off + 1))" "$bzimage" | $cmd > "$tmp/vmlinux" 2>/dev/null || true
            if [ -s "$tmp/vmlinux" ] && is_elf "$tmp/vmlinux"; then
                log "vmlinux: $name payload at offset $off"
                return 0
            fi
        done
    done
    return 1
}
extract_vmlinux || die "no zstd, lz4, xz or gzip payload in $(basename "$bzimage") decompresses to an ELF file"

# 4. The initramfs tree: busybox, init, the C tools, dropbear, the modules
# with their dependencies.
root="$tmp/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,run,etc,etc/udhcpc,etc/dropbear,root,usr/bin,usr/sbin} \
    "$root/lib/modules/$release"
cp "$busybox_bin" "$root/bin/busybox"
install -m 0755 "$init_src" "$root/init"
install -m 0755 "$udhcpc_src" "$root/etc/udhcpc/default.script"
gcc -static -O2 -s -Wall -Werror -o "$root/bin/vsock-echo" "$vsock_src" ||
    die "cannot build $vsock_src (needs gcc and the static glibc from libc6-dev)"
gcc -static -O2 -s -Wall -Werror -o "$root/bin/imds" "$imds_src" ||
    die "cannot build $imds_src (needs gcc and the static glibc from libc6-dev)"
for bin in "${dropbear_bins[@]}"; do
    install -m 0755 "$bin" "$root$bin"
done
ln -s dbclient "$root/usr/bin/ssh"
for lib in $dropbear_libs; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
# What dropbear and a login need: root, whose shell is /bin/sh, with no
# password (a '*' in shadow matches none, and -s turns password login off),
# the groups (tty for the terminals), the shells, files-only name lookup.
chmod 0700 "$root/root"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$root/etc/passwd"
printf 'root:*::0:99999:7:::\n' > "$root/etc/shadow"
chmod 0600 "$root/etc/shadow"
printf 'root:x:0:\ntty:x:5:\n' > "$root/etc/group"
printf '/bin/sh\n' > "$root/etc/shells"
printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n' > "$root/etc/nsswitch.conf"
printf '127.0.0.1 localhost\n' > "$root/etc/hosts"
moddir="$tmp/pkg/lib/modules/$release"
needed=""
for m in "${modules[@]}"; do
    deps="$(modprobe -d "$tmp/pkg" -S "$release" --show-depends "$m" 2>/dev/null)" ||
        die "module $m not found in $release"
    needed+="$(awk '$1 == "insmod" { print $2 }' <<<"$deps")"$'\n'
done
needed="$(sort -u <<<"$needed" | sed '/^$/d')"
[ -n "$needed" ] || die "no modules resolved"
for path in $needed; do
    rel="${path#"$moddir"/}"
    dst="$root/lib/modules/$release/${rel%.xz}"
    mkdir -p "$(dirname "$dst")"
    case "$path" in
        # Stored uncompressed: no decompressor needed in the guest.
        *.xz) xz -dc "$path" > "$dst" ;;
        *.zst) zstd -dcq "$path" > "$dst" ;;
        *) cp "$path" "$dst" ;;
    esac
done
cp "$moddir"/modules.order "$moddir"/modules.builtin "$moddir"/modules.builtin.modinfo "$root/lib/modules/$release/"
depmod -b "$root" "$release"
log "modules: $(echo "$needed" | wc -l) files for ${modules[*]}"

# 5. A reproducible cpio newc archive, compressed with what the kernel unpacks.
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc --owner=0:0 --reproducible) > "$tmp/initramfs.cpio"
if grep -qx 'CONFIG_RD_ZSTD=y' "$config" && command -v zstd >/dev/null; then
    zstd -q -19 -c "$tmp/initramfs.cpio" > "$tmp/initramfs"; how=zstd
elif grep -qx 'CONFIG_RD_GZIP=y' "$config"; then
    gzip -n -9 -c "$tmp/initramfs.cpio" > "$tmp/initramfs"; how=gzip
else
    cp "$tmp/initramfs.cpio" "$tmp/initramfs"; how=uncompressed
fi
# Padded with NULs (which the kernel skips between archives) to whole pages.
# QEMU's microvm, booting the ELF kernel through PVH, places the initrd so
# that it ends within the last page below the top of RAM, where the
# firmware's ACPI tables are (DSDT, FADT, MADT, XSDT in the top kilobyte):
# an archive whose length ends late in a page overwrote them and the guest
# hung in ACPI's initialization. A whole number of pages ends one page lower.
size="$(stat -c %s "$tmp/initramfs")"
pad=$(( (4096 - size % 4096) % 4096 ))
[ "$pad" -eq 0 ] || head -c "$pad" /dev/zero >> "$tmp/initramfs"
log "initramfs: $how, $size bytes, $((size + pad)) with padding"

# 6. Publish: files first, the stamp last.
rm -f "$out/stamp"
mv -f "$tmp/vmlinux" "$out/vmlinux"
mv -f "$tmp/initramfs" "$out/initramfs"
printf '%s\n' "$default_cmdline" > "$out/cmdline"
printf '%s\n' "$release" > "$out/kernel-release"
printf '%s\n' "$stamp" > "$out/stamp"
log "done: $out"
echo "$out"
