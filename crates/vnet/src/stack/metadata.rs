//! The instance metadata service: HTTP/1.1 on `169.254.169.254:80`, with
//! IMDSv2-like session tokens.
//!
//! - `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds: N`
//!   (1..=[`MAX_TOKEN_TTL_SECONDS`]) answers a fresh token (256 random bits,
//!   base64url) live for N seconds; a missing or out-of-range TTL is 400, a
//!   request carrying `X-Forwarded-For` is 403.
//! - every `GET` must carry `X-aws-ec2-metadata-token` with a live token
//!   (else 401), then serves the instance's id, IPv4 address, MAC, SSH keys,
//!   user data, identity document (verbatim) or a directory listing; any
//!   other path is 404, any other method 405.
//!
//! One request per connection (`Connection: close`); the head is at most
//! [`MAX_REQUEST_HEAD`] bytes (more: 431) and [`MAX_REQUEST_HEADERS`]
//! headers; every segment leaves with IP TTL 1.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand_core::{OsRng, RngCore};
use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp::{Socket, SocketBuffer, State};
use smoltcp::wire::IpListenEndpoint;
use subtle::ConstantTimeEq;

use super::{
    InstanceMetadata, MAX_METADATA_CONNECTIONS, METADATA_ADDR, METADATA_CONNECTION_DEADLINE,
    METADATA_PORT, StackCounters,
};

/// The longest request head (request line and headers) read; longer: 431.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// The most headers a request may carry; more: 431.
pub const MAX_REQUEST_HEADERS: usize = 32;
/// Session tokens kept per instance; a new one evicts the oldest.
pub const MAX_SESSIONS: usize = 64;
/// The longest life of a session token, in seconds (six hours, as IMDSv2).
pub const MAX_TOKEN_TTL_SECONDS: u32 = 21_600;

const TOKEN_PATH: &str = "/latest/api/token";
const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// Random bytes in a session token.
const TOKEN_BYTES: usize = 32;
/// The socket buffers of a metadata connection; requests and answers
/// larger than these pass through in pieces.
const SOCKET_BUFFER: usize = 4096;

/// The live session tokens of one instance.
#[derive(Debug, Default)]
pub(super) struct Sessions {
    /// Oldest first.
    tokens: VecDeque<Session>,
}

#[derive(Debug)]
struct Session {
    token: [u8; TOKEN_BYTES],
    expires: Instant,
}

impl Sessions {
    /// A new token live until `now + ttl`; None when no randomness could
    /// be had.
    fn issue(&mut self, now: Instant, ttl: Duration) -> Option<String> {
        let expires = now.checked_add(ttl)?;
        let mut token = [0u8; TOKEN_BYTES];
        OsRng.try_fill_bytes(&mut token).ok()?;
        self.tokens.retain(|s| s.expires > now);
        while self.tokens.len() >= MAX_SESSIONS {
            self.tokens.pop_front();
        }
        self.tokens.push_back(Session { token, expires });
        Some(URL_SAFE_NO_PAD.encode(token))
    }

    /// Whether `presented` is a token issued here and live at `now`.
    fn check(&self, now: Instant, presented: &[u8]) -> bool {
        let mut token = [0u8; TOKEN_BYTES];
        match URL_SAFE_NO_PAD.decode_slice(presented, &mut token) {
            Ok(TOKEN_BYTES) => {}
            _ => return false,
        }
        let mut found = false;
        for s in &self.tokens {
            found |= bool::from(s.token.ct_eq(&token)) && s.expires > now;
        }
        found
    }

    pub(super) fn live(&self, now: Instant) -> usize {
        self.tokens.iter().filter(|s| s.expires > now).count()
    }
}

/// An answer: status, content type, body, and the TTL header of a token.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Response {
    status: u16,
    body: Vec<u8>,
    content_type: &'static str,
    token_ttl: Option<u32>,
    allow: Option<&'static str>,
}

impl Response {
    fn text(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status,
            body: body.into(),
            content_type: "text/plain",
            token_ttl: None,
            allow: None,
        }
    }

    fn error(status: u16) -> Self {
        let mut body = reason(status).as_bytes().to_vec();
        body.push(b'\n');
        Response::text(status, body)
    }

    fn method_not_allowed(allow: &'static str) -> Self {
        Response {
            allow: Some(allow),
            ..Response::error(405)
        }
    }

    /// The answer as sent: status line, headers, body.
    fn to_bytes(&self) -> Vec<u8> {
        let mut head = String::with_capacity(160);
        // Writing to a String cannot fail.
        let _ = write!(
            head,
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\nServer: nitrile-imds\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        if let Some(ttl) = self.token_ttl {
            let _ = write!(head, "X-aws-ec2-metadata-token-ttl-seconds: {ttl}\r\n");
        }
        if let Some(allow) = self.allow {
            let _ = write!(head, "Allow: {allow}\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    }
}

/// What reading a request head gave.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Head {
    /// More bytes needed.
    Partial,
    /// A complete head, answered.
    Answer(Response),
}

/// Parses a request head and answers it. Never panics on any bytes.
pub(super) fn answer(
    head: &[u8],
    now: Instant,
    sessions: &mut Sessions,
    meta: &InstanceMetadata,
) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; MAX_REQUEST_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let parsed = match req.parse(head) {
        Ok(httparse::Status::Partial) if head.len() > MAX_REQUEST_HEAD => {
            return Head::Answer(Response::error(431));
        }
        Ok(httparse::Status::Partial) => return Head::Partial,
        Ok(httparse::Status::Complete(len)) => len,
        Err(httparse::Error::TooManyHeaders) => return Head::Answer(Response::error(431)),
        Err(_) => return Head::Answer(Response::error(400)),
    };
    if parsed > MAX_REQUEST_HEAD {
        return Head::Answer(Response::error(431));
    }
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return Head::Answer(Response::error(400));
    };
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };

    if path == TOKEN_PATH {
        if method != "PUT" {
            return Head::Answer(Response::method_not_allowed("PUT"));
        }
        if header("x-forwarded-for").is_some() {
            return Head::Answer(Response::error(403));
        }
        let Some(ttl) = header(TTL_HEADER).and_then(parse_ttl) else {
            return Head::Answer(Response::error(400));
        };
        return Head::Answer(
            match sessions.issue(now, Duration::from_secs(u64::from(ttl))) {
                Some(token) => Response {
                    token_ttl: Some(ttl),
                    ..Response::text(200, token)
                },
                None => Response::error(500),
            },
        );
    }
    if method != "GET" {
        return Head::Answer(Response::method_not_allowed("GET"));
    }
    if !header(TOKEN_HEADER).is_some_and(|t| sessions.check(now, t)) {
        return Head::Answer(Response::error(401));
    }
    Head::Answer(serve(path, meta))
}

/// A TTL header's value: decimal digits only, 1..=MAX_TOKEN_TTL_SECONDS.
fn parse_ttl(value: &[u8]) -> Option<u32> {
    if value.is_empty() || value.len() > 5 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let ttl = value.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0'));
    (1..=MAX_TOKEN_TTL_SECONDS).contains(&ttl).then_some(ttl)
}

/// The answer to an authorised GET of `path`.
fn serve(path: &str, meta: &InstanceMetadata) -> Response {
    let ok = |body: Vec<u8>| Response::text(200, body);
    let has_keys = !meta.ssh_public_keys.is_empty();
    match path {
        "/latest" | "/latest/" => {
            let mut list = String::from("dynamic/\nmeta-data/");
            if !meta.user_data.is_empty() {
                list.push_str("\nuser-data");
            }
            ok(list.into_bytes())
        }
        "/latest/meta-data" | "/latest/meta-data/" => {
            let mut list = String::from("instance-id\nlocal-ipv4\nmac");
            if has_keys {
                list.push_str("\npublic-keys/");
            }
            ok(list.into_bytes())
        }
        "/latest/meta-data/instance-id" => ok(meta.instance_id.clone().into_bytes()),
        "/latest/meta-data/local-ipv4" => ok(meta.local_ipv4.to_string().into_bytes()),
        "/latest/meta-data/mac" => {
            let m = meta.mac;
            ok(format!(
                "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                m[0], m[1], m[2], m[3], m[4], m[5]
            )
            .into_bytes())
        }
        "/latest/meta-data/public-keys" | "/latest/meta-data/public-keys/" if has_keys => {
            ok(b"0=instance-keys".to_vec())
        }
        "/latest/meta-data/public-keys/0" | "/latest/meta-data/public-keys/0/" if has_keys => {
            ok(b"openssh-key".to_vec())
        }
        "/latest/meta-data/public-keys/0/openssh-key" if has_keys => {
            let mut keys = meta.ssh_public_keys.join("\n");
            keys.push('\n');
            ok(keys.into_bytes())
        }
        "/latest/user-data" if !meta.user_data.is_empty() => Response {
            content_type: "application/octet-stream",
            ..ok(meta.user_data.clone())
        },
        "/latest/dynamic" | "/latest/dynamic/" => ok(b"instance-identity/".to_vec()),
        "/latest/dynamic/instance-identity" | "/latest/dynamic/instance-identity/" => {
            ok(b"document".to_vec())
        }
        "/latest/dynamic/instance-identity/document" if !meta.identity_document.is_empty() => {
            ok(meta.identity_document.clone())
        }
        _ => Response::error(404),
    }
}

/// The listening sockets of the service and their connections.
#[derive(Debug)]
pub(super) struct MetadataService {
    slots: Vec<Slot>,
}

#[derive(Debug)]
struct Slot {
    handle: SocketHandle,
    /// When the connection was first seen accepted.
    accepted: Option<Instant>,
    head: Vec<u8>,
    /// The answer being sent, and how much of it has been.
    response: Option<(Vec<u8>, usize)>,
}

impl Slot {
    fn reset(&mut self) {
        self.accepted = None;
        self.head = Vec::new();
        self.response = None;
    }

    /// Listens again on a closed socket. Called a round after the service
    /// closed or reset it, so a reset it owed has been sent; listening on
    /// a closed socket with a nonzero port cannot fail.
    fn rearm(&mut self, socket: &mut Socket<'_>) {
        self.reset();
        let _ = socket.listen(IpListenEndpoint {
            addr: Some(METADATA_ADDR.into()),
            port: METADATA_PORT,
        });
    }
}

impl MetadataService {
    pub(super) fn new(sockets: &mut SocketSet<'static>) -> Self {
        let slots = (0..MAX_METADATA_CONNECTIONS)
            .map(|_| {
                let mut socket = Socket::new(
                    SocketBuffer::new(vec![0; SOCKET_BUFFER]),
                    SocketBuffer::new(vec![0; SOCKET_BUFFER]),
                );
                // A hop limit like IMDSv2's: nothing the service sends
                // survives being routed on by the guest.
                socket.set_hop_limit(Some(1));
                Slot {
                    handle: sockets.add(socket),
                    accepted: None,
                    head: Vec::new(),
                    response: None,
                }
            })
            .collect();
        MetadataService { slots }
    }

    /// Connections accepted and not yet re-armed.
    pub(super) fn active(&self, sockets: &SocketSet<'static>) -> usize {
        self.slots
            .iter()
            .filter(|s| {
                !matches!(
                    sockets.get::<Socket>(s.handle).state(),
                    State::Listen | State::Closed
                )
            })
            .count()
    }

    /// When connections must be reset if still open.
    pub(super) fn deadlines(&self) -> impl Iterator<Item = Instant> + '_ {
        self.slots
            .iter()
            .filter_map(|s| s.accepted?.checked_add(METADATA_CONNECTION_DEADLINE))
    }

    /// Re-arms the sockets closed in an earlier round, before smoltcp
    /// takes new frames (a SYN must find them listening).
    pub(super) fn rearm(&mut self, sockets: &mut SocketSet<'static>) {
        for slot in &mut self.slots {
            let socket = sockets.get_mut::<Socket>(slot.handle);
            if socket.state() == State::Closed {
                slot.rearm(socket);
            }
        }
    }

    /// Reads requests, answers them, closes and re-arms sockets.
    pub(super) fn run(
        &mut self,
        now: Instant,
        sockets: &mut SocketSet<'static>,
        sessions: &mut Sessions,
        meta: &InstanceMetadata,
        counters: &mut StackCounters,
    ) {
        for slot in &mut self.slots {
            let socket = sockets.get_mut::<Socket>(slot.handle);
            match socket.state() {
                State::Closed => {
                    slot.rearm(socket);
                    continue;
                }
                State::Listen => continue,
                // Not yet established: nothing to read, and not a close.
                State::SynReceived => {
                    slot.accepted.get_or_insert(now);
                    continue;
                }
                // The answer went out and both sides closed: free the slot
                // now rather than after TIME-WAIT's ten seconds.
                State::TimeWait => {
                    socket.abort();
                    slot.reset();
                    continue;
                }
                _ => {}
            }
            let accepted = *slot.accepted.get_or_insert(now);
            if now.saturating_duration_since(accepted) >= METADATA_CONNECTION_DEADLINE {
                socket.abort();
                slot.reset();
                counters.metadata_timeouts += 1;
                continue;
            }

            if slot.response.is_none() {
                read_head(socket, &mut slot.head);
                match answer(&slot.head, now, sessions, meta) {
                    Head::Partial if socket.may_recv() => {}
                    // The client closed before finishing its head.
                    Head::Partial => socket.close(),
                    Head::Answer(response) => {
                        counters.metadata_requests += 1;
                        if response.status >= 400 {
                            counters.metadata_refused += 1;
                        }
                        slot.head = Vec::new();
                        slot.response = Some((response.to_bytes(), 0));
                    }
                }
            }
            if let Some((bytes, sent)) = &mut slot.response {
                if *sent < bytes.len()
                    && let Ok(n) = socket.send_slice(&bytes[*sent..])
                {
                    *sent += n;
                }
                if *sent == bytes.len() {
                    socket.close();
                }
                // Whatever else the client sends is not read as a request.
                while socket.can_recv() {
                    if socket.recv(|b| (b.len(), ())).is_err() {
                        break;
                    }
                }
            }
        }
    }
}

/// Moves received bytes into `head`, up to one byte past the limit.
fn read_head(socket: &mut Socket<'_>, head: &mut Vec<u8>) {
    while socket.can_recv() && head.len() <= MAX_REQUEST_HEAD {
        let room = MAX_REQUEST_HEAD + 1 - head.len();
        let taken = socket.recv(|b| {
            let n = b.len().min(room);
            head.extend_from_slice(&b[..n]);
            (n, n)
        });
        if !matches!(taken, Ok(n) if n > 0) {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn meta() -> InstanceMetadata {
        InstanceMetadata {
            instance_id: "i-0123".into(),
            local_ipv4: Ipv4Addr::new(10, 0, 0, 2),
            mac: [0x02, 0xab, 0, 0, 0, 2],
            ssh_public_keys: vec!["ssh-ed25519 AAAA a".into(), "ssh-ed25519 BBBB b".into()],
            user_data: b"#!/bin/sh\necho hi\n".to_vec(),
            identity_document: b"{\"doc\":1}".to_vec(),
        }
    }

    fn ask(head: &str, now: Instant, sessions: &mut Sessions) -> Response {
        match answer(head.as_bytes(), now, sessions, &meta()) {
            Head::Answer(r) => r,
            Head::Partial => panic!("partial: {head:?}"),
        }
    }

    fn token(now: Instant, sessions: &mut Sessions, ttl: u32) -> String {
        let r = ask(
            &format!("PUT /latest/api/token HTTP/1.1\r\n{TTL_HEADER}: {ttl}\r\n\r\n"),
            now,
            sessions,
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.token_ttl, Some(ttl));
        String::from_utf8(r.body).expect("utf-8")
    }

    fn get(path: &str, token: &str, now: Instant, sessions: &mut Sessions) -> Response {
        ask(
            &format!("GET {path} HTTP/1.1\r\nX-aws-ec2-metadata-token: {token}\r\n\r\n"),
            now,
            sessions,
        )
    }

    #[test]
    fn tokens_are_random_and_live_for_their_ttl() {
        let now = Instant::now();
        let mut s = Sessions::default();
        let a = token(now, &mut s, 60);
        let b = token(now, &mut s, 60);
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_eq!(
            get("/latest/meta-data/instance-id", &a, now, &mut s).status,
            200
        );
        let later = now + Duration::from_secs(59);
        assert_eq!(
            get("/latest/meta-data/instance-id", &a, later, &mut s).status,
            200
        );
        let expired = now + Duration::from_secs(60);
        assert_eq!(
            get("/latest/meta-data/instance-id", &a, expired, &mut s).status,
            401
        );
    }

    #[test]
    fn a_token_one_character_off_is_refused() {
        let now = Instant::now();
        let mut s = Sessions::default();
        let t = token(now, &mut s, 60);
        let mut changed = t.clone().into_bytes();
        changed[10] = if changed[10] == b'A' { b'B' } else { b'A' };
        let changed = String::from_utf8(changed).expect("utf-8");
        assert_eq!(
            get("/latest/meta-data/mac", &changed, now, &mut s).status,
            401
        );
        assert_eq!(
            get("/latest/meta-data/mac", &t[..42], now, &mut s).status,
            401
        );
        assert_eq!(get("/latest/meta-data/mac", "", now, &mut s).status, 401);
    }

    #[test]
    fn the_oldest_session_is_evicted_beyond_the_cap() {
        let now = Instant::now();
        let mut s = Sessions::default();
        let first = token(now, &mut s, 600);
        for _ in 0..MAX_SESSIONS {
            token(now, &mut s, 600);
        }
        assert_eq!(s.live(now), MAX_SESSIONS);
        assert_eq!(
            get("/latest/meta-data/mac", &first, now, &mut s).status,
            401
        );
    }

    #[test]
    fn ttl_must_be_in_range_and_decimal() {
        let now = Instant::now();
        let mut s = Sessions::default();
        for bad in ["0", "21601", "-1", "1e3", "", "5 5", "99999999999", "0x10"] {
            let r = ask(
                &format!("PUT /latest/api/token HTTP/1.1\r\n{TTL_HEADER}: {bad}\r\n\r\n"),
                now,
                &mut s,
            );
            assert_eq!(r.status, 400, "ttl {bad:?}");
        }
        let missing = ask("PUT /latest/api/token HTTP/1.1\r\n\r\n", now, &mut s);
        assert_eq!(missing.status, 400);
        token(now, &mut s, 1);
        token(now, &mut s, 21_600);
        assert_eq!(s.live(now), 2);
    }

    #[test]
    fn a_forwarded_token_request_is_refused() {
        let now = Instant::now();
        let mut s = Sessions::default();
        let r = ask(
            &format!(
                "PUT /latest/api/token HTTP/1.1\r\n{TTL_HEADER}: 60\r\nX-Forwarded-For: 10.0.0.9\r\n\r\n"
            ),
            now,
            &mut s,
        );
        assert_eq!(r.status, 403);
        assert_eq!(s.live(now), 0);
    }

    #[test]
    fn paths_methods_and_listings() {
        let now = Instant::now();
        let mut s = Sessions::default();
        let t = token(now, &mut s, 60);
        let body = |p: &str, s: &mut Sessions| {
            let r = get(p, &t, now, s);
            assert_eq!(r.status, 200, "{p}");
            String::from_utf8(r.body).expect("utf-8")
        };
        assert_eq!(body("/latest/meta-data/instance-id", &mut s), "i-0123");
        assert_eq!(body("/latest/meta-data/local-ipv4", &mut s), "10.0.0.2");
        assert_eq!(body("/latest/meta-data/mac", &mut s), "02:ab:00:00:00:02");
        assert_eq!(
            body("/latest/meta-data/public-keys/0/openssh-key", &mut s),
            "ssh-ed25519 AAAA a\nssh-ed25519 BBBB b\n"
        );
        assert_eq!(
            body("/latest/meta-data/", &mut s),
            "instance-id\nlocal-ipv4\nmac\npublic-keys/"
        );
        assert_eq!(body("/latest/user-data", &mut s), "#!/bin/sh\necho hi\n");
        assert_eq!(
            body("/latest/dynamic/instance-identity/document", &mut s),
            "{\"doc\":1}"
        );
        assert_eq!(get("/latest/meta-data/nope", &t, now, &mut s).status, 404);
        assert_eq!(get("/../etc/passwd", &t, now, &mut s).status, 404);
        let post = ask("POST /latest/meta-data/ HTTP/1.1\r\n\r\n", now, &mut s);
        assert_eq!((post.status, post.allow), (405, Some("GET")));
        let get_token = ask("GET /latest/api/token HTTP/1.1\r\n\r\n", now, &mut s);
        assert_eq!((get_token.status, get_token.allow), (405, Some("PUT")));
    }

    #[test]
    fn empty_user_data_and_keys_are_not_found() {
        let now = Instant::now();
        let mut s = Sessions::default();
        let t = token(now, &mut s, 60);
        let empty = InstanceMetadata {
            ssh_public_keys: vec![],
            user_data: vec![],
            ..meta()
        };
        let head = |p: &str| format!("GET {p} HTTP/1.1\r\n{TOKEN_HEADER}: {t}\r\n\r\n");
        for p in [
            "/latest/user-data",
            "/latest/meta-data/public-keys/0/openssh-key",
        ] {
            match answer(head(p).as_bytes(), now, &mut s, &empty) {
                Head::Answer(r) => assert_eq!(r.status, 404, "{p}"),
                Head::Partial => panic!("partial"),
            }
        }
    }

    #[test]
    fn heads_too_long_or_with_too_many_headers_are_431() {
        let now = Instant::now();
        let mut s = Sessions::default();
        let mut long = String::from("GET /latest/meta-data/ HTTP/1.1\r\nX-Pad: ");
        long.push_str(&"a".repeat(MAX_REQUEST_HEAD));
        assert_eq!(
            answer(long.as_bytes(), now, &mut s, &meta()),
            Head::Answer(Response::error(431))
        );
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_REQUEST_HEADERS {
            many.push_str(&format!("X-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(ask(&many, now, &mut s).status, 431);
        assert_eq!(answer(b"GET /latest/", now, &mut s, &meta()), Head::Partial);
        assert_eq!(ask("\x00\x01 garbage\r\n\r\n", now, &mut s).status, 400);
    }

    #[test]
    fn answers_carry_length_and_close() {
        let bytes = Response::text(200, "abc").to_bytes();
        let text = String::from_utf8(bytes).expect("utf-8");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Length: 3\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\nabc"));
    }

    proptest::proptest! {
        #[test]
        fn any_head_gets_an_answer_or_waits_without_panicking(
            head in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)
        ) {
            let mut s = Sessions::default();
            let _ = answer(&head, Instant::now(), &mut s, &meta());
        }

        #[test]
        fn any_ttl_value_parses_only_in_range(value in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..12)) {
            if let Some(ttl) = parse_ttl(&value) {
                proptest::prop_assert!((1..=MAX_TOKEN_TTL_SECONDS).contains(&ttl));
                let text = std::str::from_utf8(&value).expect("digits");
                proptest::prop_assert_eq!(text.parse::<u32>().ok(), Some(ttl));
            }
        }
    }
}
