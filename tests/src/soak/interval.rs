//! What `shunt-greeter soak` prints once a second (one JSON line) and the soak reads back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// shunt's `grpc-message` on an injected abort.
const FAULT_MESSAGE: &str = "fault injected";
/// The key of a unary call aborted by the soak's fault rule (`RESOURCE_EXHAUSTED`).
pub const FAULTED: &str = "unary ResourceExhausted (fault injected)";
/// The key of a short (churn) connection's call aborted by the fault rule.
pub const CHURN_FAULTED: &str = "churn ResourceExhausted (fault injected)";

/// The key of a short connection's failure with gRPC `code`. `shunt-greeter churn` reports a
/// count per code and the first message of each, so a batch's `RESOURCE_EXHAUSTED` counts as
/// injected when its message is shunt's: nothing else in the soak answers with that code.
pub fn churn_error_key(code: &str, message: &str) -> String {
    match code == "ResourceExhausted" && message == FAULT_MESSAGE {
        true => CHURN_FAULTED.to_owned(),
        false => format!("churn {code}"),
    }
}

/// The gRPC workload's outcomes over one interval.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct GrpcInterval {
    pub unary_ok: u64,
    pub streams_ok: u64,
    pub stream_replies: u64,
    /// Unary calls a GOAWAY refused before the server processed them (queued on a closing
    /// connection, or failed with the peer's graceful GOAWAY), retried once as gRPC's
    /// transparent retry does.
    #[serde(default)]
    pub unary_unsent_retried: u64,
    /// Server streams refused the same way before the server processed them, retried once.
    #[serde(default)]
    pub stream_unsent_retried: u64,
    /// Unary calls by the backend that answered.
    pub by_backend: BTreeMap<String, u64>,
    /// Failures keyed `<call> <code>`, with ` (fault injected)` when shunt's fault rule made it.
    pub errors: BTreeMap<String, u64>,
    /// The first message seen for each key in this interval.
    pub messages: BTreeMap<String, String>,
    /// When the interval ended (Unix milliseconds).
    #[serde(default)]
    pub t_ms: u64,
    /// The workload's last line.
    #[serde(default)]
    pub last: bool,
}

impl GrpcInterval {
    /// Counts a failed `call` (`unary`, `stream`) with its status `code` and `message`.
    pub fn error(&mut self, call: &str, code: &str, message: &str) {
        let key = match message == FAULT_MESSAGE {
            true => format!("{call} {code} ({FAULT_MESSAGE})"),
            false => format!("{call} {code}"),
        };
        *self.errors.entry(key.clone()).or_default() += 1;
        self.messages
            .entry(key)
            .or_insert_with(|| message.chars().take(200).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_shunts_fault_message_makes_a_churn_failure_injected() {
        assert_eq!(
            churn_error_key("ResourceExhausted", FAULT_MESSAGE),
            CHURN_FAULTED
        );
        assert_eq!(
            churn_error_key("ResourceExhausted", "too many"),
            "churn ResourceExhausted"
        );
        assert_eq!(
            churn_error_key("Unavailable", FAULT_MESSAGE),
            "churn Unavailable"
        );
    }
}
