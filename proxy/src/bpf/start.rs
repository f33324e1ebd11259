//! What a start needs of the process before it loads anything, and undoing what a start
//! that failed had pinned: a daemon that cannot start leaves the kernel and bpffs as it found
//! them.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

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
