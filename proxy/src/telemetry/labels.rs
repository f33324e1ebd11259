//! Label values with a bounded set of values, whatever peers send: Service names come from
//! the configuration, everything else from fixed tables.

/// The Service label of traffic to a destination that is no configured Service.
pub const PASSTHROUGH: &str = "passthrough";

pub fn service(service: Option<&str>) -> String {
    service.unwrap_or(PASSTHROUGH).to_owned()
}

const GRPC_CODES: [&str; 17] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
];

/// A gRPC status code as sent (`0`–`16`); empty for a stream without one, `other` for
/// anything else a peer put in `grpc-status`.
pub fn grpc_status(status: Option<&str>) -> &'static str {
    match status {
        None => "",
        Some(status) => status
            .trim()
            .parse::<usize>()
            .ok()
            .and_then(|code| GRPC_CODES.get(code))
            .copied()
            .unwrap_or("other"),
    }
}

/// Envoy's response flags joined with commas, `-` for none (as Envoy and Istio print them).
pub fn flags(flags: &[String]) -> String {
    if flags.is_empty() {
        "-".to_owned()
    } else {
        flags.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_status_values_stay_within_the_codes() {
        assert_eq!(grpc_status(None), "");
        assert_eq!(grpc_status(Some("0")), "0");
        assert_eq!(grpc_status(Some("14")), "14");
        assert_eq!(grpc_status(Some("17")), "other");
        assert_eq!(grpc_status(Some("DROP TABLE")), "other");
    }

    #[test]
    fn flags_join_or_dash() {
        assert_eq!(flags(&[]), "-");
        assert_eq!(flags(&["DI".into(), "FI".into()]), "DI,FI");
    }
}
