//! Handing a running daemon's work to a new one (an upgrade or a restart) without refusing
//! or dropping a connection.
//!
//! The new daemon finds the admin socket alive and asks, `POST /handoff`, naming a
//! rendezvous socket of its own. The running daemon connects there and sends every pod's
//! listening sockets (`SCM_RIGHTS`) with the pod's name, namespace and netns cookie, then its
//! metrics and health listeners. A listening socket passed this way is the same socket in
//! both processes: connections waiting in its accept queue are accepted by whichever
//! process gets there first, and the kernel maps (pinned, shared) tell both where each
//! connection was going. The new daemon adopts the listeners, swaps its programs into the
//! pinned links and answers `adopted`; only then does the old one stop accepting, close its
//! copies, give up the admin socket's path and answer `released`, and the new one binds it.
//! The old daemon then drains as on SIGTERM, without touching the enrollments or pins the
//! new one now owns. If the new daemon dies before `adopted`, the old one notices the closed
//! channel and carries on serving as if nothing had happened.

pub mod give;
#[allow(unsafe_code)]
mod sys;
pub mod take;
mod wire;

use std::{net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::{inpod::Origin, telemetry::TelemetryListener};

pub use take::{Taken, running_daemon, take};

/// How long each side waits for the other at any step. Generous: the new daemon loads and
/// verifies its programs between `done` and `adopted`, which takes seconds on a busy node.
pub const STEP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("{what}: {source}")]
    Channel {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("encoding a handoff message: {0}")]
    Encode(serde_json::Error),
    #[error("handoff protocol: {0}")]
    Protocol(String),
    #[error("the running daemon refused to hand over: {0}")]
    Refused(crate::admin::client::ClientError),
}

/// What goes over the channel, in this order: old → new `pod`…, `telemetry`, `done`;
/// new → old `adopted`; old → new `released`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Message {
    /// An enrolled pod; its listeners' descriptors come in the order of `listeners`.
    Pod {
        name: String,
        netns: PathBuf,
        netns_cookie: u64,
        origin: Origin,
        listeners: Vec<SocketAddr>,
    },
    /// The metrics and health listeners, descriptors in this order.
    Telemetry { listeners: Vec<TelemetryListener> },
    /// Everything is sent.
    Done { pid: u32, pods: usize },
    /// The new daemon accepts on the listeners and runs the programs.
    Adopted { pid: u32 },
    /// The old daemon no longer accepts and has given up the admin socket's path.
    Released,
}
