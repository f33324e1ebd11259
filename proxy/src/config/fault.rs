//! The fault rule model, as written in the config file, given to `shunt faults set` or
//! carried by a `FaultInjection` resource: plain data, parsed and validated here so that every
//! source of rules refuses the same mistakes with the same field names. Putting rules in force
//! and matching them against streams and connections is the fault table's (`crate::fault`).

use std::{borrow::Cow, collections::BTreeMap, fmt, net::SocketAddr, time::Duration};

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use super::field_error;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaultRule {
    pub name: String,
    #[serde(rename = "match")]
    pub matches: FaultMatch,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<DelayFault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<AbortFault>,
    /// Faults for connections forwarded as opaque TCP or TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpFault>,
    /// Let requests ask for a delay or abort with `x-shunt-fault-*` headers.
    #[serde(default)]
    pub header_control: bool,
}

/// Which streams and connections a rule applies to.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FaultMatch {
    /// A Service name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Or a destination address (a VIP, or any original destination).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// Exact values, all of which must be present.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_pod: Option<String>,
}

/// `path: /pkg.Service/Method` (exact) or `path: {prefix: /pkg.Service/}`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum PathMatch {
    Exact(String),
    Prefix { prefix: String },
}

/// A string or `{prefix: …}`: Kubernetes' structural schemas cannot say "one of these two
/// types", so the API server accepts any value here and shunt validates it.
impl JsonSchema for PathMatch {
    fn schema_name() -> Cow<'static, str> {
        "PathMatch".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "The request path: exact (`/pkg.Service/Method`) or `{prefix: /pkg.Service/}`.",
            "x-kubernetes-preserve-unknown-fields": true
        })
    }
}

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(exact) => path == exact,
            PathMatch::Prefix { prefix } => path.starts_with(prefix.as_str()),
        }
    }
}

/// Hold matching streams before they go upstream.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DelayFault {
    /// How long, e.g. `3s` or `250ms`.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub fixed: Duration,
    #[serde(default)]
    pub percentage: Percentage,
}

/// Answer matching streams with an error instead of sending them upstream.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AbortFault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<GrpcCode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    #[serde(default)]
    pub percentage: Percentage,
}

/// Faults for connections forwarded as opaque TCP or TLS.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TcpFault {
    /// Held this long before the upstream is dialled.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(with = "Option<String>")]
    pub connect_delay: Option<Duration>,
    /// This share of connections is reset right after detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reset_percentage: Option<Percentage>,
}

/// A share of requests, 0–100 with decimals; 100 when omitted, as Istio documents.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Percentage(pub f64);

impl Default for Percentage {
    fn default() -> Self {
        Percentage(100.0)
    }
}

impl Percentage {
    /// Whether this request is in the share.
    pub fn roll(self) -> bool {
        self.0 >= 100.0 || (self.0 > 0.0 && fastrand::f64() * 100.0 < self.0)
    }
}

impl JsonSchema for Percentage {
    fn schema_name() -> Cow<'static, str> {
        "Percentage".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A share of requests, 0 to 100 (decimals allowed); 100 when omitted.",
            "type": "number",
            "minimum": 0,
            "maximum": 100
        })
    }
}

impl<'de> Deserialize<'de> for Percentage {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = f64::deserialize(deserializer)?;
        if !(0.0..=100.0).contains(&value) {
            return Err(de::Error::custom(format!(
                "{value} is not a percentage between 0 and 100"
            )));
        }
        Ok(Percentage(value))
    }
}

/// A gRPC status code, by name (`UNAVAILABLE`) or number (14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcCode(pub u8);

const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

impl fmt::Display for GrpcCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            GRPC_CODES
                .get(usize::from(self.0))
                .copied()
                .unwrap_or("UNKNOWN"),
        )
    }
}

impl Serialize for GrpcCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl JsonSchema for GrpcCode {
    fn schema_name() -> Cow<'static, str> {
        "GrpcCode".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A gRPC status: its name (`UNAVAILABLE`) or number (14).",
            "x-kubernetes-int-or-string": true
        })
    }
}

impl<'de> Deserialize<'de> for GrpcCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum NameOrNumber {
            Number(u64),
            Name(String),
        }
        let code = match NameOrNumber::deserialize(deserializer)? {
            NameOrNumber::Number(n) => u8::try_from(n)
                .ok()
                .filter(|n| usize::from(*n) < GRPC_CODES.len()),
            NameOrNumber::Name(name) => {
                let wanted = name.to_ascii_uppercase();
                GRPC_CODES
                    .iter()
                    .position(|c| *c == wanted)
                    .and_then(|i| u8::try_from(i).ok())
            }
        };
        code.map(GrpcCode).ok_or_else(|| {
            de::Error::custom(format!(
                "not a gRPC status: use a name ({}) or 0–16",
                GRPC_CODES.join(", ")
            ))
        })
    }
}

/// Checks what serde cannot: returns `(field, message)` relative to the rule, e.g.
/// `("abort", "give grpc_status or http_status")`.
pub fn validate(rule: &FaultRule) -> Result<(), (String, String)> {
    let bad = |field: &str, message: &str| Err((field.to_owned(), message.to_owned()));
    if rule.name.is_empty() {
        return bad("name", "must not be empty");
    }
    if rule.matches.service.is_none() && rule.matches.vip.is_none() {
        return bad("match", "give `service` or `vip`");
    }
    if rule.delay.is_none() && rule.abort.is_none() && rule.tcp.is_none() && !rule.header_control {
        return bad(
            "name",
            "the rule injects nothing: give delay, abort, tcp or header_control",
        );
    }
    if let Some(abort) = &rule.abort {
        match (abort.grpc_status, abort.http_status) {
            (Some(_), Some(_)) | (None, None) => {
                return bad("abort", "give grpc_status or http_status (one)");
            }
            (None, Some(status)) if !(200..=599).contains(&status) => {
                return bad("abort.http_status", "must be an HTTP status, 200–599");
            }
            _ => {}
        }
    }
    if let Some(tcp) = &rule.tcp
        && tcp.connect_delay.is_none()
        && tcp.reset_percentage.is_none()
    {
        return bad("tcp", "give connect_delay or reset_percentage");
    }
    Ok(())
}

/// Checks a list of rules: each one, and that names are unique; fields are named as in the
/// config (`faults[1].abort.http_status`).
pub fn validate_all(rules: &[FaultRule], prefix: &str) -> Result<(), (String, String)> {
    let mut names = std::collections::HashSet::new();
    for (i, rule) in rules.iter().enumerate() {
        validate(rule).map_err(|(field, message)| (format!("{prefix}[{i}].{field}"), message))?;
        if !names.insert(&rule.name) {
            return Err((
                format!("{prefix}[{i}].name"),
                format!("duplicate rule name {:?}", rule.name),
            ));
        }
    }
    Ok(())
}

/// Rules as given to `shunt faults set`: one rule, or a list of them, in YAML (or JSON).
/// Errors are `(field, message)` with the field named as in the file (`[1].abort`).
pub fn parse_rules(text: &str) -> Result<Vec<FaultRule>, (String, String)> {
    let is_list = matches!(
        serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text),
        Ok(serde_yaml_ng::Value::Sequence(_))
    );
    let rules = if is_list {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize::<_, Vec<FaultRule>>(de).map_err(field_error)?
    } else {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        vec![serde_path_to_error::deserialize::<_, FaultRule>(de).map_err(field_error)?]
    };
    validate_all(&rules, "")?;
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Vec<FaultRule>, String> {
        let de = serde_yaml_ng::Deserializer::from_str(yaml);
        let rules: Vec<FaultRule> = serde_path_to_error::deserialize(de)
            .map_err(|e| format!("{}: {}", e.path(), e.inner()))?;
        validate_all(&rules, "faults").map_err(|(f, m)| format!("{f}: {m}"))?;
        Ok(rules)
    }

    #[test]
    fn the_documented_rules_parse() {
        let rules = parse(
            "- name: greeter-slow\n  match:\n    service: greeter\n    path: /helloworld.Greeter/SayHello\n    headers: {x-chaos: 'on'}\n    source_pod: client\n  delay: {fixed: 3s, percentage: 100}\n  abort: {grpc_status: UNAVAILABLE, percentage: 10}\n- name: payments-tls\n  match: {service: payments}\n  tcp: {connect_delay: 2s, reset_percentage: 5}\n- name: prefix\n  match: {vip: '10.96.0.10:80', path: {prefix: /pkg.Svc/}}\n  abort: {http_status: 503}\n",
        )
        .unwrap();
        assert_eq!(
            rules[0].abort.as_ref().unwrap().grpc_status,
            Some(GrpcCode(14))
        );
        assert_eq!(
            rules[0].delay.as_ref().unwrap().fixed,
            Duration::from_secs(3)
        );
        assert_eq!(
            rules[2].abort.as_ref().unwrap().percentage,
            Percentage(100.0)
        );
        assert!(
            rules[2]
                .matches
                .path
                .as_ref()
                .unwrap()
                .matches("/pkg.Svc/Method")
        );
    }

    #[test]
    fn bad_rules_name_the_field() {
        let cases = [
            (
                "- name: a\n  match: {service: s}\n  abort: {http_status: 503, percentage: 150}\n",
                "[0].abort.percentage",
            ),
            (
                "- name: a\n  match: {service: s}\n  abort: {grpc_status: SLEEPY}\n",
                "[0].abort.grpc_status",
            ),
            (
                "- name: a\n  match: {service: s}\n  delay: {fixed: soon}\n",
                "[0].delay.fixed",
            ),
            (
                "- name: a\n  match: {service: s}\n  delay: {fixed: 1s}\n  colour: red\n",
                "colour",
            ),
            (
                "- name: a\n  match: {service: s}\n  abort: {grpc_status: 14, http_status: 503}\n",
                "faults[0].abort",
            ),
            (
                "- name: a\n  match: {}\n  abort: {http_status: 503}\n",
                "faults[0].match",
            ),
            (
                "- name: a\n  match: {service: s}\n  abort: {http_status: 99}\n",
                "faults[0].abort.http_status",
            ),
        ];
        for (yaml, field) in cases {
            let error = parse(yaml).expect_err(yaml);
            assert!(error.contains(field), "{yaml}: {error}");
        }
    }

    #[test]
    fn percentages_roll_in_proportion() {
        assert!(Percentage(100.0).roll());
        assert!(!Percentage(0.0).roll());
        let hits = (0..10_000).filter(|_| Percentage(25.0).roll()).count();
        assert!((2_200..2_800).contains(&hits), "{hits}");
    }
}
