//! The admin channel: JSON over HTTP/1.1 on a root-only unix socket. The daemon serves it
//! (`server`), the CLI talks to it (`client`), and `api` holds the shapes both agree on.
//! `health` answers the kubelet's probes on a TCP port.

pub mod api;
pub mod client;
pub mod health;
pub mod server;
