//! The local sandbox demo; `cargo xtask demo` builds and runs it as root.

fn main() {
    if let Err(e) = shunt_tests::demo::run() {
        eprintln!("demo failed: {e:#}");
        eprintln!("run `cargo xtask test` for a full diagnosis, or rerun with SHUNT_LOG=debug");
        std::process::exit(1);
    }
}
