//! The CLI's side of the admin channel.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};

use super::api::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the shunt daemon is not running (nothing listens on {0}); start it with `shunt run --config FILE`"
    )]
    NotRunning(PathBuf),
    #[error(
        "cannot open the admin socket {0}: permission denied (run as root, or as a member of the daemon's admin.group)"
    )]
    PermissionDenied(PathBuf),
    #[error("admin socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin request failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("the daemon answered {status}: {message}")]
    Daemon { status: u16, message: String },
    #[error("unexpected answer from the daemon: {0}")]
    Decode(#[from] serde_json::Error),
}

pub struct AdminClient {
    socket: PathBuf,
}

impl AdminClient {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
        }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call(Method::GET, path, Option::<()>::None).await
    }

    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<B>,
    ) -> Result<T, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    ClientError::NotRunning(self.socket.clone())
                }
                std::io::ErrorKind::PermissionDenied => {
                    ClientError::PermissionDenied(self.socket.clone())
                }
                _ => ClientError::Io {
                    path: self.socket.clone(),
                    source,
                },
            })?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let payload = match body {
            Some(b) => Bytes::from(serde_json::to_vec(&b)?),
            None => Bytes::new(),
        };
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "shunt")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(payload))
            .map_err(|e| ClientError::Daemon {
                status: 0,
                message: e.to_string(),
            })?;
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Daemon {
                status: status.as_u16(),
                message,
            });
        }
        Ok(serde_json::from_slice(&bytes)?)
    }
}
