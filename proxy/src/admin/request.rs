//! An admin API request, parsed from its method, path and body before anything acts on it.
//!
//! Parsing is the whole of what a client controls, so it is kept apart from the handlers (and
//! fuzzed on its own): a request that gets past [`AdminRequest::parse`] is well formed.

use hyper::{Method, StatusCode};
use serde::de::DeserializeOwned;

use super::api::HandoffRequest;
use super::api::{EnrollRequest, FaultsRequest, LogFilter};
use crate::config::fault::FaultRule;

#[derive(Debug)]
pub enum AdminRequest {
    Status,
    Pods,
    Enroll(EnrollRequest),
    Unenroll(String),
    Conns,
    ClosedConns,
    Services,
    KernelPath,
    Config,
    LogLevel,
    SetLogLevel(LogFilter),
    Reload,
    Streams,
    Faults,
    SetFaults(Vec<FaultRule>),
    ClearFault(String),
    Stats,
    Uninstall,
    HandOff(HandoffRequest),
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("no such endpoint: {method} {path}")]
    NoSuchEndpoint { method: Method, path: String },
    #[error("invalid request: {0}")]
    Body(String),
    #[error("{field}: {message}")]
    FaultRules { field: String, message: String },
}

impl RequestError {
    pub fn status(&self) -> StatusCode {
        match self {
            RequestError::NoSuchEndpoint { .. } => StatusCode::NOT_FOUND,
            RequestError::Body(_) => StatusCode::BAD_REQUEST,
            RequestError::FaultRules { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }
}

impl AdminRequest {
    pub fn parse(method: &Method, path: &str, body: &[u8]) -> Result<AdminRequest, RequestError> {
        use AdminRequest::*;
        Ok(match (method, path) {
            (&Method::GET, "/status") => Status,
            (&Method::GET, "/pods") => Pods,
            (&Method::POST, "/pods") => Enroll(json(body)?),
            (&Method::DELETE, p) if p.starts_with("/pods/") => {
                Unenroll(p["/pods/".len()..].to_owned())
            }
            (&Method::GET, "/conns") => Conns,
            (&Method::GET, "/conns/closed") => ClosedConns,
            (&Method::GET, "/services") => Services,
            (&Method::GET, "/kernel-path") => KernelPath,
            (&Method::GET, "/config") => Config,
            (&Method::GET, "/log-level") => LogLevel,
            (&Method::PUT, "/log-level") => SetLogLevel(json(body)?),
            (&Method::POST, "/reload") => Reload,
            (&Method::GET, "/streams") => Streams,
            (&Method::GET, "/faults") => Faults,
            (&Method::POST, "/faults") => {
                let request: FaultsRequest = json(body)?;
                let rules = crate::config::fault::parse_rules(&request.rules)
                    .map_err(|(field, message)| RequestError::FaultRules { field, message })?;
                SetFaults(rules)
            }
            (&Method::DELETE, p) if p.starts_with("/faults/") => {
                ClearFault(p["/faults/".len()..].to_owned())
            }
            (&Method::GET, "/stats") => Stats,
            (&Method::POST, "/uninstall") => Uninstall,
            (&Method::POST, "/handoff") => HandOff(json(body)?),
            _ => {
                return Err(RequestError::NoSuchEndpoint {
                    method: method.clone(),
                    path: path.to_owned(),
                });
            }
        })
    }
}

fn json<T: DeserializeOwned>(body: &[u8]) -> Result<T, RequestError> {
    serde_json::from_slice(body).map_err(|e| RequestError::Body(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_unknown_ones_are_named() {
        assert!(matches!(
            AdminRequest::parse(&Method::GET, "/status", b""),
            Ok(AdminRequest::Status)
        ));
        assert!(matches!(
            AdminRequest::parse(&Method::DELETE, "/pods/client", b""),
            Ok(AdminRequest::Unenroll(name)) if name == "client"
        ));
        let e = AdminRequest::parse(&Method::POST, "/status", b"").unwrap_err();
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(e.to_string(), "no such endpoint: POST /status");
    }

    #[test]
    fn a_bad_body_is_a_bad_request_and_bad_rules_name_the_field() {
        let e = AdminRequest::parse(&Method::POST, "/pods", b"{\"name\": 1}").unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let rules =
            serde_json::json!({"rules": "- name: x\n  abort: {percent: 300, grpc: UNAVAILABLE}\n"});
        let e = AdminRequest::parse(&Method::POST, "/faults", rules.to_string().as_bytes())
            .unwrap_err();
        assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert!(e.to_string().contains("abort"), "{e}");
    }
}
