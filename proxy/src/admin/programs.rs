//! What the admin API reads from the loaded programs and asks of them. A trait, so the
//! handlers can be tested without a kernel; the daemon's loaded programs implement it.

use std::{collections::BTreeMap, path::PathBuf, sync::Mutex};

use super::api;
use crate::bpf::{self, Datapath};

/// The programs' attachment, as `shunt status` shows it.
pub struct ProgramsStatus {
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub attachment: api::Attachment,
    pub local_fast_path: String,
    pub local_fast_path_sockets: u64,
    pub kernel: api::KernelStatus,
}

pub trait Programs: Send + Sync {
    fn status(&self) -> ProgramsStatus;
    /// The programs' counters, by name.
    fn counters(&self) -> BTreeMap<&'static str, u64>;
    /// Removes every pin (programs, links, maps); returns the paths removed.
    fn uninstall(&self) -> Result<Vec<PathBuf>, String>;
}

impl Programs for Mutex<Datapath> {
    fn status(&self) -> ProgramsStatus {
        let datapath = self.lock().unwrap_or_else(|p| p.into_inner());
        ProgramsStatus {
            cgroup: datapath.cgroup.clone(),
            pin_dir: datapath.pin_dir.clone(),
            attachment: datapath.attachment.into(),
            local_fast_path: datapath.local_fast_path.to_string(),
            local_fast_path_sockets: datapath.local_fast_path_sockets(),
            kernel: (&datapath.kernel).into(),
        }
    }

    fn counters(&self) -> BTreeMap<&'static str, u64> {
        self.lock().unwrap_or_else(|p| p.into_inner()).counters()
    }

    fn uninstall(&self) -> Result<Vec<PathBuf>, String> {
        let pin_dir = self
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pin_dir
            .clone();
        bpf::uninstall(&pin_dir).map_err(|e| e.to_string())
    }
}
