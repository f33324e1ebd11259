//! Readiness: the programs are attached and the pods' listeners are up. Liveness is the
//! process answering at all.

use std::sync::{
    OnceLock,
    atomic::{AtomicU8, Ordering},
};

const STARTING: u8 = 0;
const READY: u8 = 1;
const STOPPING: u8 = 2;

/// A check made on every `/ready`: what is wrong, if anything.
type Probe = Box<dyn Fn() -> Option<String> + Send + Sync>;

#[derive(Default)]
pub struct Health {
    state: AtomicU8,
    probe: OnceLock<Probe>,
}

impl Health {
    /// Start-up is done: programs attached, configured pods enrolled (or reported and
    /// skipped), their listeners open. `probe` keeps checking what can break later.
    pub fn set_ready(&self, probe: impl Fn() -> Option<String> + Send + Sync + 'static) {
        let _ = self.probe.set(Box::new(probe));
        self.state.store(READY, Ordering::Release);
    }

    /// The listeners are closing: load balancers and the kubelet should stop counting on
    /// this node's proxy.
    pub fn set_stopping(&self) {
        self.state.store(STOPPING, Ordering::Release);
    }

    /// `Ok` when ready, else why not.
    pub fn ready(&self) -> Result<(), String> {
        match self.state.load(Ordering::Acquire) {
            STARTING => Err("starting".into()),
            STOPPING => Err("stopping".into()),
            _ => match self.probe.get().and_then(|probe| probe()) {
                Some(problem) => Err(problem),
                None => Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_between_start_and_stop_and_while_the_probe_passes() {
        let health = Health::default();
        assert_eq!(health.ready(), Err("starting".into()));
        let broken = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = broken.clone();
        health.set_ready(move || seen.load(Ordering::Relaxed).then(|| "detached".into()));
        assert_eq!(health.ready(), Ok(()));
        broken.store(true, Ordering::Relaxed);
        assert_eq!(health.ready(), Err("detached".into()));
        broken.store(false, Ordering::Relaxed);
        health.set_stopping();
        assert_eq!(health.ready(), Err("stopping".into()));
    }
}
