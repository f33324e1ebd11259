//! A stand-in for the Kubernetes API server, for shunt's Kubernetes mode: real list and
//! watch requests over HTTP on 127.0.0.1, answered with the JSON the API server sends.
//!
//! It keeps objects of the kinds shunt watches, each change numbered by a cluster-wide
//! resourceVersion and kept in a history, so a watch starting at any version gets every
//! change since, as `ADDED`/`MODIFIED`/`DELETED` events filtered by its label and field
//! selectors (an object that stops matching a selector is `DELETED` for that watch, as the
//! API server does). `FaultInjection` statuses are written through the `status`
//! subresource with optimistic concurrency (a stale resourceVersion gets `409 Conflict`).
//! [`MockApi::set_down`] ends every watch and drops every request, as an unreachable API
//! server would, until it is brought back.

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{Method, Request, Response, StatusCode, body::Frame, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

/// The kinds shunt watches: (apiVersion, kind, collection path across namespaces).
const KINDS: [(&str, &str, &str); 5] = [
    ("v1", "Namespace", "/api/v1/namespaces"),
    ("v1", "Pod", "/api/v1/pods"),
    ("v1", "Service", "/api/v1/services"),
    (
        "discovery.k8s.io/v1",
        "EndpointSlice",
        "/apis/discovery.k8s.io/v1/endpointslices",
    ),
    (
        "shunt.io/v1alpha1",
        "FaultInjection",
        "/apis/shunt.io/v1alpha1/faultinjections",
    ),
];

type Key = (String, String, String); // kind, namespace, name

#[derive(Debug)]
struct Change {
    version: u64,
    kind: String,
    old: Option<Value>,
    /// `None`: deleted (`old` is its last state).
    new: Option<Value>,
}

#[derive(Default)]
struct State {
    version: u64,
    objects: BTreeMap<Key, Value>,
    history: Vec<Arc<Change>>,
    /// Requests answered, by method and path (without query).
    requests: HashMap<String, usize>,
}

pub struct MockApi {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<Arc<Change>>,
    down: watch::Sender<bool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MockApi {
    /// Starts serving on 127.0.0.1 (a free port) on a thread of its own.
    pub fn start() -> anyhow::Result<MockApi> {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("binding the mock API server")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let (changes, _) = broadcast::channel(1024);
        let (down, _) = watch::channel(false);
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let server = Server {
            state: state.clone(),
            changes: changes.clone(),
            down: down.subscribe(),
        };
        let thread = std::thread::Builder::new()
            .name("mock-api".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        eprintln!("mock API: no runtime: {e}");
                        return;
                    }
                };
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    tokio::select! {
                        () = server.accept(listener) => {}
                        _ = stopped => {}
                    }
                });
            })?;
        Ok(MockApi {
            addr,
            state,
            changes,
            down,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// A kubeconfig for this server (plain HTTP, no credentials), written to `dir`.
    pub fn write_kubeconfig(&self, dir: &Path) -> anyhow::Result<std::path::PathBuf> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: mock\n  cluster:\n    server: http://{}\nusers:\n- name: mock\n  user: {{}}\ncontexts:\n- name: mock\n  context:\n    cluster: mock\n    user: mock\ncurrent-context: mock\n",
            self.addr
        );
        std::fs::write(&path, text).context("writing the kubeconfig")?;
        Ok(path)
    }

    /// Creates or replaces an object (by kind, namespace, name). Like the API server, it
    /// sets `resourceVersion`, `generation` (incremented when `spec` changes) and
    /// `creationTimestamp`, and keeps a `FaultInjection`'s status (a subresource).
    pub fn apply(&self, mut object: Value) -> anyhow::Result<()> {
        let key = key_of(&object)?;
        let mut state = self.lock();
        state.version += 1;
        let version = state.version;
        let old = state.objects.get(&key).cloned();
        let meta = object["metadata"]
            .as_object_mut()
            .context("no metadata object")?;
        meta.insert("resourceVersion".into(), json!(version.to_string()));
        meta.entry("creationTimestamp")
            .or_insert(json!("2026-01-01T00:00:00Z"));
        if !meta.contains_key("uid") {
            let uid = old
                .as_ref()
                .map(|o| o["metadata"]["uid"].clone())
                .unwrap_or_else(|| json!(format!("00000000-0000-4000-8000-{version:012}")));
            meta.insert("uid".into(), uid);
        }
        let generation = match &old {
            Some(old) if old["spec"] == object["spec"] => old["metadata"]["generation"].clone(),
            Some(old) => json!(old["metadata"]["generation"].as_i64().unwrap_or(0) + 1),
            None => json!(1),
        };
        object["metadata"]["generation"] = generation;
        if key.0 == "FaultInjection" {
            match old.as_ref().and_then(|o| o.get("status")) {
                Some(status) => object["status"] = status.clone(),
                None => {
                    if let Some(o) = object.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
        }
        state.objects.insert(key.clone(), object.clone());
        self.record(&mut state, key.0, old, Some(object));
        Ok(())
    }

    /// Deletes an object; `false` if there was none.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let mut state = self.lock();
        let key = (kind.to_owned(), namespace.to_owned(), name.to_owned());
        let Some(old) = state.objects.remove(&key) else {
            return false;
        };
        state.version += 1;
        // The DELETED event carries the object at the version of its deletion.
        let mut last = old;
        last["metadata"]["resourceVersion"] = json!(state.version.to_string());
        self.record(&mut state, key.0, Some(last), None);
        true
    }

    /// The object as stored now.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = (kind.to_owned(), namespace.to_owned(), name.to_owned());
        self.lock().objects.get(&key).cloned()
    }

    /// How many requests `METHOD path` got.
    pub fn requests(&self, method_and_path: &str) -> usize {
        self.lock()
            .requests
            .get(method_and_path)
            .copied()
            .unwrap_or(0)
    }

    /// Down: open watches end and every request is dropped without an answer. Up: served
    /// again; history is kept, so watches resume where they were.
    pub fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }

    /// Polls `check` on the stored object until it holds (at most `timeout`).
    pub fn wait_for(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
        timeout: Duration,
        check: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let what = format!("{kind} {namespace}/{name} as expected");
        crate::fixture::eventually(&what, timeout, || match self.get(kind, namespace, name) {
            Some(object) if check(&object) => Ok(Some(object)),
            other => bail!("it is {other:?}"),
        })
    }

    fn record(&self, state: &mut State, kind: String, old: Option<Value>, new: Option<Value>) {
        let change = Arc::new(Change {
            version: state.version,
            kind,
            old,
            new,
        });
        state.history.push(change.clone());
        // No watch open is fine: they read the history when they start.
        let _ = self.changes.send(change);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }
}

impl Drop for MockApi {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn key_of(object: &Value) -> anyhow::Result<Key> {
    let kind = object["kind"].as_str().context("no kind")?;
    anyhow::ensure!(
        KINDS.iter().any(|k| k.1 == kind),
        "the mock API serves no {kind}"
    );
    let name = object["metadata"]["name"]
        .as_str()
        .context("no metadata.name")?;
    let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
    Ok((kind.to_owned(), namespace.to_owned(), name.to_owned()))
}

#[derive(Clone)]
struct Server {
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<Arc<Change>>,
    down: watch::Receiver<bool>,
}

type Body = BoxBody<Bytes, Infallible>;

#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the API server is down")
    }
}

impl std::error::Error for Dropped {}

impl Server {
    async fn accept(self, listener: tokio::net::TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let server = self.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let server = server.clone();
                    async move { server.handle(req).await }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    async fn handle(&self, req: Request<hyper::body::Incoming>) -> Result<Response<Body>, Dropped> {
        if *self.down.borrow() {
            return Err(Dropped);
        }
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let query = parse_query(req.uri().query().unwrap_or_default());
        *lock(&self.state)
            .requests
            .entry(format!("{method} {path}"))
            .or_default() += 1;
        if method == Method::GET
            && let Some(&(api_version, kind, _)) = KINDS.iter().find(|k| k.2 == path)
        {
            let selectors = Selectors::from_query(&query);
            if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
                let from = query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                return Ok(self.watch(kind, from, selectors));
            }
            return Ok(self.list(api_version, kind, &selectors));
        }
        if method == Method::PUT
            && let Some((namespace, name)) = status_path(&path)
        {
            let body = req.into_body().collect().await.map_err(|_| Dropped)?;
            return Ok(self.put_status(&namespace, &name, &body.to_bytes()));
        }
        Ok(status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("{method} {path}"),
        ))
    }

    fn list(&self, api_version: &str, kind: &str, selectors: &Selectors) -> Response<Body> {
        let state = lock(&self.state);
        let items: Vec<&Value> = state
            .objects
            .iter()
            .filter(|((k, _, _), o)| k == kind && selectors.matches(o))
            .map(|(_, o)| o)
            .collect();
        json_reply(
            StatusCode::OK,
            &json!({
                "apiVersion": api_version,
                "kind": format!("{kind}List"),
                "metadata": {"resourceVersion": state.version.to_string()},
                "items": items,
            }),
        )
    }

    fn watch(&self, kind: &str, from: u64, selectors: Selectors) -> Response<Body> {
        // Subscribed under the lock that guards the history: no change is missed or doubled.
        let (backlog, live) = {
            let state = lock(&self.state);
            let backlog: Vec<Arc<Change>> = state
                .history
                .iter()
                .filter(|c| c.version > from)
                .cloned()
                .collect();
            (backlog, self.changes.subscribe())
        };
        let kind = kind.to_owned();
        let down = self.down.clone();
        let live = futures::stream::unfold(live, move |mut live| {
            let mut down = down.clone();
            async move {
                tokio::select! {
                    change = live.recv() => match change {
                        Ok(change) => Some((change, live)),
                        Err(_) => None,
                    },
                    _ = down.wait_for(|d| *d) => None,
                }
            }
        });
        let events = futures::stream::iter(backlog)
            .chain(live)
            .filter_map(move |change| {
                let event = (change.kind == kind)
                    .then(|| event_for(&change, &selectors))
                    .flatten();
                async move {
                    event.map(|e| {
                        let mut line = e.to_string();
                        line.push('\n');
                        Ok::<_, Infallible>(Frame::data(Bytes::from(line)))
                    })
                }
            });
        let mut reply = Response::new(BodyExt::boxed(StreamBody::new(events)));
        reply.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
        reply
    }

    fn put_status(&self, namespace: &str, name: &str, body: &[u8]) -> Response<Body> {
        let Ok(sent) = serde_json::from_slice::<Value>(body) else {
            return status(StatusCode::BAD_REQUEST, "BadRequest", "not JSON");
        };
        let key = (
            "FaultInjection".to_owned(),
            namespace.to_owned(),
            name.to_owned(),
        );
        let mut state = lock(&self.state);
        let Some(current) = state.objects.get(&key).cloned() else {
            return status(StatusCode::NOT_FOUND, "NotFound", name);
        };
        if sent["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
            return status(
                StatusCode::CONFLICT,
                "Conflict",
                "the object has been modified; please apply your changes to the latest version",
            );
        }
        state.version += 1;
        let mut updated = current.clone();
        updated["status"] = sent["status"].clone();
        updated["metadata"]["resourceVersion"] = json!(state.version.to_string());
        state.objects.insert(key, updated.clone());
        let change = Arc::new(Change {
            version: state.version,
            kind: "FaultInjection".into(),
            old: Some(current),
            new: Some(updated.clone()),
        });
        state.history.push(change.clone());
        let _ = self.changes.send(change);
        json_reply(StatusCode::OK, &updated)
    }
}

/// `/apis/shunt.io/v1alpha1/namespaces/NS/faultinjections/NAME/status` → (NS, NAME).
fn status_path(path: &str) -> Option<(String, String)> {
    let rest = path.strip_prefix("/apis/shunt.io/v1alpha1/namespaces/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [namespace, "faultinjections", name, "status"] => {
            Some(((*namespace).to_owned(), (*name).to_owned()))
        }
        _ => None,
    }
}

/// The watch event a change is for a watcher with `selectors`, if any.
fn event_for(change: &Change, selectors: &Selectors) -> Option<Value> {
    let was = change.old.as_ref().is_some_and(|o| selectors.matches(o));
    match &change.new {
        None if was => Some(json!({"type": "DELETED", "object": change.old})),
        None => None,
        Some(new) => match (was, selectors.matches(new)) {
            (false, true) => Some(json!({"type": "ADDED", "object": new})),
            (true, true) => Some(json!({"type": "MODIFIED", "object": new})),
            (true, false) => Some(json!({"type": "DELETED", "object": new})),
            (false, false) => None,
        },
    }
}

/// Equality selectors (`a=b`, `a==b`, `a!=b`), labels by key and fields by dotted path.
#[derive(Default)]
struct Selectors {
    labels: Vec<(String, String, bool)>,
    fields: Vec<(String, String, bool)>,
}

impl Selectors {
    fn from_query(query: &HashMap<String, String>) -> Selectors {
        let parse = |text: Option<&String>| -> Vec<(String, String, bool)> {
            text.map(String::as_str)
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.is_empty())
                .filter_map(|term| {
                    if let Some((k, v)) = term.split_once("!=") {
                        Some((k.to_owned(), v.to_owned(), false))
                    } else {
                        let (k, v) = term.split_once('=')?;
                        Some((k.to_owned(), v.trim_start_matches('=').to_owned(), true))
                    }
                })
                .collect()
        };
        Selectors {
            labels: parse(query.get("labelSelector")),
            fields: parse(query.get("fieldSelector")),
        }
    }

    fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        self.labels
            .iter()
            .all(|(k, v, eq)| (labels[k].as_str() == Some(v)) == *eq)
            && self.fields.iter().all(|(path, v, eq)| {
                let value = path.split('.').fold(object, |o, part| &o[part]);
                (value.as_str().unwrap_or_default() == v) == *eq
            })
    }
}

fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((percent_decode(k)?, percent_decode(v)?))
        })
        .collect()
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn json_reply(code: StatusCode, value: &Value) -> Response<Body> {
    let mut reply = Response::new(BodyExt::boxed(Full::new(Bytes::from(value.to_string()))));
    *reply.status_mut() = code;
    reply.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    reply
}

/// A `Status` object, as the API server answers errors.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    json_reply(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": reason, "message": message, "code": code.as_u16(),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_and_watch_events() {
        let query =
            parse_query("watch=true&fieldSelector=spec.nodeName%3Dnode-a&labelSelector=app%3Dx");
        let selectors = Selectors::from_query(&query);
        let pod = |node: &str, app: &str| json!({"metadata": {"labels": {"app": app}}, "spec": {"nodeName": node}});
        assert!(selectors.matches(&pod("node-a", "x")));
        assert!(!selectors.matches(&pod("node-b", "x")));
        assert!(!selectors.matches(&pod("node-a", "y")));
        let change = |old: Option<Value>, new: Option<Value>| Change {
            version: 1,
            kind: "Pod".into(),
            old,
            new,
        };
        let kind = |c: &Change| event_for(c, &selectors).map(|e| e["type"].clone());
        assert_eq!(
            kind(&change(None, Some(pod("node-a", "x")))),
            Some(json!("ADDED"))
        );
        assert_eq!(
            kind(&change(Some(pod("node-a", "x")), Some(pod("node-a", "y")))),
            Some(json!("DELETED"))
        );
        assert_eq!(kind(&change(Some(pod("node-b", "x")), None)), None);
    }
}
