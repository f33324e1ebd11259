//! The daemon's YAML configuration.
//!
//! Parsing is strict: unknown fields are rejected and every error names the field it is about
//! (`intercept.exclude_cidrs[1]: invalid IP network syntax`), because a proxy that silently
//! ignores a misspelt option is worse than one that refuses to start.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub const DEFAULT_LISTEN_PORT: u16 = 15001;
pub const DEFAULT_MARK: u32 = 0x5348_554e; // "SHUN"
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/shunt";
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/shunt/admin.sock";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub intercept: Intercept,
    #[serde(default)]
    pub pods: Vec<PodConfig>,
    #[serde(default)]
    pub admin: Admin,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Intercept {
    /// cgroup v2 directory the programs attach to; `None` = the cgroup v2 mount's root.
    pub cgroup: Option<PathBuf>,
    pub listen_port: u16,
    pub fail_mode: FailMode,
    pub exclude_cidrs: Vec<IpNet>,
    pub exclude_ports: Vec<u16>,
    /// `SO_MARK` of shunt's own upstream sockets; the programs never redirect them.
    pub mark: u32,
    /// Where programs, links and maps are pinned on the BPF filesystem.
    pub pin_dir: PathBuf,
}

impl Default for Intercept {
    fn default() -> Self {
        Self {
            cgroup: None,
            listen_port: DEFAULT_LISTEN_PORT,
            fail_mode: FailMode::Open,
            exclude_cidrs: Vec::new(),
            exclude_ports: Vec::new(),
            mark: DEFAULT_MARK,
            pin_dir: PathBuf::from(DEFAULT_PIN_DIR),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// shunt down: enrolled pods' connections go direct.
    #[default]
    Open,
    /// shunt down: enrolled pods' connections are refused.
    Closed,
}

impl std::fmt::Display for FailMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PodConfig {
    pub name: String,
    /// A network namespace file, e.g. `/var/run/netns/client` or `/proc/<pid>/ns/net`.
    pub netns: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    pub socket: PathBuf,
}

impl Default for Admin {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_ADMIN_SOCKET),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|(field, message)| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            message,
        })
    }

    /// Parses and validates; the error is `(field path, message)`.
    pub fn parse(text: &str) -> Result<Config, (String, String)> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." {
                "(top level)".to_string()
            } else {
                field
            };
            (field, e.into_inner().to_string())
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let bad = |field: &str, message: &str| Err((field.to_string(), message.to_string()));
        if self.intercept.listen_port == 0 {
            return bad("intercept.listen_port", "must be between 1 and 65535");
        }
        if self.intercept.mark == 0 {
            return bad(
                "intercept.mark",
                "must be non-zero (0 is every unmarked socket)",
            );
        }
        for (i, port) in self.intercept.exclude_ports.iter().enumerate() {
            if *port == 0 {
                return bad(
                    &format!("intercept.exclude_ports[{i}]"),
                    "port 0 is not a port",
                );
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, pod) in self.pods.iter().enumerate() {
            if pod.name.is_empty() {
                return bad(&format!("pods[{i}].name"), "must not be empty");
            }
            if !names.insert(&pod.name) {
                return bad(
                    &format!("pods[{i}].name"),
                    &format!("duplicate pod name {:?}", pod.name),
                );
            }
            // Whether the namespace exists is checked when the pod is enrolled: a pod that
            // has gone is skipped, not a reason to refuse the whole configuration.
        }
        Ok(())
    }
}

/// Address helpers shared by the datapath and the admin API.
pub fn listener_addrs(port: u16) -> [SocketAddr; 2] {
    [
        SocketAddr::from(([127, 0, 0, 1], port)),
        SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> (String, String) {
        Config::parse(text).expect_err("config should be rejected")
    }

    #[test]
    fn defaults_apply() {
        let c = Config::parse("{}").unwrap();
        assert_eq!(c.intercept.listen_port, 15001);
        assert_eq!(c.intercept.fail_mode, FailMode::Open);
        assert_eq!(c.admin.socket, PathBuf::from("/run/shunt/admin.sock"));
    }

    #[test]
    fn full_example_parses() {
        let c = Config::parse(
            "intercept:\n  listen_port: 15006\n  fail_mode: closed\n  exclude_cidrs: [10.0.0.1/32, fd00::/8]\n  exclude_ports: [22]\npods: []\nadmin:\n  socket: /tmp/a.sock\n",
        )
        .unwrap();
        assert_eq!(c.intercept.listen_port, 15006);
        assert_eq!(c.intercept.fail_mode, FailMode::Closed);
        assert_eq!(c.intercept.exclude_cidrs.len(), 2);
        assert_eq!(c.intercept.exclude_ports, vec![22]);
    }

    #[test]
    fn unknown_field_is_named() {
        let (field, msg) = err("intercept:\n  listen_prot: 1\n");
        assert_eq!(field, "intercept.listen_prot");
        assert!(msg.contains("listen_prot"), "{msg}");
    }

    #[test]
    fn malformed_cidr_is_named() {
        let (field, msg) = err("intercept:\n  exclude_cidrs: [10.0.0.0/8, 10.0.0.300/32]\n");
        assert_eq!(field, "intercept.exclude_cidrs[1]");
        assert!(msg.contains("invalid"), "{msg}");
    }

    #[test]
    fn malformed_port_is_named() {
        let (field, _) = err("intercept:\n  exclude_ports: [80, 70000]\n");
        assert_eq!(field, "intercept.exclude_ports[1]");
        let (field, _) = err("intercept:\n  exclude_ports: [0]\n");
        assert_eq!(field, "intercept.exclude_ports[0]");
    }

    #[test]
    fn bad_fail_mode_is_named() {
        let (field, msg) = err("intercept:\n  fail_mode: sideways\n");
        assert_eq!(field, "intercept.fail_mode");
        assert!(msg.contains("open"), "{msg}");
    }

    #[test]
    fn missing_netns_is_left_to_enrollment() {
        // A pod that has gone is skipped when enrolling, not a reason to refuse the config.
        let config =
            Config::parse("pods:\n  - name: a\n    netns: /nonexistent/netns/a\n").expect("parses");
        assert_eq!(
            config.pods[0].netns,
            std::path::Path::new("/nonexistent/netns/a")
        );
    }

    #[test]
    fn duplicate_pod_is_named() {
        let (field, _) = err(
            "pods:\n  - {name: a, netns: /proc/self/ns/net}\n  - {name: a, netns: /proc/self/ns/net}\n",
        );
        assert_eq!(field, "pods[1].name");
    }
}
