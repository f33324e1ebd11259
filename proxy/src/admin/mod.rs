//! The admin channel: JSON over HTTP/1.1 on a unix socket for root (and `admin.group`). The
//! daemon serves it (`server`) to the peers `access` admits, parsing each request
//! (`request`) before acting; the CLI talks to it (`client`); `api` holds the shapes both
//! agree on, and `convert` turns the daemon's own types into them; `programs` is what the
//! handlers need of the kernel's side.

pub mod access;
pub mod api;
pub mod client;
mod convert;
mod error;
pub mod programs;
pub mod request;
pub mod server;

pub use error::AdminError;
