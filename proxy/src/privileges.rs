//! The Linux capabilities the daemon runs with.
//!
//! `shunt run` starts as root (a privileged DaemonSet, or `sudo` in the sandbox) and, before
//! any thread exists, gives up every capability it does not use — in all of its threads,
//! since capabilities are per thread and each new thread inherits its creator's. What stays:
//!
//! | capability | why |
//! |---|---|
//! | `CAP_SYS_ADMIN` | loading and attaching BPF programs, pinning and reading maps (`bpf()`), and `setns()` into each pod's network namespace to open the in-pod listener and the upstream sockets |
//! | `CAP_NET_ADMIN` | `SO_MARK` on upstream sockets (the programs let marked sockets through), attaching cgroup socket programs |
//! | `CAP_SYS_PTRACE` | Kubernetes mode only: opening `/proc/<pid>/ns/net` of pods whose processes run as other users |
//! | `CAP_CHOWN` | only with `admin.group`: giving the admin socket to that group |
//! | `CAP_NET_BIND_SERVICE` | only when a configured port is below 1024 |
//!
//! Everything else — `CAP_DAC_OVERRIDE`, `CAP_SETUID`, `CAP_SYS_MODULE`, `CAP_KILL`, … — is
//! removed from the effective, permitted, inheritable, ambient and bounding sets, so neither
//! the daemon nor anything it could be tricked into running gets it back.

use caps::{CapSet, Capability, CapsHashSet};

use crate::config::Config;

/// What the daemon needs for `config`: the capabilities it must have, and those it keeps.
pub struct Needs {
    pub required: Vec<(Capability, &'static str)>,
}

impl Needs {
    pub fn for_config(config: &Config, kubernetes: bool) -> Needs {
        let mut required = vec![
            (
                Capability::CAP_SYS_ADMIN,
                "to load the BPF programs and enter pods' network namespaces",
            ),
            (
                Capability::CAP_NET_ADMIN,
                "to mark upstream sockets and attach cgroup socket programs",
            ),
        ];
        if kubernetes {
            required.push((
                Capability::CAP_SYS_PTRACE,
                "to open the network namespaces of pods running as other users",
            ));
        }
        if config.admin.group.is_some() {
            required.push((
                Capability::CAP_CHOWN,
                "to give the admin socket to admin.group",
            ));
        }
        let ports = [
            Some(config.intercept.listen_port),
            config.telemetry.metrics.port(),
            config.telemetry.health.port(),
        ];
        // Port 0 asks the kernel for a free port, never a privileged one.
        if ports
            .into_iter()
            .flatten()
            .any(|port| (1..1024).contains(&port))
        {
            required.push((
                Capability::CAP_NET_BIND_SERVICE,
                "to listen on a port below 1024",
            ));
        }
        Needs { required }
    }

    fn kept(&self) -> CapsHashSet {
        self.required.iter().map(|(cap, _)| *cap).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error(
        "shunt run needs {missing}, which this process does not have ({why}); run it as root, \
         or in Kubernetes as the privileged DaemonSet in deploy/"
    )]
    Missing {
        missing: Capability,
        why: &'static str,
    },
    #[error("reading or changing this process's capabilities: {0}")]
    Caps(#[from] caps::errors::CapsError),
}

/// Checks that every required capability is there, then drops all others. Call before the
/// process starts any thread: only the calling thread's sets change.
pub fn restrict_to(needs: &Needs) -> Result<(), PrivilegeError> {
    let effective = caps::read(None, CapSet::Effective)?;
    let permitted = caps::read(None, CapSet::Permitted)?;
    for (cap, why) in &needs.required {
        if !effective.contains(cap) && !permitted.contains(cap) {
            return Err(PrivilegeError::Missing { missing: *cap, why });
        }
    }
    let kept = needs.kept();
    // The bounding set first: dropping from it needs CAP_SETPCAP, which goes next.
    let bounding = caps::read(None, CapSet::Bounding)?;
    for cap in bounding.difference(&kept) {
        caps::drop(None, CapSet::Bounding, *cap)?;
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())?;
    caps::set(None, CapSet::Effective, &kept)?;
    caps::set(None, CapSet::Permitted, &kept)?;
    tracing::info!(
        kept = %names(&kept),
        "dropped every other capability"
    );
    Ok(())
}

fn names(set: &CapsHashSet) -> String {
    let mut names: Vec<String> = set.iter().map(|c| c.to_string()).collect();
    names.sort();
    names.join(", ")
}
