//! The daemon's diagnostic log (`tracing` to stderr) and its filter, which `shunt log-level`
//! replaces at runtime without a restart.

use std::sync::OnceLock;

use tracing_subscriber::{
    EnvFilter, Registry, layer::SubscriberExt, reload, util::SubscriberInitExt,
};

type FilterHandle = reload::Handle<EnvFilter, Registry>;

static FILTER: OnceLock<FilterHandle> = OnceLock::new();

#[derive(Debug, thiserror::Error)]
pub enum LevelError {
    #[error("{0:?} is not a log filter (e.g. `debug`, `info,shunt=debug`): {1}")]
    Invalid(String, String),
    #[error("the log filter cannot be changed in this process")]
    NotReloadable,
}

/// `SHUNT_LOG` takes an `EnvFilter` directive (e.g. `debug`, `shunt=debug,h2=info`); the
/// default is `info`. Logs go to stderr, so `-o json` output on stdout stays
/// machine-readable, and so does an access log sent to stdout.
pub fn init() {
    let filter = EnvFilter::try_from_env("SHUNT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let _ = FILTER.set(handle);
    // `try_init` also routes the `log` crate (aya-log's records of the kernel programs) here.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .try_init();
}

/// The filter in force, as `EnvFilter` prints it.
pub fn current() -> String {
    FILTER
        .get()
        .and_then(|handle| handle.with_current(|filter| filter.to_string()).ok())
        .unwrap_or_else(|| "info".into())
}

/// Replaces the filter; later events are filtered by the new one. Returns it as parsed.
pub fn set(directives: &str) -> Result<String, LevelError> {
    let filter = EnvFilter::builder()
        .parse(directives)
        .map_err(|e| LevelError::Invalid(directives.to_owned(), e.to_string()))?;
    let handle = FILTER.get().ok_or(LevelError::NotReloadable)?;
    handle
        .reload(filter)
        .map_err(|_| LevelError::NotReloadable)?;
    let now = current();
    tracing::info!(filter = %now, "log filter changed");
    Ok(now)
}
