//! A `file://` transport for tough that reads in large chunks.
//!
//! tough's own `FilesystemTransport` reads through `tokio::fs` in small
//! chunks, each a hop to the blocking pool: a 100 MiB target took ten times
//! as long to read as to hash. This one reads [`CHUNK`] bytes per hop. It
//! only moves bytes: tough still checks every metadata file's signatures,
//! thresholds, expiry, version and length, and every target's length and
//! SHA-256, and stops reading a stream that is longer than it may be (so a
//! file is never read whole before its bound is checked).

use std::io::Read as _;

use bytes::Bytes;
use tough::{Transport, TransportError, TransportErrorKind, TransportStream};
use url::Url;

/// Bytes read per step.
pub const CHUNK: usize = 4 << 20;

/// Reads `file://` URLs from the local file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChunkedFileTransport;

fn error(url: &Url, e: std::io::Error) -> TransportError {
    let kind = if e.kind() == std::io::ErrorKind::NotFound {
        TransportErrorKind::FileNotFound
    } else {
        TransportErrorKind::Other
    };
    TransportError::new_with_cause(kind, url.clone(), e)
}

#[async_trait::async_trait]
impl Transport for ChunkedFileTransport {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        if url.scheme() != "file" {
            return Err(TransportError::new(
                TransportErrorKind::UnsupportedUrlScheme,
                url,
            ));
        }
        let path = url
            .to_file_path()
            .map_err(|()| TransportError::new(TransportErrorKind::Other, url.clone()))?;
        let opened = tokio::task::spawn_blocking(move || std::fs::File::open(path))
            .await
            .map_err(|e| error(&url, std::io::Error::other(e)))?
            .map_err(|e| error(&url, e))?;
        let stream = futures_util::stream::unfold(Some((opened, url)), |state| async move {
            let (mut file, url) = state?;
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; CHUNK];
                let mut filled = 0;
                while filled < CHUNK {
                    match file.read(&mut buf[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return (file, Err(e)),
                    }
                }
                buf.truncate(filled);
                (file, Ok(buf))
            })
            .await;
            match read {
                Err(e) => Some((Err(error(&url, std::io::Error::other(e))), None)),
                Ok((_, Err(e))) => Some((Err(error(&url, e)), None)),
                Ok((_, Ok(buf))) if buf.is_empty() => None,
                Ok((file, Ok(buf))) => {
                    let more = buf.len() == CHUNK;
                    let next = more.then_some((file, url));
                    Some((Ok(Bytes::from(buf)), next))
                }
            }
        });
        Ok(Box::pin(stream))
    }
}
