//! shunt: an eBPF-accelerated transparent interception proxy for Kubernetes.
//!
//! See ARCHITECTURE.md for the data path and how the modules fit together. The library exists
//! for the `shunt` binary, the fuzz targets (`fuzz/`) and the tests crate, which
//! writes the daemon's configuration and reads the admin API's types; it is not a stable API.
//!
//! `unsafe` is denied everywhere but in the `sys` modules (`bpf/sys.rs`, `handoff/sys.rs`,
//! `inpod/sys.rs`, `proxy/sys.rs`, `telemetry/sys.rs`), which wrap each system call safely.

#![deny(unsafe_code)]

pub mod admin;
mod bpf;
pub mod cli;
pub mod config;
pub mod ctl;
pub mod daemon;
mod discovery;
pub mod fault;
pub mod handoff;
mod http2;
pub mod inpod;
pub mod k8s;
mod kernel_path;
pub mod logging;
mod net;
pub mod open_files;
pub mod privileges;
pub mod proxy;
pub mod reload;
mod route;
mod state;
mod telemetry;
mod workers;
