//! Finding the cgroup v2 hierarchy and making sure a BPF filesystem is mounted.

use std::path::{Path, PathBuf};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The cgroup v2 mount point. Nodes usually have it at `/sys/fs/cgroup`; hybrid hosts at
/// `/sys/fs/cgroup/unified`. Read from the mount table, never assumed.
pub fn cgroup2_mount() -> std::io::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, dir, fstype) = (fields.next()?, fields.next()?, fields.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .ok_or_else(|| std::io::Error::other("no cgroup2 filesystem is mounted"))
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        // `f_type` is i64 on x86_64 glibc but narrower elsewhere.
        .map(|s| {
            #[allow(clippy::unnecessary_cast)]
            let fs_type = s.filesystem_type().0 as i64;
            fs_type == BPF_FS_MAGIC
        })
        .unwrap_or(false)
}

/// Makes sure `pin_dir` lives on a BPF filesystem, mounting one at `/sys/fs/bpf` if that is
/// where it should be and nothing is mounted there yet (some minimal hosts don't mount it).
pub fn ensure_bpffs(pin_dir: &Path) -> std::io::Result<()> {
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if is_bpffs(existing) {
        return Ok(());
    }
    let default = Path::new("/sys/fs/bpf");
    if pin_dir.starts_with(default) && !is_bpffs(default) {
        std::fs::create_dir_all(default)?;
        nix::mount::mount(
            Some("bpf"),
            default,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(std::io::Error::from)?;
        tracing::info!("mounted a BPF filesystem at /sys/fs/bpf");
        return Ok(());
    }
    Err(std::io::Error::other(format!(
        "{} is not on a BPF filesystem (mount -t bpf bpf <dir>)",
        pin_dir.display()
    )))
}
