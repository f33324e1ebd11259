//! Replays every fuzz input kept in the repository — the seed corpora (`fuzz/corpus/<target>/`)
//! and the inputs that once crashed a target (`fuzz/regressions/<target>/`) — through the same
//! checks the fuzz targets run, so a fixed crash stays fixed without the fuzzer.

use std::path::{Path, PathBuf};

#[path = "../../fuzz/src/lib.rs"]
mod checks;

fn replay(target: &str, check: fn(&[u8])) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut inputs: Vec<PathBuf> = Vec::new();
    for kind in ["corpus", "regressions"] {
        if let Ok(dir) = std::fs::read_dir(fuzz.join(kind).join(target)) {
            inputs.extend(dir.filter_map(|e| e.ok()).map(|e| e.path()));
        }
    }
    assert!(
        !inputs.is_empty(),
        "no inputs for {target} under {}",
        fuzz.display()
    );
    for input in inputs {
        let data = std::fs::read(&input).unwrap_or_else(|e| panic!("{}: {e}", input.display()));
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "{} fails its check", input.display());
    }
}

#[test]
fn sniff_inputs() {
    replay("sniff", checks::sniff_prefix);
}

#[test]
fn config_inputs() {
    replay("config", checks::config);
}

#[test]
fn fault_rule_inputs() {
    replay("fault_rules", checks::fault_rules);
}

#[test]
fn fault_header_inputs() {
    replay("fault_headers", checks::fault_headers);
}

#[test]
fn admin_api_inputs() {
    replay("admin_api", checks::admin_api);
}
