//! Reloading the configuration (`SIGHUP`, `shunt reload`): the configuration the daemon
//! started with, the one last loaded, and swapping what may change at runtime into the data
//! path. A module of its own, below the daemon that creates it, so that the admin API can
//! reload and show the configuration without importing the daemon.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use arc_swap::ArcSwap;

use crate::{
    config::{Config, ConfigError, DESCRIPTORS_PER_CONNECTION, Limits, RESERVED_DESCRIPTORS},
    fault::Faults,
    proxy::Settings,
};

/// The configuration the daemon started with and the one last loaded; together they make
/// the configuration in force. Holds what a reload swaps into the data path.
pub struct Configs {
    path: PathBuf,
    running: Config,
    loaded: ArcSwap<Config>,
    settings: Arc<ArcSwap<Settings>>,
    faults: Arc<Faults>,
}

impl Configs {
    /// `running` as read from `path`; reloads store into `settings` and `faults`.
    pub fn new(
        path: &Path,
        running: Config,
        settings: Arc<ArcSwap<Settings>>,
        faults: Arc<Faults>,
    ) -> Configs {
        Configs {
            path: path.to_owned(),
            loaded: ArcSwap::from_pointee(running.clone()),
            running,
            settings,
            faults,
        }
    }

    /// The configuration in force: what reloads changed, and the start-up-only fields as
    /// the daemon started with them.
    pub fn in_force(&self) -> Config {
        self.loaded.load().in_force(&self.running)
    }

    /// The configuration as started (start-up-only fields are read from it).
    pub fn running(&self) -> &Config {
        &self.running
    }

    /// Re-reads the file and swaps in what can change at runtime (Services, detection and
    /// timeout settings, limits sized as at start, fault rules) for new connections. A
    /// configuration with any error changes nothing. Returns the new configuration and the
    /// changed fields that only a restart applies.
    pub fn reload(&self) -> Result<(Config, Vec<&'static str>), ConfigError> {
        match Config::load(&self.path) {
            Ok(mut config) => {
                // As at start: the limits left out fit the descriptors the daemon has now.
                config.limits = size_limits(&config.limits);
                let settings = Settings::new(&config);
                settings.routes.inherit(&self.settings.load().routes);
                self.settings.store(Arc::new(settings));
                self.faults
                    .set_config_rules(config.faults.clone(), config.max_active_faults);
                let restart_needed = config.needs_restart(&self.running);
                self.loaded.store(Arc::new(config.clone()));
                tracing::info!(services = config.services.len(), "configuration reloaded");
                if !restart_needed.is_empty() {
                    tracing::warn!(
                        fields = restart_needed.join(", "),
                        "these changes take effect only when shunt restarts"
                    );
                }
                Ok((config, restart_needed))
            }
            Err(e) => {
                tracing::error!("configuration not reloaded, the running one stays: {e}");
                Err(e)
            }
        }
    }
}

/// `limits` with the connection limits the configuration left out sized to the soft
/// open-file limit (`Limits::sized_to`), said at info level when that lowers them. Start-up
/// and every reload size them alike, so a reload never changes limits the file did not. Only
/// configured limits the descriptors cannot serve are warned about: past the descriptors,
/// `accept()` starts failing (and clients wait in the backlog) before the limit can refuse
/// them cleanly.
pub fn size_limits(limits: &Limits) -> Limits {
    let Some(open_files) = crate::open_files::OpenFiles::now() else {
        tracing::warn!("could not read the open-file limit; connection limits not sized to it");
        return limits.clone();
    };
    let crate::open_files::OpenFiles { soft, hard } = open_files;
    let sizing = limits.sized_to(soft);
    let (max_connections, max_connections_per_pod) = (
        sizing.limits.max_connections,
        sizing.limits.max_connections_per_pod,
    );
    if sizing.served == 0 {
        tracing::warn!(
            open_files_soft = soft,
            open_files_hard = hard,
            reserved = RESERVED_DESCRIPTORS,
            "the open-file limit leaves no descriptors for connections beyond the reserve: \
             raise the hard limit (e.g. LimitNOFILE=, ulimit -Hn)"
        );
    } else if sizing.reduced() {
        tracing::info!(
            open_files_soft = soft,
            open_files_hard = hard,
            max_connections,
            max_connections_per_pod,
            "connection limits sized to the open-file limit ({DESCRIPTORS_PER_CONNECTION} \
             descriptors per connection, {RESERVED_DESCRIPTORS} reserved); set \
             limits.max_connections to choose"
        );
    }
    if let Some(needed) = sizing.unserved.iter().map(|(_, n)| *n as u64).max() {
        let unserved: Vec<String> = sizing
            .unserved
            .iter()
            .map(|(field, n)| format!("{field} ({n})"))
            .collect();
        tracing::warn!(
            open_files_soft = soft,
            open_files_hard = hard,
            served = sizing.served,
            needed = needed
                .saturating_mul(DESCRIPTORS_PER_CONNECTION)
                .saturating_add(RESERVED_DESCRIPTORS),
            "{} configured beyond the {} connections the open-file limit serves: accept() may \
             fail before the limit refuses connections; raise the hard limit or lower {}",
            unserved.join(" and "),
            sizing.served,
            if unserved.len() > 1 { "them" } else { "it" }
        );
    }
    sizing.limits
}
