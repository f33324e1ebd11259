//! What this kernel can do, found out before anything is loaded. A kernel that lacks
//! something the programs cannot run without is refused in one line naming the missing piece
//! and the minimum kernel; an optional feature it lacks is switched off, and `shunt status`
//! and `/metrics` say so.
//!
//! Program types, helpers and map types are probed by loading tiny programs (as `bpftool
//! feature probe` does), so a distribution kernel built without a piece is caught too; what
//! cannot be probed that way (attach types, the stream parser rule) goes by the version.
//! BTF is not needed: the programs use no CO-RE relocations, kfuncs or BTF-typed maps.

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};

use super::BpfError;

/// The oldest kernel with every hook and helper the programs need: the `getpeername`
/// hooks and the BPF ring buffer came in 5.8, after cgroup links and
/// `bpf_get_netns_cookie` in connect hooks (5.7).
const MINIMUM: Version = Version(5, 8);
const MINIMUM_NEEDS: &str = "the cgroup getpeername hooks (Linux 5.8)";

/// What the kernel offers beyond the minimum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// `uname -r`.
    pub release: String,
    /// sock_ops and sk_msg programs may call `bpf_get_netns_cookie` (5.15): the local fast
    /// path keys its sockets by it.
    pub local_fast_path: bool,
    /// A stream verdict runs on a sockmap without a stream parser (5.10):
    /// `forwarding: sockmap` attaches only a verdict.
    pub sockmap_forwarding: bool,
    /// `getsockopt(SO_NETNS_COOKIE)` (5.14). Without it a pod's namespace cookie is learned
    /// from the connect hook (see `NETNS_PROBE_PORT`).
    pub netns_cookie_sockopt: bool,
}

/// One optional feature, as `shunt status` and `/metrics` report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Feature {
    pub name: &'static str,
    pub available: bool,
    /// The kernel that has it and what it is.
    pub needs: &'static str,
}

const LOCAL_FAST_PATH_NEEDS: &str =
    "Linux 5.15 (bpf_get_netns_cookie in sock_ops and sk_msg programs)";
const SOCKMAP_FORWARDING_NEEDS: &str = "Linux 5.10 (a stream verdict without a stream parser)";
const NETNS_COOKIE_SOCKOPT_NEEDS: &str = "Linux 5.14 (SO_NETNS_COOKIE; without it the daemon \
    learns pods' namespace cookies through its connect4 program, so it must run inside the \
    cgroup the programs are attached to)";

impl Kernel {
    /// Probes the running kernel; refuses one below the minimum.
    pub fn probe() -> Result<Kernel, BpfError> {
        let release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let version = Version::parse(&release);
        let too_old = |needs: String| BpfError::KernelTooOld {
            release: release.clone(),
            minimum: MINIMUM.to_string(),
            needs,
        };
        if version.is_some_and(|v| v < MINIMUM) {
            return Err(too_old(MINIMUM_NEEDS.to_owned()));
        }
        for (program, what) in [
            (ProgramType::CgroupSockAddr, "cgroup sock_addr programs"),
            (ProgramType::SockOps, "sock_ops programs"),
        ] {
            if is_program_supported(program).ok() == Some(false) {
                return Err(too_old(what.to_owned()));
            }
        }
        let helper = |program, helper| is_helper_supported(program, helper).ok();
        if helper(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_netns_cookie,
        ) == Some(false)
        {
            return Err(too_old(
                "bpf_get_netns_cookie in connect hooks (Linux 5.7)".to_owned(),
            ));
        }
        if is_map_supported(MapType::RingBuf).ok() == Some(false) {
            return Err(too_old(
                "the BPF ring buffer the programs log through (Linux 5.8)".to_owned(),
            ));
        }

        // Unknown (the probe itself failed): assume yes and let the load say what is missing.
        let has = |program, h| helper(program, h).unwrap_or(true);
        let local_fast_path = has(ProgramType::SockOps, BpfHelper::BPF_FUNC_get_netns_cookie)
            && has(ProgramType::SkMsg, BpfHelper::BPF_FUNC_get_netns_cookie);
        let sockmap_forwarding = version.is_none_or(|v| v >= Version(5, 10))
            && is_program_supported(ProgramType::SkSkb).unwrap_or(true);
        Ok(Kernel {
            release,
            local_fast_path,
            sockmap_forwarding,
            netns_cookie_sockopt: netns_cookie_sockopt(),
        })
    }

    /// Every optional feature, available or not.
    pub fn features(&self) -> Vec<Feature> {
        vec![
            Feature {
                name: "local_fast_path",
                available: self.local_fast_path,
                needs: LOCAL_FAST_PATH_NEEDS,
            },
            Feature {
                name: "sockmap_forwarding",
                available: self.sockmap_forwarding,
                needs: SOCKMAP_FORWARDING_NEEDS,
            },
            Feature {
                name: "netns_cookie_sockopt",
                available: self.netns_cookie_sockopt,
                needs: NETNS_COOKIE_SOCKOPT_NEEDS,
            },
        ]
    }

    /// Why the local fast path is off on this kernel.
    pub fn local_fast_path_missing(&self) -> String {
        format!(
            "this kernel ({}) lacks it: needs {LOCAL_FAST_PATH_NEEDS}",
            self.release
        )
    }

    /// Why `forwarding: sockmap` is off on this kernel.
    pub fn sockmap_forwarding_missing(&self) -> String {
        format!(
            "this kernel ({}) lacks it: needs {SOCKMAP_FORWARDING_NEEDS}",
            self.release
        )
    }
}

/// Whether `SO_NETNS_COOKIE` answers, asked of a socket of the daemon's own namespace.
fn netns_cookie_sockopt() -> bool {
    let Ok(socket) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
    else {
        return true;
    };
    super::netns::netns_cookie(std::os::fd::AsFd::as_fd(&socket))
        .map_or_else(|e| e.raw_os_error() != Some(libc::ENOPROTOOPT), |_| true)
}

/// A kernel's major and minor version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Version(u32, u32);

impl Version {
    /// `5.10.0-28-amd64` → 5.10.
    fn parse(release: &str) -> Option<Version> {
        let mut parts = release.split(|c: char| !c.is_ascii_digit());
        Some(Version(
            parts.next()?.parse().ok()?,
            parts.next()?.parse().ok()?,
        ))
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse_to_major_and_minor() {
        assert_eq!(Version::parse("5.10.0-28-amd64"), Some(Version(5, 10)));
        assert_eq!(Version::parse("6.18.1"), Some(Version(6, 18)));
        assert_eq!(Version::parse("5.15"), Some(Version(5, 15)));
        assert_eq!(Version::parse("garbage"), None);
        assert!(Version::parse("5.4.0-200-generic").unwrap() < MINIMUM);
        assert!(Version::parse("5.10.0").unwrap() >= MINIMUM);
        assert_eq!(MINIMUM.to_string(), "5.8");
    }

    /// On a kernel that has every feature, the probes find every feature.
    #[test]
    fn a_new_kernel_has_every_feature() {
        if !nix::unistd::geteuid().is_root() {
            return; // Probing loads programs, which needs privileges.
        }
        let kernel = Kernel::probe().expect("this machine's kernel runs shunt");
        if Version::parse(&kernel.release).is_some_and(|v| v >= Version(5, 15)) {
            let missing: Vec<_> = kernel
                .features()
                .into_iter()
                .filter(|f| !f.available)
                .collect();
            assert!(missing.is_empty(), "{} lacks {missing:?}", kernel.release);
        }
    }
}
