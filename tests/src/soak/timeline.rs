//! When each scheduled change was in force, in wall-clock milliseconds (the clock the
//! workload processes stamp their results with), so outcomes can be judged by when they
//! happened.

use std::{
    sync::Mutex,
    time::{Duration, SystemTime},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WindowKind {
    /// The abort rule is set.
    Fault,
    /// From the restart's first step until the new daemon answers.
    Restart,
    /// The churned endpoint is out of the Service.
    EndpointRemoved,
    /// The short-connection workload runs.
    ConnectionChurn,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Window {
    pub kind: WindowKind,
    pub from_ms: u64,
    /// `None` while still open.
    pub to_ms: Option<u64>,
}

#[derive(Default)]
pub struct Timeline {
    windows: Mutex<Vec<Window>>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Timeline {
    /// Opens (`on`) or closes a window of `kind` now.
    pub fn mark(&self, kind: WindowKind, on: bool) {
        let now = now_ms();
        let mut windows = self.lock();
        match on {
            true => windows.push(Window {
                kind,
                from_ms: now,
                to_ms: None,
            }),
            false => {
                if let Some(open) = windows
                    .iter_mut()
                    .rev()
                    .find(|w| w.kind == kind && w.to_ms.is_none())
                {
                    open.to_ms = Some(now);
                }
            }
        }
    }

    /// Whether `[from_ms, to_ms]` meets a window of `kind` widened by `before` and `after`.
    pub fn overlaps(
        &self,
        kind: WindowKind,
        (from_ms, to_ms): (u64, u64),
        before: Duration,
        after: Duration,
    ) -> bool {
        self.lock().iter().filter(|w| w.kind == kind).any(|w| {
            let start = w.from_ms.saturating_sub(before.as_millis() as u64);
            let end = w
                .to_ms
                .map_or(u64::MAX, |t| t.saturating_add(after.as_millis() as u64));
            from_ms <= end && to_ms >= start
        })
    }

    /// Whether `[from_ms, to_ms]` lies inside a window of `kind` once `settle` has passed
    /// from its start.
    pub fn inside(&self, kind: WindowKind, (from_ms, to_ms): (u64, u64), settle: Duration) -> bool {
        self.lock().iter().filter(|w| w.kind == kind).any(|w| {
            from_ms >= w.from_ms + settle.as_millis() as u64
                && w.to_ms.is_none_or(|end| to_ms <= end)
        })
    }

    pub fn windows(&self) -> Vec<Window> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Window>> {
        self.windows
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
