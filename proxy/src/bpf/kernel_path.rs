//! The kernel path's maps as the daemon writes them (`KP_ROUTES`, `KP_ENDPOINTS`,
//! `KP_PORTS`), and its event ring (`KP_EVENTS`) as the daemon reads it.
//!
//! [`KernelRouteMaps::apply`] makes the maps hold a wanted state, writing only what changed:
//! a Service whose endpoints change gets its new set under a fresh id before its route
//! points there, and the old set goes after, so connect() never reads half a set.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use aya::maps::{HashMap, MapData, RingBuf};
use shunt_common::{
    EndpointKey, KERNEL_ROUTE_PROXY, KernelPathEvent, KernelRoute, OriginalDst, maps,
};

use super::{BpfError, map_err, sys};
use crate::net::to_raw;

/// What connect() should do with one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedRoute {
    /// The Service's endpoints to balance over; empty: not a Service, left alone.
    pub endpoints: Vec<SocketAddr>,
    /// One in this many connections still through the proxy; 0: none.
    pub sample_every: u32,
    /// Never the kernel path (a fault rule names it), whatever `KP_PORTS` says.
    pub proxy: bool,
}

/// The daemon's handles on the kernel path's maps, and what it has written to them.
pub struct KernelRouteMaps {
    routes: HashMap<MapData, OriginalDst, KernelRoute>,
    endpoints: HashMap<MapData, EndpointKey, OriginalDst>,
    ports: HashMap<MapData, u16, u8>,
    written: BTreeMap<SocketAddr, (WantedRoute, u32)>,
    ports_written: BTreeSet<u16>,
    next_id: u32,
}

/// The key connect() looks a destination up by.
pub fn destination_key(addr: SocketAddr) -> OriginalDst {
    OriginalDst {
        addr: to_raw(addr.ip()),
        port: addr.port(),
        ..OriginalDst::default()
    }
}

impl KernelRouteMaps {
    pub(super) fn new(
        routes: HashMap<MapData, OriginalDst, KernelRoute>,
        endpoints: HashMap<MapData, EndpointKey, OriginalDst>,
        ports: HashMap<MapData, u16, u8>,
    ) -> KernelRouteMaps {
        KernelRouteMaps {
            routes,
            endpoints,
            ports,
            written: BTreeMap::new(),
            ports_written: BTreeSet::new(),
            next_id: 0,
        }
    }

    /// Makes the maps hold exactly `routes` and `ports`.
    pub fn apply(
        &mut self,
        routes: &BTreeMap<SocketAddr, WantedRoute>,
        ports: &BTreeSet<u16>,
    ) -> Result<(), BpfError> {
        for (&dst, wanted) in routes {
            let previous = self.written.get(&dst).cloned();
            if previous.as_ref().is_some_and(|(route, _)| route == wanted) {
                continue;
            }
            let same_endpoints = previous
                .as_ref()
                .is_some_and(|(route, _)| route.endpoints == wanted.endpoints);
            let id = match (&previous, same_endpoints) {
                (Some((_, id)), true) => *id,
                _ => {
                    self.next_id = self.next_id.wrapping_add(1);
                    let id = self.next_id;
                    for (index, &endpoint) in wanted.endpoints.iter().enumerate() {
                        let key = EndpointKey {
                            endpoints_id: id,
                            index: index as u32,
                        };
                        self.endpoints
                            .insert(key, destination_key(endpoint), 0)
                            .map_err(map_err(maps::KERNEL_ENDPOINTS))?;
                    }
                    id
                }
            };
            let route = KernelRoute {
                endpoints_id: id,
                endpoint_count: wanted.endpoints.len() as u32,
                sample_every: wanted.sample_every,
                flags: if wanted.proxy { KERNEL_ROUTE_PROXY } else { 0 },
                seen: 0,
                next: 0,
            };
            self.routes
                .insert(destination_key(dst), route, 0)
                .map_err(map_err(maps::KERNEL_ROUTES))?;
            if let Some((old, old_id)) = previous
                && old_id != id
            {
                self.remove_endpoints(old_id, old.endpoints.len());
            }
            self.written.insert(dst, (wanted.clone(), id));
        }
        let gone: Vec<SocketAddr> = self
            .written
            .keys()
            .filter(|dst| !routes.contains_key(dst))
            .copied()
            .collect();
        for dst in gone {
            let _ = self.routes.remove(&destination_key(dst));
            if let Some((old, id)) = self.written.remove(&dst) {
                self.remove_endpoints(id, old.endpoints.len());
            }
        }
        let new: Vec<u16> = ports.difference(&self.ports_written).copied().collect();
        for port in new {
            self.ports
                .insert(port, 1, 0)
                .map_err(map_err(maps::KERNEL_PORTS))?;
            self.ports_written.insert(port);
        }
        let gone: Vec<u16> = self.ports_written.difference(ports).copied().collect();
        for port in gone {
            let _ = self.ports.remove(&port);
            self.ports_written.remove(&port);
        }
        Ok(())
    }

    fn remove_endpoints(&mut self, id: u32, count: usize) {
        for index in 0..count {
            let _ = self.endpoints.remove(&EndpointKey {
                endpoints_id: id,
                index: index as u32,
            });
        }
    }
}

/// How often the event ring is read when the programs have not woken the daemon: reports
/// wake it only for a failed connect or a filling ring, so that a busy node does not pay a
/// wake-up per connection.
pub const DRAIN_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// The ring sock_ops reports kernel-path connections into.
pub struct KernelEvents {
    ring: RingBuf<MapData>,
}

impl KernelEvents {
    pub(super) fn new(ring: RingBuf<MapData>) -> KernelEvents {
        KernelEvents { ring }
    }

    /// The ring, ready to be waited on.
    pub fn register(self) -> std::io::Result<tokio::io::unix::AsyncFd<KernelEvents>> {
        sys::register_ring(self)
    }

    /// Waits until the programs wake the daemon (a failed connect, a filling ring) or
    /// [`DRAIN_EVERY`] has passed, then hands over everything reported.
    pub async fn next_batch(
        ring: &mut tokio::io::unix::AsyncFd<KernelEvents>,
        out: &mut Vec<KernelPathEvent>,
    ) -> std::io::Result<()> {
        match tokio::time::timeout(DRAIN_EVERY, ring.readable_mut()).await {
            Ok(guard) => {
                let mut guard = guard?;
                guard.get_inner_mut().drain(out);
                guard.clear_ready();
            }
            Err(_elapsed) => ring.get_mut().drain(out),
        }
        Ok(())
    }

    fn drain(&mut self, out: &mut Vec<KernelPathEvent>) {
        while let Some(item) = self.ring.next() {
            if let Some(event) = sys::read_record::<KernelPathEvent>(&item) {
                out.push(event);
            }
        }
    }
}

impl std::os::fd::AsRawFd for KernelEvents {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}
