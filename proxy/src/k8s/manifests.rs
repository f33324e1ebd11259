//! Every file in `deploy/` is what the Kubernetes API accepts: each document parses into its
//! k8s-openapi type (or the `FaultInjection` type), and serializing that back keeps every
//! field and value of the file. k8s-openapi's types silently drop fields they do not know,
//! so the round trip is what catches a misspelt or misplaced field (`imagePullPolicty`, a
//! `port` under the wrong parent): it would be missing from the result.

use std::path::{Path, PathBuf};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Namespace, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use serde_json::Value;

use super::faults::FaultInjection;
use crate::config::Config;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The YAML files under `dir`, recursively, relative to `deploy/`.
fn yaml_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("deploy/ is readable") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            yaml_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            found.push(path);
        }
    }
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("readable");
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The typed round trip of `doc`.
fn typed<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<Value, String> {
    let object: T = serde_path_to_error::deserialize(doc.clone())
        .map_err(|e| format!("{}: {}", e.path(), e.inner()))?;
    serde_json::to_value(object).map_err(|e| e.to_string())
}

/// A kustomization, strictly: only the fields these files use.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Kustomization {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    resources: Vec<String>,
    #[serde(default)]
    images: Vec<Image>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Image {
    name: String,
    new_name: String,
    new_tag: String,
}

fn round_trip(doc: &Value) -> Result<Value, String> {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    match (api_version, kind) {
        ("v1", "Namespace") => typed::<Namespace>(doc),
        ("v1", "ServiceAccount") => typed::<ServiceAccount>(doc),
        ("v1", "ConfigMap") => typed::<ConfigMap>(doc),
        ("v1", "Service") => typed::<Service>(doc),
        ("apps/v1", "DaemonSet") => typed::<DaemonSet>(doc),
        ("apps/v1", "Deployment") => typed::<Deployment>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => typed::<ClusterRole>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => typed::<ClusterRoleBinding>(doc),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            typed::<CustomResourceDefinition>(doc)
        }
        ("shunt.io/v1alpha1", "FaultInjection") => typed::<FaultInjection>(doc),
        _ => Err(format!(
            "no API type for {api_version} {kind} in this check"
        )),
    }
}

/// The first field or value of `file` that `typed` lost or changed.
fn lost(file: &Value, typed: &Value, path: &str) -> Option<String> {
    match (file, typed) {
        (Value::Object(file), Value::Object(typed)) => file.iter().find_map(|(key, value)| {
            let at = format!("{path}.{key}");
            match typed.get(key) {
                None => Some(format!("{at}: not a field of this type")),
                Some(back) => lost(value, back, &at),
            }
        }),
        (Value::Array(file), Value::Array(typed)) if file.len() == typed.len() => file
            .iter()
            .zip(typed)
            .enumerate()
            .find_map(|(i, (a, b))| lost(a, b, &format!("{path}[{i}]"))),
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => None,
        (a, b) if a == b => None,
        (a, b) => Some(format!("{path}: {a} became {b}")),
    }
}

#[test]
fn every_manifest_is_an_api_object_with_no_unknown_fields() {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    files.sort();
    assert!(files.len() >= 10, "deploy/ holds {files:?}");
    let mut listed = Vec::new();
    for file in &files {
        for doc in documents(file) {
            if doc["kind"] == "Kustomization" {
                let kustomization: Kustomization = serde_json::from_value(doc)
                    .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                for image in &kustomization.images {
                    assert!(
                        !image.name.is_empty()
                            && !image.new_name.is_empty()
                            && !image.new_tag.is_empty(),
                        "{}: an image without a name or tag",
                        file.display()
                    );
                }
                let dir = file.parent().expect("a directory");
                for resource in kustomization.resources {
                    let path = dir.join(&resource);
                    assert!(
                        path.is_file(),
                        "{}: {resource} does not exist",
                        file.display()
                    );
                    listed.push(path);
                }
                continue;
            }
            let back = round_trip(&doc).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            if let Some(problem) = lost(&doc, &back, "") {
                panic!("{}: {problem}", file.display());
            }
        }
    }
    // Everything is applied by some kustomization, except the fault the README applies on
    // its own.
    let unlisted: Vec<&PathBuf> = files
        .iter()
        .filter(|f| !f.ends_with("kustomization.yaml") && !listed.contains(f))
        .collect();
    assert_eq!(
        unlisted,
        [&deploy_dir().join("example/fault.yaml")],
        "files no kustomization lists"
    );
}

#[test]
fn a_misspelt_field_is_caught() {
    let doc: Value = serde_yaml_ng::from_str(
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec:\n  ports: [{port: 80, targetPrt: 8080}]\n",
    )
    .unwrap();
    let back = round_trip(&doc).unwrap();
    let problem = lost(&doc, &back, "").expect("the misspelt field is lost");
    assert!(problem.contains("targetPrt"), "{problem}");
}

#[test]
fn the_configmap_is_a_valid_configuration_and_the_daemonset_uses_it() {
    let deploy = deploy_dir();
    let config_map: ConfigMap =
        serde_json::from_value(documents(&deploy.join("configmap.yaml")).remove(0)).unwrap();
    let text = &config_map.data.as_ref().unwrap()["config.yaml"];
    let config = Config::parse(text).unwrap_or_else(|(f, m)| panic!("config.yaml: {f}: {m}"));
    assert_eq!(
        config.kubernetes.proc_root,
        Path::new("/host/proc"),
        "the DaemonSet mounts the host's /proc there"
    );
    let crate::config::Listen::On(health) = config.telemetry.health else {
        panic!("the probes need telemetry.health");
    };

    let daemonset: DaemonSet =
        serde_json::from_value(documents(&deploy.join("daemonset.yaml")).remove(0)).unwrap();
    let pod = daemonset.clone().spec.unwrap().template.spec.unwrap();
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.config_map.is_some())
        .expect("a ConfigMap volume");
    assert_eq!(
        volume.config_map.as_ref().unwrap().name,
        config_map.metadata.name.unwrap()
    );
    let container = &pod.containers[0];
    assert!(container.args.iter().flatten().any(|a| a == "--kubernetes"));
    // With the host's network, a declared container port is a host port, and the scheduler
    // would keep the new pod of a rolling update off the node while the old one holds it.
    assert!(
        container.ports.as_ref().is_none_or(Vec::is_empty),
        "no declared ports: they would keep old and new pods from overlapping"
    );
    // The pod shares the node's network namespace: a probe reaches a loopback listener only
    // when it is sent to loopback.
    for (kind, probe) in [
        ("readiness", &container.readiness_probe),
        ("liveness", &container.liveness_probe),
    ] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref());
        let get = get.unwrap_or_else(|| panic!("a {kind} probe over HTTP"));
        if health.ip().is_loopback() {
            assert_eq!(get.host.as_deref(), Some("127.0.0.1"), "{kind} probe host");
        }
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(
                health.port()
            )),
            "{kind} probe port"
        );
    }
    // A new daemon takes over from the running one on its node (see README, Upgrades): the
    // update surges, so the old pod is only deleted once the new one is ready.
    let rolling = daemonset
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.rolling_update.as_ref())
        .expect("a rolling update strategy");
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.host_pid, Some(true));
}
