//! The enrollment exchange: what a host with a TPM and no certificate yet
//! serves on its agent's port (`nitrile hostd --await-enrollment`, which
//! the host image's init runs), and what `nitrile pki enroll-host
//! --address` sends it.
//!
//! Three requests, JSON over plain HTTP/1.1, one per connection:
//!
//! 1. `POST /v1/enrollment/evidence`: the host makes a TLS key in its TPM
//!    bound to the PCR values it holds and answers with its cell, its name
//!    (both from its measured config) and its TPM's keys
//!    ([`nitrile_attest::enroll::HostEvidence`]).
//! 2. `POST /v1/enrollment/proof` with the CA's challenge: the host's TPM
//!    opens the credential, quotes and certifies its keys
//!    ([`nitrile_attest::enroll::HostProof`]).
//! 3. `POST /v1/enrollment/certificates` with the certificates the CA
//!    issued: the host keeps them only if the cell CA it was provisioned
//!    with issued them, to its own principal, for its TPM's keys; it writes
//!    them and the TPM-wrapped key to its state disk and the exchange ends.
//!
//! Nothing in it is secret and nothing is believed unchecked: the
//! credential opens only in the TPM it was made for, every answer of the
//! host is signed by its TPM and checked by the CA against pinned
//! manufacturer CAs and reference values, and every certificate is checked
//! by the host against its pinned cell CA. Plain TCP keeps the exchange
//! from needing the identity it is there to create. Bodies are bounded,
//! each connection has a deadline, and a failed request changes nothing.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use nitrile_api::{PrincipalId, PrincipalKind};
use nitrile_attest::enroll::{Challenge, HostEvidence, HostProof};
use nitrile_attest::{BoundKey, Tpm};
use nitrile_hostd::HostdConfig;
use serde::{Deserialize, Serialize};

/// Step 1.
pub(crate) const EVIDENCE_PATH: &str = "/v1/enrollment/evidence";
/// Step 2.
pub(crate) const PROOF_PATH: &str = "/v1/enrollment/proof";
/// Step 3.
pub(crate) const CERTIFICATES_PATH: &str = "/v1/enrollment/certificates";
/// Largest request or answer head.
const MAX_HEAD: usize = 16 << 10;
/// Largest body.
const MAX_BODY: usize = 256 << 10;
/// How long one connection may take, all of it.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// How long the CA waits for an answer (the TPM's work included).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The host's answer to step 1.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct EvidenceAnswer {
    /// The cell its config names.
    pub(crate) cell: String,
    /// Its name.
    pub(crate) host: String,
    /// Its TPM's keys.
    pub(crate) evidence: HostEvidence,
}

/// Step 3's request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Certificates {
    /// The host certificate (PEM) for the TPM's TLS key.
    pub(crate) certificate: String,
    /// The document key's certificate and the CA certificate (PEM).
    pub(crate) document_certificate: String,
}

/// Step 3's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct EnrolledAnswer {
    /// The principal the host now is.
    pub(crate) enrolled: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct ErrorAnswer {
    error: String,
}

/// Where an enrolled host keeps what enrollment gave it: the paths its
/// config names (`cert`, `[tpm] tls_key`, `[tpm] document_certificate`).
struct Paths {
    tls_key: PathBuf,
    certificate: PathBuf,
    document: PathBuf,
}

impl Paths {
    fn of(config: &HostdConfig) -> Option<anyhow::Result<Self>> {
        let tpm = config.tpm.as_ref()?;
        let tls_key = tpm.tls_key.clone()?;
        Some(match &tpm.document_certificate {
            Some(d) => Ok(Self {
                tls_key,
                certificate: config.cert.clone(),
                document: d.clone(),
            }),
            None => Err(anyhow::anyhow!(
                "[tpm] names a tls_key but no document_certificate: enrollment would have nowhere to put it"
            )),
        })
    }
}

/// Whether the host of `config` waits for enrollment: its config names a
/// TPM key file (`[tpm] tls_key`) that does not exist yet.
pub(crate) fn needs_enrollment(config: &HostdConfig) -> bool {
    config
        .tpm
        .as_ref()
        .and_then(|t| t.tls_key.as_ref())
        .is_some_and(|k| !k.exists())
}

/// The host's side: serves the exchange on the agent's address until a CA
/// delivered certificates that check, then returns (the caller starts the
/// agent). `say` gets a line for each step.
pub(crate) fn serve(config: &HostdConfig, say: &mut dyn FnMut(String)) -> anyhow::Result<()> {
    let paths = Paths::of(config).context("the config names no TPM key to enroll")??;
    let tpm = config.tpm.as_ref().context("no [tpm]")?;
    let ca_pem = nitrile_fs::read_bounded(&config.ca, 1 << 20)
        .with_context(|| format!("cannot read the cell CA {}", config.ca.display()))?;
    let ca = first_certificate(&ca_pem).context("the cell CA")?;
    let listener = TcpListener::bind(config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let principal = PrincipalId::new(
        config.cell.clone(),
        PrincipalKind::Host,
        config.host.clone(),
    );
    say(format!(
        "{} is not enrolled: serving the enrollment exchange on {}",
        principal,
        listener.local_addr().unwrap_or(config.listen)
    ));
    let mut host = HostSide {
        tcti: tpm.tcti.clone(),
        cell: config.cell.to_string(),
        principal,
        ca,
        paths,
        tls: None,
    };
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(a) => a,
            Err(e) => {
                say(format!("accept failed: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        match host.connection(stream) {
            Ok(Step::Continue(what)) => say(format!("{peer}: {what}")),
            Ok(Step::Enrolled) => {
                say(format!(
                    "{peer}: certificates checked and written; enrolled as {}",
                    host.principal
                ));
                return Ok(());
            }
            Err(e) => say(format!(
                "{peer}: refused: {}",
                crate::output::escape(&format!("{e:#}"))
            )),
        }
    }
}

enum Step {
    Continue(&'static str),
    Enrolled,
}

struct HostSide {
    tcti: String,
    cell: String,
    principal: PrincipalId,
    ca: Vec<u8>,
    paths: Paths,
    /// The TLS key made for the evidence last sent.
    tls: Option<BoundKey>,
}

impl HostSide {
    fn connection(&mut self, mut stream: TcpStream) -> anyhow::Result<Step> {
        let deadline = Instant::now() + CONNECTION_DEADLINE;
        let (method, path, body) = read_request(&mut stream, deadline)?;
        let answer = if method == "POST" {
            self.handle(&path, &body)
        } else {
            Err((405, format!("{method} is not served; use POST")))
        };
        match answer {
            Ok((json, step)) => {
                write_answer(&mut stream, 200, &json)?;
                Ok(step)
            }
            Err((status, reason)) => {
                let json = serde_json::to_vec(&ErrorAnswer {
                    error: reason.clone(),
                })?;
                let _ = write_answer(&mut stream, status, &json);
                bail!("{path}: {reason}")
            }
        }
    }

    fn tpm(&self) -> Result<Tpm, (u16, String)> {
        Tpm::open(&self.tcti).map_err(|e| (500, format!("the TPM: {e}")))
    }

    fn handle(&mut self, path: &str, body: &[u8]) -> Result<(Vec<u8>, Step), (u16, String)> {
        match path {
            EVIDENCE_PATH => {
                let mut tpm = self.tpm()?;
                let (evidence, tls) = nitrile_attest::enroll::host_evidence(&mut tpm)
                    .map_err(|e| (500, format!("the TPM: {e}")))?;
                self.tls = Some(tls);
                let answer = EvidenceAnswer {
                    cell: self.cell.clone(),
                    host: self.principal.name.to_string(),
                    evidence,
                };
                Ok((json(&answer)?, Step::Continue("evidence sent")))
            }
            PROOF_PATH => {
                let tls = self
                    .tls
                    .as_ref()
                    .ok_or((409, "ask for the evidence first".to_owned()))?;
                let challenge: Challenge = serde_json::from_slice(body)
                    .map_err(|e| (400, format!("not a challenge: {e}")))?;
                let mut tpm = self.tpm()?;
                let proof: HostProof =
                    nitrile_attest::enroll::host_proof(&mut tpm, tls, &challenge)
                        .map_err(|e| (400, format!("the TPM: {e}")))?;
                Ok((json(&proof)?, Step::Continue("proof sent")))
            }
            CERTIFICATES_PATH => {
                let certs: Certificates = serde_json::from_slice(body)
                    .map_err(|e| (400, format!("not certificates: {e}")))?;
                self.keep(&certs).map_err(|e| (400, format!("{e:#}")))?;
                let answer = EnrolledAnswer {
                    enrolled: self.principal.to_string(),
                };
                Ok((json(&answer)?, Step::Enrolled))
            }
            _ => Err((404, "no such step".to_owned())),
        }
    }

    /// Checks the delivered certificates and writes them with the TPM key:
    /// the key file last, as it is what marks the host enrolled.
    fn keep(&mut self, certs: &Certificates) -> anyhow::Result<()> {
        let tls = self
            .tls
            .clone()
            .context("ask for the evidence first: there is no key to certify")?;
        let host_der =
            first_certificate(certs.certificate.as_bytes()).context("the certificate")?;
        let doc_der = first_certificate(certs.document_certificate.as_bytes())
            .context("the document certificate")?;
        for (what, der) in [
            ("certificate", &host_der),
            ("document certificate", &doc_der),
        ] {
            let named = nitrile_pki::PeerIdentity::from_der(der, &self.principal.cell)
                .with_context(|| format!("the {what}"))?;
            if named.principal != self.principal {
                bail!("the {what} names {}, not this host", named.principal);
            }
        }
        let tls_point = nitrile_attest::enroll::tls_point(&tls.public)
            .map_err(|e| anyhow::anyhow!("the TLS key: {e}"))?;
        nitrile_attest::enroll::check_issued(&host_der, &self.ca, &tls_point)
            .map_err(|e| anyhow::anyhow!("the certificate: {e}"))?;
        let document_point = Tpm::open(&self.tcti)?.document_key()?.document_point()?;
        nitrile_attest::enroll::check_issued(&doc_der, &self.ca, &document_point)
            .map_err(|e| anyhow::anyhow!("the document certificate: {e}"))?;
        for p in [
            &self.paths.certificate,
            &self.paths.document,
            &self.paths.tls_key,
        ] {
            if let Some(dir) = p.parent() {
                make_private_dir(dir)?;
            }
        }
        let write = |p: &Path, bytes: &[u8], mode: u32| {
            nitrile_fs::write_atomic(p, bytes, mode)
                .with_context(|| format!("cannot write {}", p.display()))
        };
        write(&self.paths.certificate, certs.certificate.as_bytes(), 0o644)?;
        write(
            &self.paths.document,
            certs.document_certificate.as_bytes(),
            0o644,
        )?;
        write(
            &self.paths.tls_key,
            &serde_json::to_vec_pretty(&tls)?,
            0o600,
        )?;
        Ok(())
    }
}

fn make_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot make {}", dir.display()))
}

/// The first PEM certificate of `pem`, as DER.
fn first_certificate(pem: &[u8]) -> anyhow::Result<Vec<u8>> {
    use rustls_pki_types::pem::PemObject as _;
    Ok(rustls_pki_types::CertificateDer::pem_slice_iter(pem)
        .next()
        .context("no PEM certificate")?
        .context("not PEM")?
        .as_ref()
        .to_vec())
}

/// An answer as JSON bytes.
fn json<T: Serialize>(value: &T) -> Result<Vec<u8>, (u16, String)> {
    serde_json::to_vec(value).map_err(|e| (500, e.to_string()))
}

fn set_deadline(stream: &TcpStream, deadline: Instant) -> std::io::Result<()> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream.set_read_timeout(Some(left))?;
    stream.set_write_timeout(Some(left))
}

/// Reads a head (at most [`MAX_HEAD`]) and the body it announces (at most
/// [`MAX_BODY`]); returns the head's length and the bytes read.
fn read_message(stream: &mut TcpStream, deadline: Instant) -> anyhow::Result<(usize, Vec<u8>)> {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let head_len = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            bail!("a head longer than {MAX_HEAD} bytes");
        }
        set_deadline(stream, deadline)?;
        let n = stream.read(&mut chunk).context("reading")?;
        if n == 0 {
            bail!("the connection closed before the head ended");
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    Ok((head_len, buf))
}

fn content_length(headers: &[httparse::Header<'_>]) -> anyhow::Result<usize> {
    let mut length = 0usize;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .context("a bad Content-Length")?;
        }
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("no transfer encoding is accepted");
        }
    }
    if length > MAX_BODY {
        bail!("a body of {length} bytes (at most {MAX_BODY})");
    }
    Ok(length)
}

fn read_body(
    stream: &mut TcpStream,
    mut buf: Vec<u8>,
    head_len: usize,
    length: usize,
    deadline: Instant,
) -> anyhow::Result<Vec<u8>> {
    let mut chunk = [0u8; 4096];
    while buf.len() < head_len + length {
        set_deadline(stream, deadline)?;
        let n = stream.read(&mut chunk).context("reading")?;
        if n == 0 {
            bail!("the connection closed before the body ended");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if buf.len() > head_len + length {
        bail!("more bytes than the body announced");
    }
    Ok(buf.split_off(head_len))
}

fn read_request(
    stream: &mut TcpStream,
    deadline: Instant,
) -> anyhow::Result<(String, String, Vec<u8>)> {
    let (head_len, buf) = read_message(stream, deadline)?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&buf[..head_len]).context("not an HTTP request")? {
        httparse::Status::Complete(_) => {}
        httparse::Status::Partial => bail!("an incomplete request head"),
    }
    let method = req.method.unwrap_or_default().to_owned();
    let path = req.path.unwrap_or_default().to_owned();
    let length = content_length(req.headers)?;
    let body = read_body(stream, buf, head_len, length, deadline)?;
    Ok((method, path, body))
}

fn write_answer(stream: &mut TcpStream, status: u16, json: &[u8]) -> anyhow::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        _ => "Internal Server Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        json.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(json)?;
    stream.flush()?;
    Ok(())
}

/// The CA's side: one step of the exchange with the host at `addr`.
pub(crate) fn call<T: serde::de::DeserializeOwned>(
    addr: SocketAddr,
    path: &str,
    body: &impl Serialize,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + CALL_TIMEOUT;
    let body = serde_json::to_vec(body)?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("cannot connect to {addr}"))?;
    set_deadline(&stream, deadline)?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(&body)?;
    stream.flush()?;
    let (head_len, buf) = read_message(&mut stream, deadline)?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut answer = httparse::Response::new(&mut headers);
    match answer
        .parse(&buf[..head_len])
        .context("the host's answer is not HTTP")?
    {
        httparse::Status::Complete(_) => {}
        httparse::Status::Partial => bail!("an incomplete answer head"),
    }
    let status = answer.code.unwrap_or_default();
    let length = content_length(answer.headers)?;
    let body = read_body(&mut stream, buf, head_len, length, deadline)?;
    if status != 200 {
        let reason = serde_json::from_slice::<ErrorAnswer>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        bail!(
            "the host refused {path} ({status}): {}",
            crate::output::escape(&reason)
        );
    }
    serde_json::from_slice(&body).with_context(|| format!("the host's answer to {path}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_and_chunked_bodies_are_refused() {
        let h = |name: &'static str, value: &'static [u8]| httparse::Header { name, value };
        assert_eq!(content_length(&[h("Content-Length", b"12")]).unwrap(), 12);
        assert!(content_length(&[h("content-length", b"999999999")]).is_err());
        assert!(content_length(&[h("content-length", b"-1")]).is_err());
        assert!(content_length(&[h("transfer-encoding", b"chunked")]).is_err());
    }
}
