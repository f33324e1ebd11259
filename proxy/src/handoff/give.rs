//! The running daemon's side: send the listeners to the new daemon and wait until it has
//! adopted them. Nothing here stops this daemon: the caller does, once [`give`] succeeds.

use std::{
    os::fd::{AsRawFd, OwnedFd},
    path::PathBuf,
};

use super::{HandoffError, Message, STEP_TIMEOUT, wire::Channel};
use crate::{inpod::HandedPod, telemetry::TelemetryListener};

/// The channel to a new daemon that has adopted the listeners.
pub struct Adopted {
    pub pid: u32,
    channel: Channel,
}

impl Adopted {
    /// This daemon no longer accepts and has given up the admin socket's path.
    pub async fn release(self) -> Result<(), HandoffError> {
        let channel = self.channel;
        tokio::task::spawn_blocking(move || channel.send(&Message::Released, &[]))
            .await
            .map_err(|e| HandoffError::Protocol(format!("releasing: {e}")))?
    }
}

/// Connects to the new daemon's rendezvous socket, sends every listener, and waits until it
/// answers `adopted`. An error leaves this daemon as it was.
pub async fn give(
    socket: PathBuf,
    pods: Vec<HandedPod>,
    telemetry: Vec<(TelemetryListener, OwnedFd)>,
) -> Result<Adopted, HandoffError> {
    tokio::task::spawn_blocking(move || {
        let channel = Channel::connect(&socket, STEP_TIMEOUT)?;
        let count = pods.len();
        for pod in pods {
            let (listeners, fds): (Vec<_>, Vec<_>) = pod.listeners.into_iter().unzip();
            let raw: Vec<_> = fds.iter().map(AsRawFd::as_raw_fd).collect();
            let message = Message::Pod {
                name: pod.name,
                netns: pod.netns,
                netns_cookie: pod.netns_cookie,
                origin: pod.origin,
                listeners,
            };
            channel.send(&message, &raw)?;
        }
        let (listeners, fds): (Vec<_>, Vec<_>) = telemetry.into_iter().unzip();
        let raw: Vec<_> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        channel.send(&Message::Telemetry { listeners }, &raw)?;
        channel.send(
            &Message::Done {
                pid: std::process::id(),
                pods: count,
            },
            &[],
        )?;
        match channel.recv()? {
            Some((Message::Adopted { pid }, _)) => Ok(Adopted { pid, channel }),
            Some((other, _)) => Err(HandoffError::Protocol(format!(
                "expected adopted, got {other:?}"
            ))),
            None => Err(HandoffError::Protocol(
                "the new daemon closed the channel before adopting".into(),
            )),
        }
    })
    .await
    .map_err(|e| HandoffError::Protocol(format!("handing over: {e}")))?
}
