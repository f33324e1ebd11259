//! `FaultInjection` (`shunt.io/v1alpha1`, namespaced): a fault rule as a resource. Its spec
//! is the rule model of `shunt faults set` without the name (the resource's name is it);
//! `match.service` names a Service of the resource's namespace (`match.vip` is refused: an
//! address could be any namespace's), `match.source_pod` a pod of it unless written
//! `namespace/pod`. Each shunt turns the resources into rules named
//! `namespace/name` and writes `Accepted` or the error into the resource's status.
//!
//! Resources are watched untyped and their spec parsed here, so one bad resource gets its
//! error (with the field) in its status instead of breaking the watch for all of them. A
//! resource changed into an invalid one keeps its last accepted spec in force.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use kube::{
    Api, Client, CustomResource, CustomResourceExt, ResourceExt,
    api::{ApiResource, DynamicObject, PostParams},
    runtime::watcher,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    Health,
    watch::{Watched, settle},
};
use crate::{
    config::fault::{AbortFault, DelayFault, FaultMatch, FaultRule, TcpFault, validate},
    fault::Faults,
};

/// Inject faults into calls to a Service, like Istio's `VirtualService` `fault`: a delay
/// and/or an abort per HTTP/2 stream (gRPC call), each with its own percentage, and connect
/// delays or resets for TLS and other TCP connections.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "shunt.io",
    version = "v1alpha1",
    kind = "FaultInjection",
    plural = "faultinjections",
    shortname = "fi",
    namespaced,
    status = "FaultInjectionStatus",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.match.service"}"#,
    printcolumn = r#"{"name":"State","type":"string","jsonPath":".status.state"}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.message","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(deny_unknown_fields)]
pub struct FaultInjectionSpec {
    /// The calls and connections it applies to: `service` (in this namespace) or `vip`;
    /// optionally `path`, `headers`, `source_pod`.
    #[serde(rename = "match")]
    pub matches: FaultMatch,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<DelayFault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<AbortFault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpFault>,
    /// Let requests ask for a delay or abort with `x-shunt-fault-*` headers.
    #[serde(default)]
    pub header_control: bool,
}

/// What shunt made of the resource.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultInjectionStatus {
    /// `Accepted` (in force) or `Invalid` (see `message`).
    pub state: String,
    /// Why it is invalid, with the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The `metadata.generation` this status is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

pub const ACCEPTED: &str = "Accepted";
pub const INVALID: &str = "Invalid";

/// The CustomResourceDefinition as YAML, exactly as committed in `deploy/crd.yaml`.
pub fn crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    let yaml = serde_yaml_ng::to_string(&FaultInjection::crd())?;
    Ok(format!(
        "# Generated from proxy/src/k8s/faults.rs by `cargo xtask crd`; do not edit.\n{yaml}"
    ))
}

/// The rule a resource's spec makes, named `namespace/name`; or the error, naming the field
/// (`spec.delay.fixed: …`).
pub fn rule_from(
    namespace: &str,
    name: &str,
    spec: &serde_json::Value,
) -> Result<FaultRule, String> {
    let spec: FaultInjectionSpec = serde_path_to_error::deserialize(spec).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "spec".to_owned()
        } else {
            format!("spec.{path}")
        };
        format!("{field}: {}", e.into_inner())
    })?;
    let mut matches = spec.matches;
    if matches.vip.is_some() {
        // An address may be any namespace's Service; a namespaced resource keeps to its own.
        return Err(format!(
            "spec.match.vip: name a Service of namespace {namespace:?} with `service` instead"
        ));
    }
    if let Some(service) = &matches.service {
        if service.contains('/') {
            return Err(format!(
                "spec.match.service: {service:?}: name a Service of namespace {namespace:?}, without a namespace"
            ));
        }
        matches.service = Some(format!("{namespace}/{service}"));
    }
    if let Some(pod) = &matches.source_pod
        && !pod.contains('/')
    {
        matches.source_pod = Some(format!("{namespace}/{pod}"));
    }
    let rule = FaultRule {
        name: format!("{namespace}/{name}"),
        matches,
        delay: spec.delay,
        abort: spec.abort,
        tcp: spec.tcp,
        header_control: spec.header_control,
    };
    validate(&rule).map_err(|(field, message)| {
        // A rule-level problem is reported against the name; here that is the whole spec.
        let field = if field == "name" {
            "spec".to_owned()
        } else {
            format!("spec.{field}")
        };
        format!("{field}: {message}")
    })?;
    Ok(rule)
}

/// The resources' rules, remembering each one's last accepted spec by UID.
#[derive(Default)]
pub struct Resources {
    accepted: HashMap<String, FaultRule>,
}

impl Resources {
    /// Rules for every resource (sorted by name, the order they are matched in), and the
    /// status each resource should have.
    pub fn evaluate(
        &mut self,
        objects: &[Arc<DynamicObject>],
    ) -> (
        Vec<FaultRule>,
        Vec<(Arc<DynamicObject>, FaultInjectionStatus)>,
    ) {
        let mut statuses = Vec::with_capacity(objects.len());
        let mut seen = Vec::with_capacity(objects.len());
        for object in objects {
            let (Some(namespace), Some(uid)) = (object.namespace(), object.uid()) else {
                continue;
            };
            seen.push(uid.clone());
            let spec = object.data.get("spec").cloned().unwrap_or_default();
            let status = match rule_from(&namespace, &object.name_any(), &spec) {
                Ok(rule) => {
                    self.accepted.insert(uid, rule);
                    FaultInjectionStatus {
                        state: ACCEPTED.into(),
                        message: None,
                        observed_generation: object.metadata.generation,
                    }
                }
                Err(error) => {
                    let message = if self.accepted.contains_key(&uid) {
                        format!("{error} (the last accepted spec stays in force)")
                    } else {
                        error
                    };
                    FaultInjectionStatus {
                        state: INVALID.into(),
                        message: Some(message),
                        observed_generation: object.metadata.generation,
                    }
                }
            };
            statuses.push((object.clone(), status));
        }
        self.accepted.retain(|uid, _| seen.contains(uid));
        let by_name: BTreeMap<&str, &FaultRule> = self
            .accepted
            .values()
            .map(|rule| (rule.name.as_str(), rule))
            .collect();
        let rules = by_name.into_values().cloned().collect();
        (rules, statuses)
    }
}

/// The status a resource has now, if it parses.
fn current_status(object: &DynamicObject) -> Option<FaultInjectionStatus> {
    serde_json::from_value(object.data.get("status")?.clone()).ok()
}

/// How soon status writes that failed are tried again.
const STATUS_RETRY: Duration = Duration::from_secs(5);

/// Watches `FaultInjection` resources and keeps the cluster's fault rules and the resources'
/// statuses in step, until the daemon stops.
pub async fn run(client: Client, faults: Arc<Faults>, health: Arc<Health>) {
    let resource = ApiResource::erase::<FaultInjection>(&());
    let mut watched = Watched::new(
        Api::<DynamicObject>::all_with(client.clone(), &resource),
        watcher::Config::default(),
        resource.clone(),
        "faultinjections",
        health,
    );
    let mut resources = Resources::default();
    let mut retry = false;
    let mut applied: Option<Vec<FaultRule>> = None;
    loop {
        let alive = tokio::select! {
            alive = settle(&mut watched) => alive,
            () = tokio::time::sleep(STATUS_RETRY), if retry => true,
        };
        if !alive {
            tracing::error!("the FaultInjections' watch ended; fault rules stay as they are");
            return;
        }
        if !watched.synced {
            continue;
        }
        let (rules, statuses) = resources.evaluate(&watched.store.state());
        if applied.as_ref() != Some(&rules) {
            tracing::info!(
                rules = ?rules.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
                "fault rules from FaultInjection resources"
            );
            faults.set_cluster_rules(rules.clone());
            applied = Some(rules);
        }
        watched.applied();
        retry = false;
        for (object, status) in statuses {
            if current_status(&object).as_ref() == Some(&status) {
                continue;
            }
            if let Err(e) = write_status(&client, &resource, &object, &status).await {
                // A conflict means another node wrote first: its write comes back as an
                // update and is compared again. Anything else is tried again shortly.
                if !matches!(&e, kube::Error::Api(s) if s.code == 409) {
                    tracing::warn!(resource = %object.name_any(), "writing the status: {e}");
                    retry = true;
                }
            }
        }
    }
}

/// Replaces the status (`update` on `faultinjections/status`), conditional on the
/// resource's version, so a stale view never overwrites a newer status.
async fn write_status(
    client: &Client,
    resource: &ApiResource,
    object: &DynamicObject,
    status: &FaultInjectionStatus,
) -> Result<(), kube::Error> {
    let namespace = object.namespace().unwrap_or_default();
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), &namespace, resource);
    let mut updated = object.clone();
    if let Some(data) = updated.data.as_object_mut() {
        data.insert("status".into(), serde_json::json!(status));
    }
    api.replace_status(&object.name_any(), &PostParams::default(), &updated)
        .await?;
    if status.state == INVALID {
        tracing::warn!(resource = %format!("{namespace}/{}", object.name_any()), message = status.message.as_deref(), "FaultInjection refused");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(
        name: &str,
        uid: &str,
        generation: i64,
        spec: serde_json::Value,
    ) -> Arc<DynamicObject> {
        let resource = ApiResource::erase::<FaultInjection>(&());
        let mut object = DynamicObject::new(name, &resource).within("demo");
        object.metadata.uid = Some(uid.into());
        object.metadata.generation = Some(generation);
        object.data = json!({"spec": spec});
        Arc::new(object)
    }

    #[test]
    fn a_valid_resource_becomes_a_rule_for_its_namespace() {
        let rule = rule_from(
            "demo",
            "slow",
            &json!({"match": {"service": "greeter", "source_pod": "client-1"},
                    "delay": {"fixed": "3s", "percentage": 100}}),
        )
        .unwrap();
        assert_eq!(rule.name, "demo/slow");
        assert_eq!(rule.matches.service.as_deref(), Some("demo/greeter"));
        assert_eq!(rule.matches.source_pod.as_deref(), Some("demo/client-1"));
        assert_eq!(rule.delay.unwrap().fixed, Duration::from_secs(3));
    }

    #[test]
    fn invalid_resources_name_the_field() {
        for (spec, expected) in [
            (
                json!({"match": {"service": "s"}, "delay": {"fixed": "soon"}}),
                "spec.delay.fixed:",
            ),
            (
                json!({"match": {"service": "s"}, "abort": {"grpc_status": "SLEEPY"}}),
                "spec.abort.grpc_status:",
            ),
            (
                json!({"match": {"service": "s"}, "abort": {"http_status": 503, "grpc_status": 14}}),
                "spec.abort:",
            ),
            (
                json!({"match": {"service": "s"}}),
                "spec: the rule injects nothing",
            ),
            (
                json!({"match": {}, "delay": {"fixed": "1s"}}),
                "spec.match:",
            ),
            (
                json!({"match": {"service": "other/s"}, "delay": {"fixed": "1s"}}),
                "spec.match.service:",
            ),
            (
                json!({"match": {"service": "s"}, "delay": {"fixed": "1s"}, "colour": "red"}),
                "colour",
            ),
            (json!(null), "spec:"),
        ] {
            let error = rule_from("demo", "x", &spec).expect_err(&spec.to_string());
            assert!(
                error.starts_with(expected) || error.contains(expected),
                "{spec}: {error}"
            );
        }
    }

    #[test]
    fn an_invalid_update_keeps_the_last_accepted_spec() {
        let mut resources = Resources::default();
        let good = json!({"match": {"service": "greeter"}, "delay": {"fixed": "3s"}});
        let (rules, statuses) = resources.evaluate(&[object("slow", "u1", 1, good)]);
        assert_eq!(rules.len(), 1);
        assert_eq!(statuses[0].1.state, ACCEPTED);
        assert_eq!(statuses[0].1.observed_generation, Some(1));

        let bad = json!({"match": {"service": "greeter"}, "delay": {"fixed": "later"}});
        let (rules, statuses) = resources.evaluate(&[object("slow", "u1", 2, bad.clone())]);
        assert_eq!(rules.len(), 1, "the accepted spec stays");
        assert_eq!(
            rules[0].delay.as_ref().unwrap().fixed,
            Duration::from_secs(3)
        );
        assert_eq!(statuses[0].1.state, INVALID);
        let message = statuses[0].1.message.as_deref().unwrap();
        assert!(
            message.contains("spec.delay.fixed") && message.contains("stays in force"),
            "{message}"
        );

        // A new resource that is invalid from the start adds nothing.
        let (rules, statuses) = resources.evaluate(&[
            object("slow", "u1", 2, bad.clone()),
            object("broken", "u2", 1, bad),
        ]);
        assert_eq!(rules.len(), 1);
        assert_eq!(statuses[1].1.state, INVALID);
        // Deleted: gone from the rules.
        let (rules, _) = resources.evaluate(&[]);
        assert!(rules.is_empty());
    }

    #[test]
    fn the_committed_crd_is_the_generated_one() {
        let committed = include_str!("../../../deploy/crd.yaml");
        let generated = crd_yaml().unwrap();
        assert!(
            committed == generated,
            "deploy/crd.yaml is not what the Rust types generate: run `cargo xtask crd`"
        );
    }
}
