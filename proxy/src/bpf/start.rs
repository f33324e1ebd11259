//! What a start needs of the kernel before it loads anything, and undoing what a start that
//! failed had pinned: a daemon that cannot start leaves the kernel and bpffs as it found
//! them.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use super::BpfError;

/// The oldest kernel the programs load on, and what it is that older ones lack.
const MINIMUM_KERNEL: (u32, u32) = (5, 15);
const MINIMUM_KERNEL_NEEDS: &str = "the sock_ops and sk_msg programs read the network \
    namespace's cookie (bpf_get_netns_cookie), which the kernel allows them from 5.15 on";

/// Refuses, in one line naming the missing piece and the minimum, a kernel the programs
/// cannot load on, before anything is loaded.
pub fn check_kernel() -> Result<(), BpfError> {
    let Ok(uname) = nix::sys::utsname::uname() else {
        return Ok(()); // Unknown: let the load itself say what is missing.
    };
    let release = uname.release().to_string_lossy().into_owned();
    match parse_release(&release) {
        Some(version) if version < MINIMUM_KERNEL => Err(BpfError::KernelTooOld {
            release,
            minimum: format!("{}.{}", MINIMUM_KERNEL.0, MINIMUM_KERNEL.1),
            needs: MINIMUM_KERNEL_NEEDS,
        }),
        _ => Ok(()),
    }
}

/// `5.10.0-28-amd64` → (5, 10).
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Kernels before 5.11 charge BPF maps to `RLIMIT_MEMLOCK`, whose usual 64 KiB holds none of
/// shunt's. Raised while the daemon still has `CAP_SYS_RESOURCE` (it does not keep it);
/// newer kernels ignore the limit for BPF, so a failure only matters on old ones and is
/// said at debug level.
pub fn raise_memlock_limit() {
    use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
    if let Err(e) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        tracing::debug!("could not raise RLIMIT_MEMLOCK: {e}");
    }
}

/// Pins a start has made so far. Unless [`Rollback::keep`] is called once the daemon runs,
/// dropping it removes every pin (and directory) under the pin directory that was not there
/// when it was made: those of a fresh install, or anything new a takeover added. Pins that
/// were already there — a running daemon's, or one that stopped — are never touched.
pub struct Rollback {
    pin_dir: PathBuf,
    before: BTreeSet<PathBuf>,
    kept: bool,
}

impl Rollback {
    pub fn begin(pin_dir: &Path) -> Rollback {
        Rollback {
            pin_dir: pin_dir.to_owned(),
            before: entries(pin_dir),
            kept: false,
        }
    }

    /// The start succeeded: what it pinned stays.
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Rollback {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let made: Vec<PathBuf> = entries(&self.pin_dir)
            .into_iter()
            .filter(|path| !self.before.contains(path))
            .collect();
        // Deepest first, so each directory is empty by the time it is reached.
        let mut removed = 0;
        for path in made.iter().rev() {
            let result = match path.is_dir() {
                true => std::fs::remove_dir(path),
                false => std::fs::remove_file(path),
            };
            match result {
                Ok(()) => removed += 1,
                Err(e) => tracing::warn!("start-up failed; removing {}: {e}", path.display()),
            }
        }
        if removed > 0 {
            tracing::info!(
                pin_dir = %self.pin_dir.display(),
                "start-up failed: removed the {removed} pins and directories it had made"
            );
        }
    }
}

/// The pin directory, its `maps`, `links` and `progs` and their entries, parents first.
fn entries(pin_dir: &Path) -> BTreeSet<PathBuf> {
    let mut found = BTreeSet::new();
    if !pin_dir.exists() {
        return found;
    }
    found.insert(pin_dir.to_owned());
    for sub in ["maps", "links", "progs"] {
        let dir = pin_dir.join(sub);
        let Ok(children) = std::fs::read_dir(&dir) else {
            continue;
        };
        found.insert(dir);
        found.extend(children.flatten().map(|entry| entry.path()));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_parse_to_major_and_minor() {
        assert_eq!(parse_release("5.10.0-28-amd64"), Some((5, 10)));
        assert_eq!(parse_release("6.18.1"), Some((6, 18)));
        assert_eq!(parse_release("5.15"), Some((5, 15)));
        assert_eq!(parse_release("garbage"), None);
        assert!(parse_release("5.10.0").unwrap() < MINIMUM_KERNEL);
        assert!(parse_release("6.1.0-9-cloud-amd64").unwrap() >= MINIMUM_KERNEL);
    }

    /// On a plain directory: what was there stays, what was made after goes, deepest first.
    #[test]
    fn a_failed_start_removes_only_what_it_made() {
        let root = std::env::temp_dir().join(format!("shunt-rollback-{}", std::process::id()));
        let (old_map, new_map) = (root.join("maps/OLD"), root.join("maps/NEW"));
        std::fs::create_dir_all(root.join("maps")).unwrap();
        std::fs::write(&old_map, "").unwrap();

        let rollback = Rollback::begin(&root);
        std::fs::write(&new_map, "").unwrap();
        std::fs::create_dir_all(root.join("links")).unwrap();
        std::fs::write(root.join("links/connect4"), "").unwrap();
        drop(rollback);
        assert!(old_map.exists(), "what was there before stays");
        assert!(!new_map.exists() && !root.join("links").exists());

        let rollback = Rollback::begin(&root);
        std::fs::write(&new_map, "").unwrap();
        rollback.keep();
        assert!(new_map.exists(), "a start that succeeded keeps its pins");

        // A fresh install: the directory itself goes too.
        std::fs::remove_dir_all(&root).unwrap();
        let rollback = Rollback::begin(&root);
        std::fs::create_dir_all(root.join("progs")).unwrap();
        std::fs::write(root.join("progs/sock_ops"), "").unwrap();
        drop(rollback);
        assert!(!root.exists(), "{} removed", root.display());
    }
}
