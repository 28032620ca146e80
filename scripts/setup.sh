#!/usr/bin/env bash
# Installs everything nitrile needs on a fresh Debian machine, idempotently:
# Debian packages, cargo tools, and builds the workspace. Safe to run again.
#
#   scripts/setup.sh            # build tools, the guest image and a release build of `nitrile`
#   scripts/setup.sh --tests    # also what the test suite needs
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
for arg in "$@"; do
    case "$arg" in
        --tests) want_tests=1 ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

log() { printf '==> %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Debian packages: only what is missing is installed.
debian_packages=(build-essential pkg-config ca-certificates)
missing=()
for p in "${debian_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# --- Guest images and the qemu backend -------------------------------------
# QEMU 10 comes from bookworm-backports (bookworm's own 7.2 conflicts with
# qemu-utils 10). The backports suite is added with the mirror URI of the
# system's existing Debian `bookworm` source, never a hard-coded host.
debian_bookworm_uri() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] || continue
        # deb822: one stanza per paragraph; print URIs of a stanza whose
        # Suites list has exactly `bookworm`.
        awk 'BEGIN { RS=""; FS="\n" }
             {
                 uris=""; hit=0
                 for (i = 1; i <= NF; i++) {
                     if ($i ~ /^URIs:/)   { sub(/^URIs:[ \t]*/, "", $i); uris=$i }
                     if ($i ~ /^Suites:/) { n = split(substr($i, 8), s, /[ \t]+/)
                                            for (j = 1; j <= n; j++) if (s[j] == "bookworm") hit=1 }
                 }
                 if (hit && uris != "") { split(uris, u, /[ \t]+/); print u[1]; exit }
             }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -e "$f" ] || continue
        # Classic: `deb [options] URI bookworm main ...`.
        awk '$1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                           if ($(i+1) == "bookworm") { print $i; exit } }' "$f"
    done
}
backports_configured() {
    grep -qsE '^[^#]*[[:space:]]bookworm-backports([[:space:]]|$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources
}
# dropbear-bin: the guest image's SSH server (its binaries and the libraries
# they link are copied into the initramfs); openssh-client: the customer's
# side of that, for the cell tour and the tests that log in to an instance;
# tcpdump: the tests capture what crosses the wire between hosts.
guest_packages=(busybox-static zstd lz4 cpio kmod dropbear-bin openssh-client tcpdump)
missing=()
for p in qemu-system-x86 "${guest_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
apt_updated=0
# The suite is also needed by scripts/guest-image.sh (the kernel package).
if ! backports_configured; then
    uri="$(debian_bookworm_uri | head -n 1)"
    [ -n "$uri" ] || { echo "setup.sh: no Debian bookworm source in /etc/apt to reuse for bookworm-backports" >&2; exit 1; }
    log "adding bookworm-backports from $uri"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    {
        printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\n' "$uri"
        if [ -e "$keyring" ]; then printf 'Signed-By: %s\n' "$keyring"; fi
    } | as_root tee /etc/apt/sources.list.d/nitrile-backports.sources >/dev/null
    as_root apt-get update -qq
    apt_updated=1
fi
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    [ "$apt_updated" -eq 1 ] || as_root apt-get update -qq
    for p in "${missing[@]}"; do
        if [ "$p" = qemu-system-x86 ]; then
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null
        fi
    done
    rest=()
    for p in "${missing[@]}"; do [ "$p" = qemu-system-x86 ] || rest+=("$p"); done
    if [ "${#rest[@]}" -gt 0 ]; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${rest[@]}" >/dev/null
    fi
fi
# --- end guest images --------------------------------------------------------

# --- TPM 2.0 -------------------------------------------------------------------
# The attest crate drives the TPM through tss-esapi over tpm2-tss (libtss2);
# swtpm is the TPM of the tests and of `nitrile host boot`, tpm2-tools checks
# our quotes independently (tpm2_checkquote), OVMF is the measuring firmware
# and systemd-boot-efi's stub makes the host image a Unified Kernel Image.
tpm_packages=(libtss2-esys-3.0.2-0 libtss2-mu0 libtss2-sys1 libtss2-tctildr0
    libtss2-tcti-device0 libtss2-tcti-swtpm0 libtss2-tcti-mssim0
    swtpm swtpm-tools tpm2-tools ovmf systemd-boot-efi binutils)
missing=()
for p in "${tpm_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# tss-esapi links libtss2 through pkg-config and needs no headers (its
# bindings are pre-generated). Debian's libtss2-dev would give the .pc files,
# but it depends on a libcurl -dev package that a machine with a newer libcurl
# than its mirror cannot install; without it, the same link information is
# written into .build/tss2 (.cargo/config.toml points pkg-config there).
if ! dpkg-query -W -f='${Status}' libtss2-dev 2>/dev/null | grep -q 'install ok installed' &&
   ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtss2-dev >/dev/null 2>&1; then
    kit=.build/tss2
    multiarch="$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || gcc -dumpmachine)"
    version="$(dpkg-query -W -f='${Version}' libtss2-esys-3.0.2-0 | sed 's/-[^-]*$//')"
    rm -rf "$kit" && mkdir -p "$kit/pkgconfig" "$kit/lib"
    for lib in tss2-esys tss2-sys tss2-mu tss2-tctildr; do
        so="$(ls /usr/lib/"$multiarch"/lib"$lib".so.[0-9]* 2>/dev/null | sort | head -n 1)"
        [ -n "$so" ] || { echo "setup.sh: lib$lib is not installed" >&2; exit 1; }
        ln -s "$so" "$kit/lib/lib$lib.so"
        printf 'libdir=%s\nName: %s\nDescription: TPM2 Software Stack (%s)\nVersion: %s\nLibs: -L${libdir} -l%s\n' \
            "$PWD/$kit/lib" "$lib" "$lib" "$version" "$lib" >"$kit/pkgconfig/$lib.pc"
    done
    log "libtss2-dev is not installable here: linking tss-esapi through $kit"
fi
# --- end TPM 2.0 ---------------------------------------------------------------

command -v cargo >/dev/null || { echo "setup.sh: cargo is required (a Rust toolchain >= 1.89)" >&2; exit 1; }

# --- vsock for the qemu backend ----------------------------------------------
# There are no vhost kernel modules here: the qemu backend serves vsock over
# vhost-user with rust-vmm's vhost-device-vsock. The guest image's static vsock
# test tool is built with gcc (build-essential, above).
if ! command -v vhost-device-vsock >/dev/null 2>&1 &&
   [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/vhost-device-vsock" ]; then
    log "installing vhost-device-vsock (one time, a few minutes)"
    cargo install --locked vhost-device-vsock@0.3.0
fi
# `nitrile up` imports the guest image so that instances can be launched;
# the QEMU tests boot it too. Cached: quick when it is up to date with
# guest/initramfs.
log "building the guest image (a download the first time, cached after)"
scripts/guest-image.sh >/dev/null ||
    log "the guest image was not built: \`nitrile up\` runs without a launchable image and the QEMU tests print SKIPPED"
# --- end vsock ---------------------------------------------------------------

# --- ACPI table check for the kvm backend ------------------------------------
# ACPICA's iasl disassembles the VMM's generated ACPI tables in a test, as an
# independent decoder of their AML, lengths and checksums.
if [ "$want_tests" -eq 1 ] && ! command -v iasl >/dev/null 2>&1; then
    log "installing acpica-tools"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq acpica-tools >/dev/null
fi
# --- end ACPI ----------------------------------------------------------------

# PostgreSQL server binaries: nitrile-tlog's PostgreSQL storage test starts a
# private server of its own (it prints SKIPPED without them).
if [ "$want_tests" -eq 1 ] && ! dpkg-query -W -f='${Status}' postgresql 2>/dev/null | grep -q 'install ok installed'; then
    log "installing postgresql"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi

# --- Independent verifiers (Python) ------------------------------------------
# The key service's tests open its wrapped and sealed keys with third-party
# Python implementations (cryptography's HKDF and AES-GCM, pyhpke's RFC 9180
# HPKE), the release tests read the TUF repository with python-tuf's
# ngclient, and the attestation tests open our COSE documents with pycose
# (cbor2 below 6: pycose 1.1 does not read cbor2 6's tags); installed at
# pinned versions in a virtual environment of the repository, .venv-verify/
# (ignored by git); without it those tests print SKIPPED. Remade only when the pins change.
verify_requirements=(cryptography==51.0.1 cffi==2.1.1 pycparser==3.12 pyhpke==0.6.5
    tuf==7.0.1 securesystemslib==1.6.0 urllib3==2.8.0
    pycose==1.1.0 cbor2==5.6.5 attrs==26.1.0 certvalidator==0.11.1 ecdsa==0.19.2
    oscrypto==1.3.0 asn1crypto==1.5.1 six==1.17.0)
if [ "$want_tests" -eq 1 ]; then
    if ! dpkg-query -W -f='${Status}' python3-venv 2>/dev/null | grep -q 'install ok installed'; then
        log "installing python3-venv"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
    fi
    verify_venv=.venv-verify
    verify_pins="$(printf '%s\n' "${verify_requirements[@]}")"
    if [ ! -x "$verify_venv/bin/python3" ] ||
       [ "$(cat "$verify_venv/pins.txt" 2>/dev/null)" != "$verify_pins" ]; then
        log "installing the independent verifiers in $verify_venv: ${verify_requirements[*]}"
        rm -rf "$verify_venv"
        if python3 -m venv "$verify_venv" &&
           "$verify_venv/bin/pip" install --quiet --disable-pip-version-check \
               --only-binary=:all: "${verify_requirements[@]}"; then
            printf '%s\n' "$verify_pins" >"$verify_venv/pins.txt"
        else
            log "the independent verifiers could not be installed: their tests will print SKIPPED"
        fi
    fi
fi
# --- end independent verifiers -----------------------------------------------

if [ "$want_tests" -eq 1 ]; then
    if ! cargo deny --version >/dev/null 2>&1; then
        log "installing cargo-deny (one time, a few minutes)"
        cargo install --locked cargo-deny@0.20.2
    fi
    if ! cargo nextest --version >/dev/null 2>&1; then
        log "installing cargo-nextest (one time, a few minutes)"
        cargo install --locked cargo-nextest
    fi
    # The fuzz smoke run of scripts/test.sh; without it that step prints
    # SKIPPED and says why.
    if ! cargo fuzz --version >/dev/null 2>&1; then
        log "installing cargo-fuzz (one time, a few minutes)"
        cargo install --locked cargo-fuzz@0.13.2 ||
            log "cargo-fuzz could not be installed: the fuzz smoke run will print SKIPPED"
    fi
fi

log "building nitrile (release)"
cargo build --release --locked -p nitrile-cli
