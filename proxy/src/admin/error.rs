//! Why the admin socket could not be served: shared by binding it (`server`) and by
//! resolving who may connect (`access`).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("another shunt daemon is already serving {0}")]
    InUse(PathBuf),
    #[error("admin.group: no group {0} on this host")]
    NoSuchGroup(String),
    #[error("admin socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}
