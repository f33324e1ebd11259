//! What each fuzz target checks, shared by the libFuzzer targets (`fuzz_targets/`) and by
//! `proxy/tests/fuzz_inputs.rs`, which replays the corpora and past crashes on every test
//! run. Each check must hold for *any* input: no panic, and the property stated.

use shunt::{
    admin::request::AdminRequest,
    config::{Config, fault::parse_rules},
    fault::{ABORT_GRPC_HEADER, ABORT_HTTP_HEADER, DELAY_HEADER, Faults, Target},
    proxy::sniff::{Sniffed, sniff},
};

/// The first bytes of a client connection: the HTTP/2 preface check and the TLS ClientHello
/// parser classify any input. Detection calls `sniff` after every read, so once a prefix is
/// decisive, more bytes must not change the answer.
pub fn sniff_prefix(data: &[u8]) {
    let whole = sniff(data);
    for end in [1, 5, 9, 24, data.len() / 2] {
        if end < data.len() {
            let early = sniff(&data[..end]);
            if early != Sniffed::NeedMore {
                assert_eq!(early, whole, "verdict changed after {end} bytes");
            }
        }
    }
}

/// The YAML configuration: any text parses into a valid configuration or is refused with an
/// error that names a field.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err((field, _message)) = Config::parse(text) {
        assert!(!field.is_empty(), "an error must name the field");
    }
}

/// Fault rules as `shunt faults set` reads them: parsed and validated, and when accepted, put
/// in force and matched against a stream and a connection as the data path would.
pub fn fault_rules(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let rules = match parse_rules(text) {
        Ok(rules) => rules,
        Err((field, _message)) => {
            assert!(!field.is_empty(), "an error must name the field");
            return;
        }
    };
    let faults = Faults::new(Vec::new(), 100);
    faults.set(rules);
    let _ = faults.for_stream(
        &target(),
        "/helloworld.Greeter/SayHello",
        &http::HeaderMap::new(),
    );
    let _ = faults.for_connection(&target());
}

/// `x-shunt-fault-*` request headers (one value per line of the input) under a rule with
/// `header_control`: whatever a client sends, the stream gets a well-formed fault or none.
pub fn fault_headers(data: &[u8]) {
    let rules = parse_rules("name: chaos\nmatch: {service: greeter}\nheader_control: true\n")
        .unwrap_or_else(|e| panic!("the fixed rule is valid: {e:?}"));
    let faults = Faults::new(Vec::new(), 100);
    faults.set(rules);
    let mut headers = http::HeaderMap::new();
    let names = [DELAY_HEADER, ABORT_GRPC_HEADER, ABORT_HTTP_HEADER];
    for (name, value) in names.iter().zip(data.split(|&b| b == b'\n')) {
        if let Ok(value) = http::HeaderValue::from_bytes(value) {
            headers.insert(*name, value);
        }
    }
    let _ = faults.for_stream(&target(), "/helloworld.Greeter/SayHello", &headers);
}

/// An admin API request: a `METHOD PATH` line, then the body. Whatever a client sends is
/// parsed into a request or refused with a client error (4xx) that says why; nothing panics.
pub fn admin_api(data: &[u8]) {
    let (head, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let mut words = head.split(|&b| b == b' ');
    let Ok(method) = http::Method::from_bytes(words.next().unwrap_or_default()) else {
        return;
    };
    let Ok(path) = std::str::from_utf8(words.next().unwrap_or_default()) else {
        return;
    };
    if let Err(e) = AdminRequest::parse(&method, path, body) {
        assert!(e.status().is_client_error(), "{e} answered {}", e.status());
        assert!(!e.to_string().is_empty(), "an error must say why");
    }
}

fn target() -> Target<'static> {
    Target {
        service: Some("greeter"),
        original_dst: ([10, 96, 0, 10], 50051).into(),
        pod: "client",
    }
}
