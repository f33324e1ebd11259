//! One watched resource: a reflector store kept current by kube's watcher, and a stream that
//! says when the store changed. Errors are reported to [`Health`] and retried with kube's
//! default backoff (0.8 s doubling to 30 s); the store keeps its objects meanwhile, and a
//! re-list replaces them in one step once it is complete.

use std::{fmt::Debug, future::Future, hash::Hash, sync::Arc, time::Duration};

use futures::{StreamExt, stream::BoxStream};
use kube::{
    Api, Resource, ResourceExt,
    runtime::{
        WatchStreamExt,
        reflector::{Store, store::Writer},
        watcher::{self, Event},
    },
};
use serde::de::DeserializeOwned;

use super::Health;

/// What a watch reports to its controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// The store holds a complete list (first sync, or a re-list).
    Synced,
    /// An object was added, changed or deleted.
    Changed,
}

pub struct Watched<K: Resource + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    pub store: Store<K>,
    pub updates: BoxStream<'static, Update>,
    /// Has had a complete list at least once; until then the store is not the cluster's
    /// view and must not be acted on (it would look as if everything had gone).
    pub synced: bool,
    resource: &'static str,
    health: Arc<Health>,
}

impl<K> Watched<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    pub fn new(
        api: Api<K>,
        config: watcher::Config,
        dyntype: K::DynamicType,
        resource: &'static str,
        health: Arc<Health>,
    ) -> Watched<K> {
        health.register(resource, api.resource_url());
        let writer = Writer::new(dyntype);
        let store = writer.as_reader();
        let updates = watcher::watcher(api, config)
            .default_backoff()
            // Nobody here reads them, and they are often most of an object's size.
            .modify(|object| object.managed_fields_mut().clear())
            .reflect(writer)
            .filter_map({
                let health = health.clone();
                move |event| {
                    let health = health.clone();
                    async move { report(&health, resource, event) }
                }
            })
            .boxed();
        Watched {
            store,
            updates,
            synced: false,
            resource,
            health,
        }
    }

    /// The controller has acted on the complete list: what it says is in force. Only then
    /// does the watch count as synced for `/ready`, `shunt status` and a takeover's warm-up.
    pub fn applied(&self) {
        if self.synced {
            self.health.synced(self.resource);
        }
    }

    /// The next update; marks the store synced when it is.
    pub async fn next(&mut self) -> Option<Update> {
        let update = self.updates.next().await;
        if update == Some(Update::Synced) {
            self.synced = true;
        }
        update
    }
}

fn report<K>(
    health: &Health,
    resource: &'static str,
    event: Result<Event<K>, watcher::Error>,
) -> Option<Update> {
    match event {
        Ok(Event::InitDone) => {
            health.ok(resource);
            Some(Update::Synced)
        }
        Ok(Event::Apply(_) | Event::Delete(_)) => {
            health.ok(resource);
            Some(Update::Changed)
        }
        Ok(Event::Init | Event::InitApply(_)) => {
            health.ok(resource);
            None
        }
        Err(e) => {
            health.failed(resource, e.to_string());
            None
        }
    }
}

/// Something that delivers [`Update`]s: one watch, or two at once.
pub trait Updates {
    /// The next update; `None` when a watch ended (never, in practice: watchers retry for
    /// ever).
    fn next_update(&mut self) -> impl Future<Output = Option<Update>> + Send;
}

impl<K> Updates for Watched<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    fn next_update(&mut self) -> impl Future<Output = Option<Update>> + Send {
        self.next()
    }
}

impl<A: Updates + Send, B: Updates + Send> Updates for (&mut A, &mut B) {
    async fn next_update(&mut self) -> Option<Update> {
        let (a, b) = self;
        tokio::select! {
            update = a.next_update() => update,
            update = b.next_update() => update,
        }
    }
}

/// How long a controller lets a burst of updates land before it acts on them, so a
/// rollout's dozens of events make one reconcile, not dozens.
const SETTLE: Duration = Duration::from_millis(100);

/// Waits for an update, then for the burst it starts to pass. `false` when a watch ended.
pub async fn settle(updates: &mut impl Updates) -> bool {
    if updates.next_update().await.is_none() {
        return false;
    }
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        match tokio::time::timeout_at(deadline, updates.next_update()).await {
            Ok(Some(_)) => continue,
            Ok(None) => return false,
            Err(_) => return true,
        }
    }
}
