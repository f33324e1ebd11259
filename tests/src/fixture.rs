//! What the integration tests share: the Service virtual address they dial, the
//! configuration of a Service, and one way to wait for a condition.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use crate::{daemon::Options, sandbox::Sandbox};

/// The virtual address of the tests' Services: nothing listens there, so a connection to it
/// succeeds only through shunt.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// [`VIP`] on `port`.
pub fn vip(port: u16) -> SocketAddr {
    SocketAddr::new(VIP.into(), port)
}

/// The `services:` section of a configuration with one Service, `name` at `vip`.
pub fn service_yaml(name: &str, vip: SocketAddr, endpoints: &[SocketAddr]) -> String {
    let list: Vec<String> = endpoints.iter().map(|e| format!("'{e}'")).collect();
    format!(
        "services:\n  - name: {name}\n    vip: '{vip}'\n    endpoints: [{}]\n",
        list.join(", ")
    )
}

/// Daemon options with one Service, `name` at `vip` in front of `endpoints`, and the
/// defaults for everything else: most tests need exactly this, and add to it.
pub fn service(name: &str, vip: SocketAddr, endpoints: &[SocketAddr]) -> Options {
    Options {
        extra_yaml: service_yaml(name, vip, endpoints),
        ..Options::default()
    }
}

/// Polls `check` every 50 ms until it gives `Ok(Some(value))`; a `None` or an error means
/// "not yet", except an error from [`give_up`], which ends the wait at once. After `within`,
/// fails naming `what` and the last check's outcome.
pub fn eventually<T: std::fmt::Debug>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + within;
    loop {
        let last = check();
        match last {
            Ok(Some(value)) => return Ok(value),
            Err(e) if e.is::<GaveUp>() => return Err(e),
            _ if Instant::now() >= deadline => {
                anyhow::bail!("not so after {within:?}: {what} (last check: {last:?})");
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// The error for a check of [`eventually`] to return when waiting longer cannot help (the
/// process it waits for has exited, say): the wait fails at once, with `why`.
pub fn give_up(why: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(GaveUp(why.to_string()))
}

/// What [`give_up`] makes: [`eventually`] tells it from a "not yet" by its type.
#[derive(Debug)]
struct GaveUp(String);

impl std::fmt::Display for GaveUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GaveUp {}

/// [`eventually`] for a condition that holds or not.
pub fn until(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    eventually(what, within, || Ok(check()?.then_some(())))
}

/// Waits (at most `within`) for the sandbox process `pid` to exit; past that, kills it and
/// fails naming `what`. For background clients whose output is read once they are done.
pub fn exited(sandbox: &Sandbox, pid: u32, what: &str, within: Duration) -> anyhow::Result<()> {
    until(what, within, || Ok(!sandbox.is_running(pid))).inspect_err(|_| sandbox.kill(pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_until_the_condition_holds_and_names_it_when_it_never_does() {
        let mut calls = 0;
        let value = eventually("third call", Duration::from_secs(5), || {
            calls += 1;
            Ok((calls == 3).then_some(calls))
        })
        .unwrap();
        assert_eq!(value, 3);
        let err = until("never", Duration::from_millis(120), || Ok(false)).unwrap_err();
        assert!(err.to_string().contains("never"), "{err}");
        let err = until("failing", Duration::from_millis(120), || {
            anyhow::bail!("boom")
        })
        .unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
    }

    #[test]
    fn giving_up_ends_the_wait_at_once() {
        let mut calls = 0;
        let started = Instant::now();
        let err = until("hopeless", Duration::from_secs(30), || {
            calls += 1;
            Err(give_up("the server exited"))
        })
        .unwrap_err();
        assert_eq!(calls, 1);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(err.to_string(), "the server exited");
    }

    #[test]
    fn a_service_section_lists_its_endpoints() {
        let yaml = service_yaml(
            "greeter",
            vip(50051),
            &[
                "10.200.0.11:50051".parse().unwrap(),
                "[fd00::11]:50051".parse().unwrap(),
            ],
        );
        assert_eq!(
            yaml,
            "services:\n  - name: greeter\n    vip: '10.96.0.10:50051'\n    endpoints: ['10.200.0.11:50051', '[fd00::11]:50051']\n"
        );
    }
}
