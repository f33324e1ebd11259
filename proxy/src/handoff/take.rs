//! The new daemon's side: ask the running one to hand over, receive its listeners, and tell
//! it when they are adopted.

use std::{
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use hyper::Method;

use super::{
    HandoffError, Message, STEP_TIMEOUT,
    wire::{Channel, Rendezvous},
};
use crate::{
    admin::{
        api::{HandoffAccepted, HandoffRequest},
        client::AdminClient,
    },
    inpod::HandedPod,
    telemetry::TelemetryListener,
};

/// What the running daemon handed over; [`Taken::finish`] completes the handoff.
pub struct Taken {
    pub from_pid: u32,
    pub pods: Vec<HandedPod>,
    pub telemetry: Vec<(TelemetryListener, OwnedFd)>,
    channel: Channel,
    _rendezvous: RemoveOnDrop,
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Whether a daemon answers on the admin socket.
pub async fn running_daemon(admin_socket: &Path) -> bool {
    tokio::net::UnixStream::connect(admin_socket).await.is_ok()
}

/// Asks the daemon serving `admin_socket` to hand over, and receives what it hands over.
/// Until [`Taken::finish`] the old daemon keeps accepting too.
pub async fn take(admin_socket: &Path) -> Result<Taken, HandoffError> {
    let pid = std::process::id();
    let mut name = admin_socket.file_name().unwrap_or_default().to_owned();
    name.push(format!(".handoff-{pid}"));
    let path = admin_socket.with_file_name(name);
    let rendezvous = Rendezvous::bind(&path)?;
    let guard = RemoveOnDrop(path.clone());
    let accepted: HandoffAccepted = AdminClient::new(admin_socket)
        .call(
            Method::POST,
            "/handoff",
            Some(HandoffRequest { socket: path, pid }),
        )
        .await
        .map_err(HandoffError::Refused)?;
    tracing::info!(pid = accepted.pid, "the running daemon agreed to hand over");
    let mut taken = tokio::task::spawn_blocking(move || receive(&rendezvous))
        .await
        .map_err(|e| HandoffError::Protocol(format!("receiving: {e}")))??;
    taken._rendezvous = guard;
    Ok(taken)
}

fn receive(rendezvous: &Rendezvous) -> Result<Taken, HandoffError> {
    let channel = rendezvous.accept(STEP_TIMEOUT)?;
    let mut pods = Vec::new();
    let mut telemetry = Vec::new();
    loop {
        let Some((message, fds)) = channel.recv()? else {
            return Err(HandoffError::Protocol(
                "the running daemon closed the channel before it was done".into(),
            ));
        };
        match message {
            Message::Pod {
                name,
                netns,
                netns_cookie,
                origin,
                listeners,
            } => {
                if listeners.len() != fds.len() {
                    return Err(HandoffError::Protocol(format!(
                        "pod {name:?}: {} listeners but {} descriptors",
                        listeners.len(),
                        fds.len()
                    )));
                }
                pods.push(HandedPod {
                    name,
                    netns,
                    netns_cookie,
                    origin,
                    listeners: listeners.into_iter().zip(fds).collect(),
                });
            }
            Message::Telemetry { listeners } => {
                if listeners.len() != fds.len() {
                    return Err(HandoffError::Protocol(format!(
                        "{} telemetry listeners but {} descriptors",
                        listeners.len(),
                        fds.len()
                    )));
                }
                telemetry = listeners.into_iter().zip(fds).collect();
            }
            Message::Done { pid, pods: count } => {
                if count != pods.len() {
                    return Err(HandoffError::Protocol(format!(
                        "{count} pods announced, {} received",
                        pods.len()
                    )));
                }
                return Ok(Taken {
                    from_pid: pid,
                    pods,
                    telemetry,
                    channel,
                    _rendezvous: RemoveOnDrop(PathBuf::new()),
                });
            }
            other => {
                return Err(HandoffError::Protocol(format!(
                    "unexpected message {other:?}"
                )));
            }
        }
    }
}

impl Taken {
    /// Number of listening sockets handed over (pods' and telemetry's).
    pub fn listener_count(&self) -> usize {
        self.pods.iter().map(|p| p.listeners.len()).sum::<usize>() + self.telemetry.len()
    }

    /// Tells the old daemon its listeners are adopted and waits until it has stopped
    /// accepting and given up the admin socket's path.
    pub async fn finish(self) -> Result<(), HandoffError> {
        let Taken {
            channel,
            _rendezvous,
            ..
        } = self;
        tokio::task::spawn_blocking(move || {
            let _rendezvous = _rendezvous;
            channel.send(
                &Message::Adopted {
                    pid: std::process::id(),
                },
                &[],
            )?;
            match channel.recv()? {
                Some((Message::Released, _)) => Ok(()),
                Some((other, _)) => Err(HandoffError::Protocol(format!(
                    "expected released, got {other:?}"
                ))),
                None => Err(HandoffError::Protocol(
                    "the old daemon closed the channel before releasing".into(),
                )),
            }
        })
        .await
        .map_err(|e| HandoffError::Protocol(format!("finishing: {e}")))?
    }
}
