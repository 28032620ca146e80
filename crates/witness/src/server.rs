//! The witness service on its mTLS port: `POST /add-checkpoint` per
//! c2sp.org/tlog-witness and `GET /<origin hash>/checkpoint` (the latest
//! cosigned checkpoint of a log, for monitors).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use nitrile_api::{Name, PrincipalId};
use nitrile_gate::{Expected, IdentityError, Listeners, ServiceIdentity};
use nitrile_net::{Handler, PeerIdentity, Server};
use nitrile_tlog::{KeyKind, NoteError, NoteSigner, NoteVerifier};
use nitrile_witness_api::{AddCheckpoint, SIZE_CONTENT_TYPE, SPLIT_VIEW_HEADER};
use tokio::net::TcpListener;
use zeroize::Zeroizing;

use crate::config::WitnessConfig;
use crate::state::origin_hash;
use crate::witness::{AddError, OpenError, Witness};

/// Largest cosigning key file read.
pub const MAX_KEY_FILE: u64 = 1024;

/// Why the witness service could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The CA, certificate or key could not be loaded, or make no TLS
    /// configuration.
    #[error("service identity")]
    Identity(#[source] IdentityError),
    /// The certificate is not the one of this witness's principal.
    #[error("the certificate {} is not for {expected}", path.display())]
    WrongCertificate {
        /// The certificate file.
        path: PathBuf,
        /// The principal the configuration names.
        expected: PrincipalId,
        /// What is wrong with it.
        #[source]
        source: Box<IdentityError>,
    },
    /// The cosigning key file could not be read, or others may read it.
    #[error("cosigning key file {}", path.display())]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The cosigning key file does not hold a cosigner skey.
    #[error("cosigning key file {}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: NoteError,
    },
    /// A configured log vkey is invalid.
    #[error("log {origin:?}: invalid vkey")]
    LogKey {
        /// The origin.
        origin: String,
        /// Why.
        #[source]
        source: nitrile_tlog::NoteError,
    },
    /// The witness state could not be opened.
    #[error("witness")]
    Open(#[from] OpenError),
    /// The socket could not be bound or served.
    #[error("network")]
    Net(#[from] nitrile_net::NetError),
}

/// Reads a cosigner skey file, refusing one that group or others can access.
pub fn load_signing_key(path: &Path) -> Result<NoteSigner, ServiceError> {
    let io = |source| ServiceError::KeyFile {
        path: path.to_owned(),
        source,
    };
    let mode = std::fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("mode {mode:o} lets others read the key; chmod 600 it"),
        )));
    }
    let text = nitrile_fs::read_secret_to_string(path, MAX_KEY_FILE).map_err(|e| io(e.into()))?;
    let key = NoteSigner::from_skey(text.trim_end()).map_err(|source| ServiceError::Key {
        path: path.to_owned(),
        source,
    })?;
    if key.kind() != KeyKind::CosignatureV1 {
        return Err(ServiceError::Key {
            path: path.to_owned(),
            source: NoteError::WrongKeyKind {
                expected: KeyKind::CosignatureV1,
                found: key.kind(),
            },
        });
    }
    Ok(key)
}

/// Writes a cosigner skey file: mode 0600, atomically (temporary file,
/// fsync, rename, fsync of the directory). Refuses to replace a file.
pub fn write_signing_key(path: &Path, key: &NoteSigner) -> Result<(), ServiceError> {
    let io = |source| ServiceError::KeyFile {
        path: path.to_owned(),
        source,
    };
    if path.try_exists().map_err(io)? {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "a key file is already there; not replacing it",
        )));
    }
    let mut text = Zeroizing::new(key.to_skey().to_string());
    text.push('\n');
    nitrile_fs::write_atomic(path, text.as_bytes(), 0o600).map_err(|e| io(e.into()))
}

/// The witness with its socket bound, ready to serve.
#[derive(Debug)]
pub struct WitnessService {
    witness: Arc<Witness>,
    server: Server,
    listener: TcpListener,
}

impl WitnessService {
    /// Loads everything named by `config` and binds the socket; fails closed
    /// on any problem (a key readable by others, a certificate of another
    /// principal, a corrupt state file, an invalid log key).
    pub async fn open(config: &WitnessConfig) -> Result<Self, ServiceError> {
        let key = load_signing_key(&config.signing_key_path())?;
        let mut logs = Vec::with_capacity(config.logs.len());
        for log in &config.logs {
            let v = NoteVerifier::from_vkey(&log.vkey).map_err(|source| ServiceError::LogKey {
                origin: log.origin.clone(),
                source,
            })?;
            logs.push((log.origin.clone(), v));
        }
        let witness = Witness::open(&config.state, key, logs)?;
        let expected = config.principal();
        let identity = ServiceIdentity::load(
            &config.cell,
            &config.ca,
            &config.cert,
            &config.key,
            &Expected::Principal(expected.clone()),
        )
        .map_err(|e| match e {
            IdentityError::NoPrincipal { .. } | IdentityError::WrongPrincipal { .. } => {
                ServiceError::WrongCertificate {
                    path: config.cert.clone(),
                    expected,
                    source: Box::new(e),
                }
            }
            e => ServiceError::Identity(e),
        })?;
        let listeners = Listeners::bind(config.listen, None).await?;
        Ok(Self::from_parts(
            Arc::new(witness),
            identity.server_config().map_err(ServiceError::Identity)?,
            config.cell.clone(),
            listeners.mtls,
        ))
    }

    /// A service from its parts (the TLS configuration from
    /// [`ServiceIdentity::server_config`] or
    /// [`nitrile_pki::tls::server_config`]).
    pub fn from_parts(
        witness: Arc<Witness>,
        tls: Arc<rustls::ServerConfig>,
        cell: Name,
        listener: TcpListener,
    ) -> Self {
        Self {
            witness,
            server: Server::new(tls, cell),
            listener,
        }
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// The witness.
    pub fn witness(&self) -> &Arc<Witness> {
        &self.witness
    }

    /// Serves until `shutdown` resolves.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), ServiceError> {
        tracing::info!(
            addr = ?self.local_addr(),
            name = self.witness.name(),
            vkey = %self.witness.vkey(),
            logs = ?self.witness.origins().collect::<Vec<_>>(),
            "witness ready"
        );
        let api = Api(Arc::clone(&self.witness));
        self.server.serve(self.listener, api, shutdown).await?;
        Ok(())
    }
}

struct Api(Arc<Witness>);

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Bytes> {
    let mut resp = Response::new(Bytes::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}

fn refusal(e: &AddError) -> Response<Bytes> {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let AddError::Conflict { recorded, .. } = e {
        return text(status, SIZE_CONTENT_TYPE, format!("{recorded}\n"));
    }
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    reason.push('\n');
    let mut resp = text(status, "text/plain; charset=utf-8", reason);
    if e.is_split_view() {
        resp.headers_mut()
            .insert(SPLIT_VIEW_HEADER, http::HeaderValue::from_static("1"));
    }
    resp
}

fn now_unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Api {
    async fn add_checkpoint(&self, peer: &PeerIdentity, body: Bytes) -> Response<Bytes> {
        let req = match AddCheckpoint::parse(&body) {
            Ok(r) => r,
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "text/plain; charset=utf-8",
                    format!("{e}\n"),
                );
            }
        };
        let witness = Arc::clone(&self.0);
        let outcome = tokio::task::spawn_blocking(move || {
            witness.add_checkpoint(req.old_size, &req.proof, &req.note, now_unix_secs())
        })
        .await;
        match outcome {
            Ok(Ok(cosigned)) => text(StatusCode::OK, "text/plain; charset=utf-8", cosigned.body()),
            Ok(Err(e)) => {
                tracing::info!(peer = %peer.principal, status = e.status(), error = %e, "checkpoint not cosigned");
                refusal(&e)
            }
            Err(e) => {
                tracing::error!(error = %e, "cosigning task failed");
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain; charset=utf-8",
                    "internal failure; nothing was cosigned\n".to_owned(),
                )
            }
        }
    }

    fn checkpoint(&self, hash: &str) -> Response<Bytes> {
        let found = self
            .0
            .origins()
            .find(|o| origin_hash(o) == hash)
            .and_then(|o| self.0.recorded(o));
        match found {
            Some(state) => text(
                StatusCode::OK,
                "text/plain; charset=utf-8",
                state.checkpoint,
            ),
            None => text(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "no checkpoint cosigned for this log\n".to_owned(),
            ),
        }
    }
}

impl Handler for Api {
    async fn handle(&self, peer: PeerIdentity, req: Request<Bytes>) -> Response<Bytes> {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path();
        if parts.method == Method::POST && path == "/add-checkpoint" {
            return self.add_checkpoint(&peer, body).await;
        }
        if parts.method == Method::GET
            && let Some(hash) = path
                .strip_prefix('/')
                .and_then(|p| p.strip_suffix("/checkpoint"))
        {
            return self.checkpoint(hash);
        }
        text(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: the witness serves POST /add-checkpoint and GET /<origin hash>/checkpoint\n"
                .to_owned(),
        )
    }
}
