//! Connecting upstream from inside the client's pod: the original destination, or the next
//! endpoint of its Service, failing over to the others.

use std::{
    io,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::net::TcpStream;

use crate::{
    http2::Connector,
    route::{Endpoint, Route},
    state::ProxyCounters,
};

pub struct Dialed {
    pub stream: TcpStream,
    pub upstream: SocketAddr,
    /// The Service endpoint it is, if any: the connection counts there once it is known to
    /// be forwarded whole (an HTTP/2 one is counted per stream instead).
    pub endpoint: Option<Arc<Endpoint>>,
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

impl DialError {
    /// Envoy's response flag: `UH` no endpoint to try, `UF` none could be reached.
    pub fn flag(&self) -> &'static str {
        match self {
            DialError::NoEndpoints(_) => "UH",
            DialError::Direct { .. } | DialError::AllEndpoints { .. } => "UF",
        }
    }
}

/// Dials `route`. A Service's endpoints are tried in round-robin order, each at most once,
/// until one accepts: a refused or silent endpoint costs one retry, not the connection.
pub async fn dial(
    route: &Route,
    connector: &Connector,
    timeout: Duration,
    counters: &ProxyCounters,
) -> Result<Dialed, DialError> {
    match route {
        Route::Direct(addr) => connect(connector, *addr, timeout)
            .await
            .map(|stream| Dialed {
                stream,
                upstream: *addr,
                endpoint: None,
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
                match connect(connector, endpoint.addr, timeout).await {
                    Ok(stream) => {
                        return Ok(Dialed {
                            stream,
                            upstream: endpoint.addr,
                            endpoint: Some(endpoint),
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
    connector: &Connector,
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    match tokio::time::timeout(timeout, connector(addr)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        )),
    }
}
