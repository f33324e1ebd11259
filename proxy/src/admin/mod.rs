//! The admin channel: JSON over HTTP/1.1 on a root-only unix socket. The daemon serves it
//! (`server`), the CLI talks to it (`client`), and `api` holds the shapes both agree on.

pub mod api;
pub mod client;
pub mod server;
