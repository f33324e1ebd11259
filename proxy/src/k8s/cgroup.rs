//! Finding a pod's processes: the kubelet puts every container of a pod in a cgroup whose
//! path names the pod's UID, in one of two forms:
//!
//! - systemd driver: `…/kubepods-burstable.slice/kubepods-burstable-pod<uid with _>.slice/…`
//!   (Guaranteed pods: `kubepods-pod<uid>.slice`);
//! - cgroupfs driver: `…/kubepods/burstable/pod<uid>/…` (Guaranteed: `kubepods/pod<uid>`).
//!
//! Paths are matched segment by segment wherever they appear, so a path seen from another
//! cgroup namespace (`/../../kubepods/…`) or under a prefix (kind's `kubelet.slice`) works.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

/// The pod UID a cgroup path names, if any.
pub fn pod_uid(cgroup_path: &str) -> Option<String> {
    cgroup_path.split('/').find_map(segment_uid)
}

fn segment_uid(segment: &str) -> Option<String> {
    let candidate = match segment.strip_suffix(".slice") {
        // systemd: the UID is the last dash-separated part, its dashes turned into `_`.
        Some(unit) => unit
            .rsplit_once('-')?
            .1
            .strip_prefix("pod")?
            .replace('_', "-"),
        None => segment.strip_prefix("pod")?.to_owned(),
    };
    is_uid(&candidate).then_some(candidate)
}

/// `8-4-4-4-12` hexadecimal digits: the form of every UID the API server assigns.
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The pod UID in a `/proc/<pid>/cgroup` file: lines `hierarchy:controllers:path`, v1 and v2.
pub fn pod_uid_of_process(cgroup_file: &str) -> Option<String> {
    cgroup_file
        .lines()
        .filter_map(|line| line.splitn(3, ':').nth(2))
        .find_map(pod_uid)
}

/// One process of each pod running on this host, by pod UID, from a scan of `proc_root`
/// (the host's `/proc`). A process that exits during the scan is skipped.
pub fn scan(proc_root: &Path) -> std::io::Result<HashMap<String, u32>> {
    let mut pods: HashMap<String, u32> = HashMap::new();
    for entry in std::fs::read_dir(proc_root)? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cgroup) = std::fs::read_to_string(entry.path().join("cgroup")) else {
            continue;
        };
        if let Some(uid) = pod_uid_of_process(&cgroup) {
            // The lowest pid is usually the pod's sandbox ("pause") process, the longest-lived.
            pods.entry(uid)
                .and_modify(|p| *p = (*p).min(pid))
                .or_insert(pid);
        }
    }
    Ok(pods)
}

/// The network namespace file of a process under `proc_root`.
pub fn netns_path(proc_root: &Path, pid: u32) -> PathBuf {
    proc_root.join(pid.to_string()).join("ns/net")
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0c6e0d54-4f3a-4b1e-9d5c-2f1a7e3b9c80";

    #[test]
    fn systemd_paths_name_the_pod() {
        for path in [
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0c6e0d54_4f3a_4b1e_9d5c_2f1a7e3b9c80.slice/cri-containerd-8f1e.scope",
            "/kubepods.slice/kubepods-pod0c6e0d54_4f3a_4b1e_9d5c_2f1a7e3b9c80.slice",
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod0c6e0d54_4f3a_4b1e_9d5c_2f1a7e3b9c80.slice/cri-containerd-1.scope",
            "/../../kubepods-besteffort-pod0c6e0d54_4f3a_4b1e_9d5c_2f1a7e3b9c80.slice/crio-2.scope",
        ] {
            assert_eq!(pod_uid(path).as_deref(), Some(UID), "{path}");
        }
    }

    #[test]
    fn cgroupfs_paths_name_the_pod() {
        for path in [
            "/kubepods/burstable/pod0c6e0d54-4f3a-4b1e-9d5c-2f1a7e3b9c80/8f1e2d",
            "/kubepods/pod0c6e0d54-4f3a-4b1e-9d5c-2f1a7e3b9c80/8f1e2d",
            "/shunt-sandbox-1a2b3c/kubepods/besteffort/pod0c6e0d54-4f3a-4b1e-9d5c-2f1a7e3b9c80",
        ] {
            assert_eq!(pod_uid(path).as_deref(), Some(UID), "{path}");
        }
    }

    #[test]
    fn other_paths_name_no_pod() {
        for path in [
            "/",
            "/user.slice/user-0.slice/session-1.scope",
            "/system.slice/containerd.service",
            "/kubepods.slice/kubepods-burstable.slice",
            "/kubepods/burstable",
            "/kubepods/burstable/pod0c6e0d54-4f3a-4b1e-9d5c",
            "/kubepods/burstable/podzzzzzzzz-4f3a-4b1e-9d5c-2f1a7e3b9c80",
            "/kubepods.slice/kubepods-pod0c6e0d54-4f3a-4b1e-9d5c-2f1a7e3b9c80.slice",
            "/pods/podcast",
        ] {
            assert_eq!(pod_uid(path), None, "{path}");
        }
    }

    #[test]
    fn cgroup_files_with_v1_and_v2_lines() {
        let file = format!(
            "12:cpu,cpuacct:/kubepods/besteffort/pod{UID}/abc\n0::/kubepods/besteffort/pod{UID}/abc\n"
        );
        assert_eq!(pod_uid_of_process(&file).as_deref(), Some(UID));
        assert_eq!(pod_uid_of_process("0::/init.scope\n"), None);
        assert_eq!(pod_uid_of_process("garbage without colons\n"), None);
    }

    #[test]
    fn scanning_this_host_finds_no_pod_in_our_own_cgroup() {
        // The test process runs outside any pod: a scan works and does not claim it is one.
        let pods = scan(Path::new("/proc")).expect("/proc is readable");
        let me = std::process::id();
        assert!(pods.values().all(|pid| *pid != me));
    }
}
