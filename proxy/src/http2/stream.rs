//! One HTTP/2 stream, relayed between the client and an upstream stream.
//!
//! Both directions run at once (bidirectional streaming), each sending only as much as the
//! receiving peer's flow-control window allows and releasing the sender's window only after
//! the bytes were handed on, so a large message never piles up in shunt. Trailers and
//! trailers-only responses pass through as they are; RST_STREAM passes through with its
//! reason in both directions.

use std::future::poll_fn;

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream, client::ResponseFuture, server::SendResponse};
use http::Response;

/// What the upstream answered, for the stream's record.
#[derive(Debug, Default)]
pub struct Observed {
    pub status: Option<u16>,
    /// From the response headers (trailers-only) or the trailers.
    pub grpc_status: Option<String>,
    /// DATA bytes relayed from the client, and to it.
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

/// How a relayed stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Complete,
    ClientReset(Reason),
    UpstreamReset(Reason),
}

enum Stop {
    Client(Reason),
    Upstream(Reason),
}

/// Relays until both directions are done or one side resets.
pub async fn relay(
    request_body: RecvStream,
    mut upstream_send: SendStream<Bytes>,
    response: ResponseFuture,
    mut respond: SendResponse<Bytes>,
    counted: &super::StreamBytes,
    observed: &mut Observed,
) -> Ended {
    let mut downstream_send: Option<SendStream<Bytes>> = None;
    // A request without a body (END_STREAM on its HEADERS) has nothing to pump.
    let request_ended = request_body.is_end_stream();
    let mut bytes_received = 0;
    let stop = {
        let requests = pump(
            request_body,
            &mut upstream_send,
            Side::Request,
            Meter {
                connection: &counted.request,
                stream: &mut bytes_received,
            },
            None,
        );
        let responses = respond_with(
            response,
            &mut respond,
            &mut downstream_send,
            &counted.response,
            observed,
        );
        tokio::pin!(requests, responses);
        let (mut requests_done, mut responses_done) = (request_ended, false);
        loop {
            if requests_done && responses_done {
                break None;
            }
            tokio::select! {
                stop = &mut requests, if !requests_done => match stop {
                    Ok(()) => requests_done = true,
                    Err(stop) => break Some(stop),
                },
                stop = &mut responses, if !responses_done => match stop {
                    Ok(()) => responses_done = true,
                    Err(stop) => break Some(stop),
                },
            }
        }
    };
    observed.bytes_received = bytes_received;
    match stop {
        None => Ended::Complete,
        Some(Stop::Client(reason)) => {
            upstream_send.send_reset(reason);
            Ended::ClientReset(reason)
        }
        Some(Stop::Upstream(reason)) => {
            match downstream_send.as_mut() {
                Some(stream) => stream.send_reset(reason),
                None => respond.send_reset(reason),
            }
            Ended::UpstreamReset(reason)
        }
    }
}

/// Waits for the upstream's response headers, sends them on, then pumps the body.
async fn respond_with(
    response: ResponseFuture,
    respond: &mut SendResponse<Bytes>,
    downstream_send: &mut Option<SendStream<Bytes>>,
    counter: &std::sync::atomic::AtomicU64,
    observed: &mut Observed,
) -> Result<(), Stop> {
    let response = tokio::select! {
        response = response => response.map_err(|e| Stop::Upstream(reason_of(&e)))?,
        reason = poll_fn(|cx| respond.poll_reset(cx)) => {
            return Err(Stop::Client(reason.unwrap_or(Reason::CANCEL)));
        }
    };
    let (parts, body) = response.into_parts();
    observed.status = Some(parts.status.as_u16());
    observed.grpc_status = grpc_status(&parts.headers);
    let end_of_stream = body.is_end_stream();
    let send = respond
        .send_response(Response::from_parts(parts, ()), end_of_stream)
        .map_err(|e| Stop::Client(reason_of(&e)))?;
    if end_of_stream {
        return Ok(()); // trailers-only, or no body
    }
    let send = downstream_send.insert(send);
    let meter = Meter {
        connection: counter,
        stream: &mut observed.bytes_sent,
    };
    pump(
        body,
        send,
        Side::Response,
        meter,
        Some(&mut observed.grpc_status),
    )
    .await
}

fn grpc_status(headers: &http::HeaderMap) -> Option<String> {
    headers.get("grpc-status")?.to_str().ok().map(str::to_owned)
}

#[derive(Clone, Copy)]
enum Side {
    /// Client → upstream.
    Request,
    /// Upstream → client.
    Response,
}

impl Side {
    /// The receiving side failed.
    fn receiver_failed(self, reason: Reason) -> Stop {
        match self {
            Side::Request => Stop::Client(reason),
            Side::Response => Stop::Upstream(reason),
        }
    }

    /// Sending failed. Upstream, the stream may simply be over — the server answered and
    /// closed it, or told us to stop with RST_STREAM(NO_ERROR) — and whether it really
    /// failed shows on the response side, which passes a real reset on; so the rest of the
    /// request is dropped quietly. Downstream, the client is gone.
    fn send_failed(self, e: &h2::Error) -> Result<(), Stop> {
        match self {
            Side::Request => Ok(()),
            Side::Response => Err(Stop::Client(reason_of(e))),
        }
    }

    /// The sending side was reset.
    fn sender_failed(self, reason: Reason) -> Stop {
        match self {
            Side::Request => Stop::Upstream(reason),
            Side::Response => Stop::Client(reason),
        }
    }
}

/// Where relayed DATA bytes are counted: the connection's total and the stream's own.
struct Meter<'a> {
    connection: &'a std::sync::atomic::AtomicU64,
    stream: &'a mut u64,
}

/// DATA frames and then trailers (or the end of the stream) from `from` to `to`.
async fn pump(
    mut from: RecvStream,
    to: &mut SendStream<Bytes>,
    side: Side,
    meter: Meter<'_>,
    trailer_status: Option<&mut Option<String>>,
) -> Result<(), Stop> {
    let mut first = true;
    loop {
        let chunk = tokio::select! {
            chunk = from.data() => chunk,
            reason = poll_fn(|cx| to.poll_reset(cx)) => match reason {
                // RST_STREAM(NO_ERROR): "your message is not needed, my answer is complete"
                // (RFC 9113 §8.1). Stop sending; the other direction finishes normally.
                Ok(Reason::NO_ERROR) => return Ok(()),
                Ok(reason) => return Err(side.sender_failed(reason)),
                Err(e) => return Err(side.sender_failed(reason_of(&e))),
            },
        };
        match chunk {
            Some(Ok(data)) => {
                let len = data.len();
                // END_STREAM on this DATA frame and no trailers to come: the last frame
                // carries the flag, rather than an empty frame after it.
                let last = from.is_end_stream();
                // The first chunk goes out at once, with the HEADERS in the same write: a
                // new upstream stream has no send capacity until its connection opens it,
                // and waiting for that costs a write and a wake-up per unary call. h2
                // buffers it; one chunk per stream is what shunt holds anyway.
                let sent = if first {
                    to.send_data(data, last)
                } else {
                    send_within_window(to, data, last).await
                };
                first = false;
                if let Err(e) = sent {
                    return side.send_failed(&e);
                }
                meter
                    .connection
                    .fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
                *meter.stream += len as u64;
                // Only now may the sender send more: memory stays bounded by the windows.
                let _ = from.flow_control().release_capacity(len);
                if last {
                    return Ok(());
                }
            }
            Some(Err(e)) => return Err(side.receiver_failed(reason_of(&e))),
            None => break,
        }
    }
    let sent = match from.trailers().await {
        Ok(Some(trailers)) => {
            if let Some(status) = trailer_status {
                *status = grpc_status(&trailers);
            }
            to.send_trailers(trailers)
        }
        Ok(None) => to.send_data(Bytes::new(), true),
        Err(e) => return Err(side.receiver_failed(reason_of(&e))),
    };
    match sent {
        Ok(()) => Ok(()),
        Err(e) => side.send_failed(&e),
    }
}

/// Sends `data` as the receiver's window allows, waiting for WINDOW_UPDATEs as needed; the
/// last piece carries END_STREAM when `end_of_stream`.
async fn send_within_window(
    to: &mut SendStream<Bytes>,
    mut data: Bytes,
    end_of_stream: bool,
) -> Result<(), h2::Error> {
    if data.is_empty() {
        return to.send_data(data, end_of_stream);
    }
    while !data.is_empty() {
        to.reserve_capacity(data.len());
        let available = match poll_fn(|cx| to.poll_capacity(cx)).await {
            Some(available) => available?,
            None => return Err(h2::Error::from(Reason::STREAM_CLOSED)),
        };
        if available == 0 {
            continue;
        }
        let piece = data.split_to(available.min(data.len()));
        to.send_data(piece, end_of_stream && data.is_empty())?;
    }
    Ok(())
}

fn reason_of(e: &h2::Error) -> Reason {
    e.reason().unwrap_or(Reason::CANCEL)
}
