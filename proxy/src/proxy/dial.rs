//! Connecting upstream from inside the client's pod: the original destination, or the next
//! endpoint of its Service, failing over to the others.

use std::{io, net::SocketAddr, sync::atomic::Ordering, time::Duration};

use tokio::net::TcpStream;

use crate::{
    inpod::{Netns, connect_from},
    route::Route,
    state::ProxyCounters,
};

pub struct Dialed {
    pub stream: TcpStream,
    pub upstream: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{addr}: {source}")]
    Direct { addr: SocketAddr, source: io::Error },
    #[error("service {service}: all {tried} endpoints failed, last {last}: {source}")]
    AllEndpoints {
        service: String,
        tried: usize,
        last: SocketAddr,
        source: io::Error,
    },
    #[error("service {0}: no endpoints")]
    NoEndpoints(String),
}

/// Dials `route`. A Service's endpoints are tried in round-robin order, each at most once,
/// until one accepts: a refused or silent endpoint costs one retry, not the connection.
pub async fn dial(
    route: &Route,
    netns: &Netns,
    mark: u32,
    timeout: Duration,
    counters: &ProxyCounters,
) -> Result<Dialed, DialError> {
    match route {
        Route::Direct(addr) => connect(netns, mark, *addr, timeout)
            .await
            .map(|stream| Dialed {
                stream,
                upstream: *addr,
            })
            .map_err(|source| DialError::Direct {
                addr: *addr,
                source,
            }),
        Route::Service(service) => {
            let mut last = None;
            let mut tried = 0;
            for endpoint in service.endpoint_order() {
                if tried > 0 {
                    ProxyCounters::inc(&counters.endpoint_failovers);
                }
                tried += 1;
                match connect(netns, mark, endpoint.addr, timeout).await {
                    Ok(stream) => {
                        endpoint.picked.fetch_add(1, Ordering::Relaxed);
                        return Ok(Dialed {
                            stream,
                            upstream: endpoint.addr,
                        });
                    }
                    Err(e) => {
                        endpoint.failed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(service = %service.name, endpoint = %endpoint.addr, "endpoint failed: {e}");
                        last = Some((endpoint.addr, e));
                    }
                }
            }
            match last {
                Some((last, source)) => Err(DialError::AllEndpoints {
                    service: service.name.clone(),
                    tried,
                    last,
                    source,
                }),
                None => Err(DialError::NoEndpoints(service.name.clone())),
            }
        }
    }
}

async fn connect(
    netns: &Netns,
    mark: u32,
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    match tokio::time::timeout(timeout, connect_from(netns, mark, addr)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        )),
    }
}
