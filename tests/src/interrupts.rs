//! Ctrl-C and SIGTERM for the long-running tools (demo, benchmark): whatever they are doing,
//! every sandbox of the process is cleaned up before it exits.

use anyhow::bail;

/// Blocks SIGINT and SIGTERM in the calling thread — and so in every thread it starts
/// afterwards: call it first — and waits for them on a thread of its own, which cleans up
/// the sandboxes and exits with status 130.
pub fn clean_up_on_signal() -> anyhow::Result<()> {
    let Some(set) = crate::sys::Signals::block(&[libc::SIGINT, libc::SIGTERM]) else {
        bail!("blocking SIGINT/SIGTERM failed");
    };
    std::thread::spawn(move || {
        if set.wait().is_some() {
            eprintln!("interrupted: cleaning up the sandbox");
            crate::sandbox::clean_up_all();
            std::process::exit(130);
        }
    });
    Ok(())
}
