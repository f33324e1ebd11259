//! The data path in userspace: accept on an in-pod listener → identify the original
//! destination → forward. Each stage hands the connection to the next; none calls back.

mod passthrough;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use shunt_common::ClientKey;
use tokio::net::{TcpListener, TcpStream};

use crate::{
    bpf::OriginalDstTable,
    inpod::Netns,
    net::{canonical, from_raw, to_raw},
    state::{ConnTable, Protocol, ProxyCounters},
};

/// Everything a connection's task needs, shared by all pods.
pub struct Proxy {
    pub dst_table: OriginalDstTable,
    pub conns: Arc<ConnTable>,
    pub counters: Arc<ProxyCounters>,
    pub mark: u32,
    pub connect_timeout: Duration,
}

/// The pod a listener belongs to.
pub struct PodContext {
    pub name: String,
    pub netns: Arc<Netns>,
    pub netns_cookie: u64,
}

/// Accepts until the task is aborted (on unenroll or shutdown); established connections
/// live in their own tasks and are unaffected.
pub async fn serve(listener: TcpListener, pod: Arc<PodContext>, proxy: Arc<Proxy>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                ProxyCounters::inc(&proxy.counters.accepted);
                tokio::spawn(handle(stream, canonical(peer), pod.clone(), proxy.clone()));
            }
            Err(e) => {
                // Typically EMFILE/ENFILE: back off briefly instead of spinning.
                ProxyCounters::inc(&proxy.counters.accept_errors);
                tracing::warn!(pod = %pod.name, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(client: TcpStream, peer: SocketAddr, pod: Arc<PodContext>, proxy: Arc<Proxy>) {
    let Some(original_dst) = identify(&proxy, &pod, peer) else {
        ProxyCounters::inc(&proxy.counters.no_original_dst);
        tracing::debug!(pod = %pod.name, %peer, "no original destination recorded; closing");
        return;
    };
    tracing::debug!(pod = %pod.name, client = %peer, %original_dst, "intercepted");
    let guard = proxy
        .conns
        .open(&pod.name, peer, original_dst, Protocol::Opaque);
    passthrough::forward(client, original_dst, &pod, &proxy, &guard).await;
}

/// The destination the client asked for, recorded by the programs at `connect()`.
fn identify(proxy: &Proxy, pod: &PodContext, peer: SocketAddr) -> Option<SocketAddr> {
    let key = ClientKey {
        netns_cookie: pod.netns_cookie,
        addr: to_raw(peer.ip()),
        port: peer.port(),
        _pad: [0; 6],
    };
    match proxy.dst_table.take(&key) {
        Ok(Some(dst)) => Some(SocketAddr::new(from_raw(dst.addr), dst.port)),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(pod = %pod.name, %peer, "reading the original destination: {e}");
            None
        }
    }
}
