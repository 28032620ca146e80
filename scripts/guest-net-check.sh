#!/usr/bin/env bash
# Checks the guest image's server boot on its own, without nitrile's data
# path: boots the image under QEMU (microvm, TCG unless --accel kvm) with a
# virtio-net NIC on a tap in a throwaway network namespace, where this
# script plays the gateway: busybox udhcpd answers DHCP (address, mask,
# router, MTU 1380) and a small IMDSv2-like metadata responder (Python,
# token required) listens on 169.254.169.254:80. Then it shows, failing on
# the first step that does not hold:
#   - DHCP: the guest's eth0 has the leased address, the default route and
#     the MTU of option 26
#   - the SSH keys from the metadata service: `ssh -i key root@<guest>` runs
#     a command and gets a terminal, the host key checked against the one
#     the console printed;
#     another key is refused; the server offers no password login;
#     authorized_keys is 0600
#   - the metadata client in the guest: a GET with a token works, a GET the
#     service does not have exits 1, a plain GET without a token is refused
#     by the responder (so the guest's fetches did use tokens)
#   - the user data ran once, its exit status on the console, its output in
#     /run/user-data.log (0600), the script 0700
#   - imds's bounds, on the host against a hostile responder: a body over
#     its bound, a truncated body, an endless header, a token with a line
#     break, a responder that never answers: each exits 1 and writes nothing
#     to stdout; a chunked body is decoded
#   - with no keys (404) and user data that is not a script: the SSH server
#     runs, nobody logs in, nothing is run
#   - without a DHCP server: NITRILE-NET-FAILED dhcp, no further step, and
#     the boot still reaches NITRILE-GUEST-IDLE
#   - a boot without a NIC still reaches NITRILE-GUEST-IDLE, with no
#     network step
#
#   scripts/guest-net-check.sh [--accel tcg|kvm] [--cache DIR] [--timeout SECONDS]
#
# Needs root (network namespaces, taps), qemu-system-x86_64, ssh and
# ssh-keygen (openssh-client), python3, busybox (udhcpd), gcc, and what
# scripts/guest-image.sh needs; prints "SKIPPED: <reason>" and exits 0
# without them. Prints "PASS" at the end; exits 1 when a step fails.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"

accel=tcg
cache_args=()
timeout=600
while [ "$#" -gt 0 ]; do
    case "$1" in
        --accel) [ "$#" -ge 2 ] || { echo "guest-net-check.sh: --accel needs tcg or kvm" >&2; exit 2; }
                 accel="$2"; shift 2 ;;
        --cache) [ "$#" -ge 2 ] || { echo "guest-net-check.sh: --cache needs a directory" >&2; exit 2; }
                 cache_args=(--cache "$2"); shift 2 ;;
        --timeout) [ "$#" -ge 2 ] || { echo "guest-net-check.sh: --timeout needs seconds" >&2; exit 2; }
                   timeout="$2"; shift 2 ;;
        -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
        *) echo "guest-net-check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
case "$accel" in tcg|kvm) ;; *) echo "guest-net-check.sh: --accel is tcg or kvm" >&2; exit 2 ;; esac

skip() { echo "SKIPPED: $*"; exit 0; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
secs() { printf '%d.%01d' $(( $1 / 1000 )) $(( $1 % 1000 / 100 )); }
log() { printf 'guest-net-check: %s\n' "$*" >&2; }
die() { printf 'guest-net-check: FAILED: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || skip "needs root (network namespaces and taps)"
for tool in qemu-system-x86_64 ip ssh ssh-keygen python3 busybox gcc; do
    command -v "$tool" >/dev/null || skip "$tool is missing"
done
[ -c /dev/net/tun ] || skip "/dev/net/tun is missing"
[ "$accel" = tcg ] || [ -w /dev/kvm ] || skip "--accel kvm without a usable /dev/kvm"

log "building the guest image"
image="$(bash "$repo/scripts/guest-image.sh" "${cache_args[@]}")" || skip "the guest image could not be built (see above)"

ns="nitrile-gnc-$$"
tmp="$(mktemp -d)"
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT

gw=10.77.0.1
guest=10.77.0.2
mac=02:00:0a:4d:00:02
mtu=1380
instance_id="i-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
marker="NITRILE-USER-DATA-MARKER-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
user_data_status=3

# The customer's key, and another that must not get in.
ssh-keygen -q -t ed25519 -N '' -C customer -f "$tmp/key"
ssh-keygen -q -t ed25519 -N '' -C stranger -f "$tmp/other"
mkdir -p "$tmp/imds"
cp "$tmp/key.pub" "$tmp/imds/keys"
printf '%s' "$instance_id" > "$tmp/imds/instance-id"
printf '%s' "$guest" > "$tmp/imds/local-ipv4"
printf '#!/bin/sh\necho %s\necho "uid=$(id -u) home=$HOME pwd=$(pwd)"\nexit %s\n' \
    "$marker" "$user_data_status" > "$tmp/imds/user-data"
printf '{"instanceId":"%s"}' "$instance_id" > "$tmp/imds/document"

# The metadata responder: PUT /latest/api/token gives a token for the TTL
# header; a GET needs it (401 without), answers the files above, 404 for
# anything else. Each request is logged. In "hostile" mode it answers
# every GET with the misbehaviour named by the path instead.
cat > "$tmp/imds.py" <<'EOF'
import http.server, os, secrets, socket, sys, time

addr, port, root, mode, logfile = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
tokens = set()
files = {
    "/latest/meta-data/instance-id": "instance-id",
    "/latest/meta-data/local-ipv4": "local-ipv4",
    "/latest/meta-data/public-keys/0/openssh-key": "keys",
    "/latest/user-data": "user-data",
    "/latest/dynamic/instance-identity/document": "document",
}

def note(line):
    with open(logfile, "a") as f:
        f.write(line + "\n")

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body=b""):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def do_PUT(self):
        ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        note(f"PUT {self.path} ttl={ttl}")
        if self.path != "/latest/api/token" or ttl is None or not ttl.isdigit():
            return self.answer(400)
        if mode == "bad-token":
            return self.answer(200, b"abc\r\nX-Injected: 1")
        token = secrets.token_urlsafe(32)
        tokens.add(token)
        self.answer(200, token.encode())

    def do_GET(self):
        token = self.headers.get("X-aws-ec2-metadata-token")
        ok = token in tokens
        note(f"GET {self.path} token={'valid' if ok else 'missing' if token is None else 'invalid'}")
        if not ok:
            return self.answer(401)
        if mode == "hostile":
            return self.hostile()
        name = files.get(self.path)
        if name is None or not os.path.exists(os.path.join(root, name)):
            return self.answer(404)
        with open(os.path.join(root, name), "rb") as f:
            self.answer(200, f.read())

    def hostile(self):
        w = self.wfile
        if self.path == "/big":
            n = 1024 * 1024 + 1
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
            w.write(b"x" * n)
        elif self.path == "/big-unsized":
            w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            w.write(b"x" * (2 * 1024 * 1024))
        elif self.path == "/big-chunked":
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(17):
                w.write(b"10000\r\n" + b"y" * 0x10000 + b"\r\n")
            w.write(b"0\r\n\r\n")
        elif self.path == "/chunked":
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            w.write(b"6\r\nhello \r\nb;ext=1\r\nchunked-ok\n\r\n0\r\nX-Trailer: t\r\n\r\n")
        elif self.path == "/truncated":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        elif self.path == "/endless-header":
            w.write(b"HTTP/1.1 200 OK\r\n")
            for i in range(2000):
                w.write(b"X-Filler-%d: aaaaaaaaaaaaaaaa\r\n" % i)
            w.write(b"Content-Length: 2\r\n\r\nok")
        elif self.path == "/silent":
            time.sleep(30)
        elif self.path == "/not-http":
            w.write(b"SSH-2.0-nope\r\n\r\n")
        else:
            return self.answer(404)
        self.close_connection = True

class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

Server((addr, port), Handler).serve_forever()
EOF

# --- The namespace: a tap for the guest, the gateway's addresses. ---------
ip netns add "$ns"
ip -n "$ns" link set lo up
ip -n "$ns" addr add 169.254.169.254/32 dev lo
ip -n "$ns" tuntap add dev tap0 mode tap
ip -n "$ns" addr add "$gw/24" dev tap0
ip -n "$ns" link set tap0 up

cat > "$tmp/udhcpd.conf" <<EOF
start $guest
end $guest
interface tap0
max_leases 1
lease_file $tmp/udhcpd.leases
pidfile $tmp/udhcpd.pid
opt subnet 255.255.255.0
opt router $gw
opt mtu $mtu
opt lease 3600
EOF
touch "$tmp/udhcpd.leases"
ip netns exec "$ns" busybox udhcpd -f "$tmp/udhcpd.conf" > "$tmp/udhcpd.log" 2>&1 &
udhcpd_pid=$!
pids+=("$udhcpd_pid")
ip netns exec "$ns" python3 "$tmp/imds.py" 169.254.169.254 80 "$tmp/imds" normal "$tmp/imds.log" \
    > "$tmp/imds.out" 2>&1 &
pids+=($!)
ip netns exec "$ns" python3 "$tmp/imds.py" 127.0.0.1 8081 "$tmp/imds" hostile "$tmp/hostile.log" \
    > "$tmp/hostile.out" 2>&1 &
pids+=($!)
ip netns exec "$ns" python3 "$tmp/imds.py" 127.0.0.1 8082 "$tmp/imds" bad-token "$tmp/badtoken.log" \
    > "$tmp/badtoken.out" 2>&1 &
pids+=($!)

# --- imds's bounds, on the host, while the guest would boot. --------------
gcc -static -O2 -Wall -Werror -o "$tmp/imds-bin" "$repo/guest/initramfs/imds.c" ||
    die "cannot build guest/initramfs/imds.c"
for i in $(seq 50); do
    ip netns exec "$ns" bash -c ': > /dev/tcp/127.0.0.1/8081' 2>/dev/null &&
        ip netns exec "$ns" bash -c ': > /dev/tcp/127.0.0.1/8082' 2>/dev/null &&
        ip netns exec "$ns" bash -c ': > /dev/tcp/169.254.169.254/80' 2>/dev/null && break
    [ "$i" -lt 50 ] || die "the metadata responders did not start: $(cat "$tmp"/*.out)"
    sleep 0.1
done
imds_host() { # ADDR PATH: runs the client; sets rc, out, err
    set +e
    ip netns exec "$ns" env IMDS_ADDR="$1" "$tmp/imds-bin" get "$2" > "$tmp/h.out" 2> "$tmp/h.err"
    rc=$?
    set -e
    out="$(cat "$tmp/h.out")"
    err="$(cat "$tmp/h.err")"
}
refused() { # ADDR PATH WHAT: the client must exit 1, print nothing, say why
    imds_host "$1" "$2"
    [ "$rc" -eq 1 ] || die "imds $2 ($3): exit $rc, not 1"
    [ ! -s "$tmp/h.out" ] || die "imds $2 ($3): wrote $(wc -c < "$tmp/h.out") bytes to stdout"
    grep -q "$4" "$tmp/h.err" || die "imds $2 ($3): stderr '$err' does not say '$4'"
    log "imds refuses $3: $err"
}
refused 127.0.0.1:8081 /big "a body over 1 MiB" "body larger than"
refused 127.0.0.1:8081 /big-unsized "an unsized body over 1 MiB" "body larger than"
refused 127.0.0.1:8081 /big-chunked "a chunked body over 1 MiB" "body larger than"
refused 127.0.0.1:8081 /truncated "a truncated body" "before the end of the body"
refused 127.0.0.1:8081 /endless-header "an endless header" "longer than"
refused 127.0.0.1:8081 /not-http "a response that is not HTTP" "not an HTTP"
refused 127.0.0.1:8081 /silent "a responder that never answers" "timed out"
refused 127.0.0.1:8082 /latest/meta-data/instance-id "a token with a line break" "not printable"
refused 127.0.0.1:8081 /missing "a 404" "HTTP 404"
imds_host 127.0.0.1:8081 /chunked
[ "$rc" -eq 0 ] && [ "$out" = "hello chunked-ok" ] || die "imds /chunked: exit $rc, '$out' ($err)"
log "imds decodes a chunked body"
grep -q '^GET' "$tmp/badtoken.log" && die "a GET was sent with a token holding a line break"

# --- The guest: boot, DHCP, SSH, user data. -------------------------------
qemu() { # CONSOLE [QEMU ARGS...]
    local console="$1"
    shift
    ip netns exec "$ns" qemu-system-x86_64 \
        -M microvm,pic=off,pit=off -accel "$accel" -cpu max,-la57 -smp 1 -m 256M \
        -nodefaults -no-user-config -nographic -no-reboot -monitor none \
        -serial "file:$console" \
        -kernel "$image/vmlinux" -initrd "$image/initramfs" -append "$(cat "$image/cmdline")" \
        "$@" > "$console.qemu" 2>&1 &
    qemu_pid=$!
    pids+=("$qemu_pid")
}
# Waits for a console line matching the regex, failing on a NET-FAILED
# line, on QEMU's exit and after the timeout; prints the seconds waited.
wait_console() { # CONSOLE REGEX
    local start now
    start=$(date +%s)
    while :; do
        if grep -qE "$2" "$1" 2>/dev/null; then
            now=$(date +%s)
            echo $((now - start))
            return 0
        fi
        if [ "${allow_failed:-0}" -eq 0 ] && grep -q 'NITRILE-NET-FAILED' "$1" 2>/dev/null; then
            tail -n 40 "$1" >&2
            die "the guest says $(grep -m1 NITRILE-NET-FAILED "$1" | tr -d '\r')"
        fi
        if ! kill -0 "$qemu_pid" 2>/dev/null; then
            tail -n 40 "$1" "$1.qemu" >&2
            die "QEMU exited before the console showed /$2/"
        fi
        now=$(date +%s)
        if [ $((now - start)) -ge "$timeout" ]; then
            tail -n 40 "$1" >&2
            die "no /$2/ on the console within ${timeout}s"
        fi
        sleep 0.2
    done
}

log "booting the guest with a NIC ($accel)"
console="$tmp/console"
boot_start=$(now_ms)
qemu "$console" -netdev tap,id=n0,ifname=tap0,script=no,downscript=no \
    -device "virtio-net-device,netdev=n0,mac=$mac"
wait_console "$console" '^NITRILE-SSH-READY' > /dev/null
ready="$(secs $(( $(now_ms) - boot_start )))"
log "NITRILE-SSH-READY ${ready}s after QEMU started"
grep -qx "NITRILE-NET-UP $guest" <(tr -d '\r' < "$console") || die "no 'NITRILE-NET-UP $guest' on the console"
grep -qx "NITRILE-SSH-KEYS 1" <(tr -d '\r' < "$console") || die "no 'NITRILE-SSH-KEYS 1' on the console"
hostkey="$(tr -d '\r' < "$console" | sed -n 's/^NITRILE-SSH-HOSTKEY //p' | head -n 1)"
case "$hostkey" in
    "ssh-ed25519 "*) ;;
    *) die "no ssh-ed25519 host key on the console" ;;
esac
printf '%s %s\n' "$guest" "$hostkey" > "$tmp/known_hosts"

ssh_opts=(-o BatchMode=yes -o StrictHostKeyChecking=yes -o "UserKnownHostsFile=$tmp/known_hosts"
          -o ConnectTimeout=30 -o LogLevel=ERROR)
guest_ssh() { ip netns exec "$ns" ssh "${ssh_opts[@]}" -i "$tmp/key" "root@$guest" "$@"; }

# SSH with the customer's key, the host key pinned from the console.
got="$(guest_ssh 'echo NITRILE-SSH-OK; id -u' | tr -d '\r')" || die "ssh with the customer's key failed"
[ "$got" = "$(printf 'NITRILE-SSH-OK\n0')" ] || die "ssh ran the command but printed '$got'"
got="$(guest_ssh -tt 'tty' < /dev/null | tr -d '\r')" || die "ssh -tt failed"
case "$got" in /dev/pts/*) ;; *) die "an interactive login has no terminal: '$got'" ;; esac
# The tools a customer expects are on the PATH of a command and of a login.
tools='for t in ip udhcpc poweroff ping nc wget imds dropbear ssh; do
           command -v "$t" > /dev/null || { echo "no $t on $PATH"; exit 1; }
       done'
got="$(guest_ssh "$tools")" || die "a command's PATH lacks a tool: $got"
got="$(guest_ssh -tt "$tools" < /dev/null | tr -d '\r')" || die "a login's PATH lacks a tool: $got"
log "ssh -i key root@$guest runs a command and gets a terminal (host key pinned from the console)"

# DHCP: address, route, MTU.
addr="$(guest_ssh 'ip -4 addr show dev eth0')" || die "ssh: ip addr"
grep -q "inet $guest/24 " <<<"$addr" || die "eth0 lacks $guest/24: $addr"
route="$(guest_ssh 'ip route')" || die "ssh: ip route"
grep -q "^default via $gw dev eth0" <<<"$route" || die "no default route via $gw: $route"
got="$(guest_ssh 'cat /sys/class/net/eth0/mtu')" || die "ssh: mtu"
[ "$got" = "$mtu" ] || die "eth0's MTU is $got, not $mtu (option 26)"
log "DHCP: eth0 $guest/24, default via $gw, MTU $mtu"

# Key login only.
if ip netns exec "$ns" ssh "${ssh_opts[@]}" -i "$tmp/other" -o IdentitiesOnly=yes "root@$guest" true 2>/dev/null; then
    die "a key the metadata service did not list got in"
fi
# With no method of its own, the client prints the methods the server
# offers: "Permission denied (publickey)."
methods="$(ip netns exec "$ns" ssh -o BatchMode=yes -o StrictHostKeyChecking=yes \
    -o "UserKnownHostsFile=$tmp/known_hosts" -o PreferredAuthentications=none \
    "root@$guest" true 2>&1 | sed -n 's/.*Permission denied (\(.*\))\..*/\1/p' | head -n 1)" || true
[ "$methods" = publickey ] || die "the SSH server offers '$methods', not only publickey"
got="$(guest_ssh 'stat -c %a ~/.ssh/authorized_keys')" || die "ssh: stat"
[ "$got" = 600 ] || die "authorized_keys has mode $got"
log "another key is refused; only publickey is offered; authorized_keys is 0600"

# The metadata client in the guest.
got="$(guest_ssh 'imds get /latest/meta-data/instance-id')" || die "imds get instance-id failed in the guest"
[ "$got" = "$instance_id" ] || die "imds get instance-id gave '$got'"
got="$(guest_ssh 'imds get /latest/meta-data/nothing-here; echo "rc=$?"' 2>&1)" || true
grep -q 'HTTP 404' <<<"$got" && grep -q 'rc=1' <<<"$got" || die "imds on a 404: '$got'"
got="$(guest_ssh 'wget -q -O - http://169.254.169.254/latest/meta-data/instance-id; echo "rc=$?"' 2>&1)" || true
grep -q 'rc=0' <<<"$got" && die "the responder answered a GET without a token"
grep -q 'GET /latest/meta-data/public-keys/0/openssh-key token=valid' "$tmp/imds.log" ||
    die "the key fetch carried no valid token: $(cat "$tmp/imds.log")"
grep -q 'PUT /latest/api/token ttl=300' "$tmp/imds.log" || die "no token request with TTL 300"
log "imds in the guest: token then GET; 404 exits 1; the responder refuses a GET without a token"

# User data: ran once, status on the console, output in the log.
wait_console "$console" '^NITRILE-USER-DATA-RAN' > /dev/null
grep -qx "NITRILE-USER-DATA-RAN $user_data_status" <(tr -d '\r' < "$console") ||
    die "user data status: $(grep NITRILE-USER-DATA-RAN "$console")"
[ "$(grep -c '^NITRILE-USER-DATA-RAN' "$console")" -eq 1 ] || die "the user data ran more than once"
got="$(guest_ssh 'cat /run/user-data.log; stat -c %a /run/user-data.log /run/user-data')" ||
    die "ssh: user data log"
grep -qx "$marker" <<<"$got" || die "the user data's output lacks its marker: $got"
grep -qx 'uid=0 home=/root pwd=/root' <<<"$got" || die "the user data ran elsewhere: $got"
[ "$(tail -n 2 <<<"$got" | tr '\n' ' ')" = "600 700 " ] ||
    die "/run/user-data.log is not 0600 or /run/user-data not 0700: $got"
grep -q 'GET /latest/user-data token=valid' "$tmp/imds.log" || die "the user data fetch carried no valid token"
grep -q "$marker" "$console" && die "the user data's output went to the console"
grep -q '^NITRILE-GUEST-IDLE' "$console" || die "no NITRILE-GUEST-IDLE after the server steps"
log "user data ran once as root in /root, status $user_data_status, output in /run/user-data.log (0600)"

log "the console's markers:"
grep -a '^NITRILE-' "$console" | tr -d '\r' | sed 's/^/    /' >&2
kill "$qemu_pid" 2>/dev/null || true
wait "$qemu_pid" 2>/dev/null || true

# --- No keys and user data that is not a script. ---------------------------
log "booting the guest with a NIC, no SSH keys and user data that is not a script"
rm "$tmp/imds/keys"
printf 'plain text, not a script\n' > "$tmp/imds/user-data"
: > "$tmp/imds.log"
console="$tmp/console-nokeys"
qemu "$console" -netdev tap,id=n0,ifname=tap0,script=no,downscript=no \
    -device "virtio-net-device,netdev=n0,mac=$mac"
wait_console "$console" '^NITRILE-GUEST-IDLE' > /dev/null
tr -d '\r' < "$console" | grep -qx 'NITRILE-SSH-KEYS 0' || die "no 'NITRILE-SSH-KEYS 0' without keys"
grep -q '^NITRILE-SSH-READY' "$console" || die "no NITRILE-SSH-READY without keys"
grep -q '^NITRILE-USER-DATA-RAN' "$console" && die "user data that is not a script ran"
grep -q 'GET /latest/user-data token=valid' "$tmp/imds.log" || die "the user data was not asked for"
hostkey="$(tr -d '\r' < "$console" | sed -n 's/^NITRILE-SSH-HOSTKEY //p' | head -n 1)"
printf '%s %s\n' "$guest" "$hostkey" > "$tmp/known_hosts"
guest_ssh true 2>/dev/null && die "a login got in with no key listed"
kill "$qemu_pid" 2>/dev/null || true
wait "$qemu_pid" 2>/dev/null || true
log "no keys: NITRILE-SSH-KEYS 0, no login; plain user data is not run"

# --- No DHCP server: the failure is said, the boot goes on. ---------------
log "booting the guest with a NIC and no DHCP server"
kill "$udhcpd_pid"
wait "$udhcpd_pid" 2>/dev/null || true
console="$tmp/console-nodhcp"
qemu "$console" -netdev tap,id=n0,ifname=tap0,script=no,downscript=no \
    -device "virtio-net-device,netdev=n0,mac=$mac"
allow_failed=1 wait_console "$console" '^NITRILE-GUEST-IDLE' > /dev/null
tr -d '\r' < "$console" | grep -qx 'NITRILE-NET-FAILED dhcp' || die "no 'NITRILE-NET-FAILED dhcp' without a DHCP server"
grep -qE '^NITRILE-(NET-UP|SSH|USER-DATA)' "$console" && die "steps after a failed DHCP ran"
kill "$qemu_pid" 2>/dev/null || true
wait "$qemu_pid" 2>/dev/null || true
log "no DHCP server: NITRILE-NET-FAILED dhcp, then NITRILE-GUEST-IDLE"

# --- A boot without a NIC: as before, no network step. --------------------
log "booting the guest without a NIC"
console="$tmp/console-nonic"
boot_start=$(now_ms)
qemu "$console"
wait_console "$console" '^NITRILE-GUEST-IDLE' > /dev/null
idle="$(secs $(( $(now_ms) - boot_start )))"
grep -qE '^NITRILE-(NET|SSH|USER-DATA)' "$console" && die "a boot without a NIC ran network steps"
kill "$qemu_pid" 2>/dev/null || true
wait "$qemu_pid" 2>/dev/null || true
log "without a NIC: NITRILE-GUEST-IDLE ${idle}s after QEMU started, no network step"

echo "PASS (NITRILE-SSH-READY ${ready}s after QEMU started, NITRILE-GUEST-IDLE without a NIC ${idle}s, $accel)"
