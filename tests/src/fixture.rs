//! What the integration tests share: the Service virtual address they dial, the
//! configuration of a Service, and one way to wait for a condition.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

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

/// Polls `check` every 50 ms until it gives `Ok(Some(value))`; a `None` or an error means
/// "not yet". After `within`, fails naming `what` and the last check's outcome.
pub fn eventually<T: std::fmt::Debug>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + within;
    loop {
        let last = check();
        if let Ok(Some(value)) = last {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("not so after {within:?}: {what} (last check: {last:?})");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`eventually`] for a condition that holds or not.
pub fn until(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    eventually(what, within, || Ok(check()?.then_some(())))
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
