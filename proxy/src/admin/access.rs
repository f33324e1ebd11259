//! Who may use the admin socket: root, and the members of `admin.group` when one is set.
//!
//! The socket file's mode already keeps others from connecting (`0600`, or `0660` owned by
//! the group); each connection's peer credentials (`SO_PEERCRED`) are checked as well, so a
//! socket whose mode was loosened, or a descriptor passed to another process, grants
//! nothing more.

use std::path::Path;

use nix::unistd::{Gid, Group};
use tokio::net::{UnixStream, unix::UCred};

use super::AdminError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    group: Option<Gid>,
}

impl Access {
    /// Resolves `admin.group`: a group name known to this host, or a numeric id.
    pub fn new(group: Option<&str>) -> Result<Access, AdminError> {
        let Some(group) = group else {
            return Ok(Access { group: None });
        };
        let gid = match group.parse::<u32>() {
            Ok(gid) => Gid::from_raw(gid),
            Err(_) => match Group::from_name(group) {
                Ok(Some(found)) => found.gid,
                Ok(None) => return Err(AdminError::NoSuchGroup(group.to_owned())),
                Err(e) => {
                    return Err(AdminError::NoSuchGroup(format!(
                        "{group} (looking it up: {e})"
                    )));
                }
            },
        };
        Ok(Access { group: Some(gid) })
    }

    pub fn group(&self) -> Option<Gid> {
        self.group
    }

    /// The socket file's mode: root only, or root and the group.
    pub fn mode(&self) -> u32 {
        match self.group {
            None => 0o600,
            Some(_) => 0o660,
        }
    }

    /// Gives the socket file to the group, if there is one.
    pub fn apply(&self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if let Some(gid) = self.group {
            std::os::unix::fs::chown(path, None, Some(gid.as_raw()))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(self.mode()))
    }

    /// `Ok` when the connection's peer may use the API, or why it may not.
    pub fn check(&self, stream: &UnixStream) -> Result<(), String> {
        let cred = stream
            .peer_cred()
            .map_err(|e| format!("reading the peer's credentials: {e}"))?;
        self.allows(&cred_of(cred))
    }

    fn allows(&self, peer: &Peer) -> Result<(), String> {
        if peer.uid == 0 {
            return Ok(());
        }
        let Some(group) = self.group.map(Gid::as_raw) else {
            return Err(format!(
                "uid {} may not use the admin API: it is root-only (set admin.group to admit a group)",
                peer.uid
            ));
        };
        if peer.gid == group || peer.groups.contains(&group) {
            return Ok(());
        }
        Err(format!(
            "uid {} may not use the admin API: it is neither root nor in admin.group (gid {group})",
            peer.uid
        ))
    }
}

/// A connecting process: its user, primary group and supplementary groups.
#[derive(Debug)]
struct Peer {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
}

fn cred_of(cred: UCred) -> Peer {
    // SO_PEERCRED carries the primary group only; the others are in /proc. A peer that
    // exited in between has no groups to offer, and is refused unless root or primary.
    let groups = cred
        .pid()
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .map(|status| supplementary_groups(&status))
        .unwrap_or_default();
    Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        groups,
    }
}

/// The `Groups:` line of `/proc/<pid>/status`.
fn supplementary_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Groups:"))
        .map(|ids| {
            ids.split_whitespace()
                .filter_map(|id| id.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> Peer {
        Peer {
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn root_only_without_a_group() {
        let access = Access::new(None).unwrap();
        assert_eq!(access.mode(), 0o600);
        assert!(access.allows(&peer(0, 0, &[])).is_ok());
        let refused = access.allows(&peer(1000, 1000, &[0])).unwrap_err();
        assert!(refused.contains("root-only"), "{refused}");
    }

    #[test]
    fn a_group_admits_its_members_by_primary_or_supplementary_group() {
        let access = Access::new(Some("4242")).unwrap();
        assert_eq!(access.mode(), 0o660);
        assert!(access.allows(&peer(1000, 4242, &[])).is_ok());
        assert!(access.allows(&peer(1000, 1000, &[27, 4242])).is_ok());
        assert!(access.allows(&peer(0, 0, &[])).is_ok());
        let refused = access.allows(&peer(1000, 1000, &[27])).unwrap_err();
        assert!(refused.contains("gid 4242"), "{refused}");
    }

    #[test]
    fn an_unknown_group_name_is_an_error_naming_it() {
        let e = Access::new(Some("no-such-group-shunt")).unwrap_err();
        assert!(e.to_string().contains("no-such-group-shunt"), "{e}");
    }

    #[test]
    fn groups_are_read_from_proc_status() {
        let status = "Name:\tsh\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 27 \nNgid:\t0\n";
        assert_eq!(supplementary_groups(status), vec![4, 24, 27]);
        assert_eq!(supplementary_groups("Groups:\t\n"), Vec::<u32>::new());
        assert_eq!(supplementary_groups("garbage"), Vec::<u32>::new());
    }
}
