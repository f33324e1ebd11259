//! Ctrl-C and SIGTERM for the long-running tools (demo, benchmark): whatever they are doing,
//! every sandbox of the process is cleaned up before it exits.

use anyhow::bail;

/// Blocks SIGINT and SIGTERM in the calling thread — and so in every thread it starts
/// afterwards: call it first — and waits for them on a thread of its own, which cleans up
/// the sandboxes and exits with status 130.
pub fn clean_up_on_signal() -> anyhow::Result<()> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            bail!("blocking SIGINT/SIGTERM failed");
        }
        set
    };
    std::thread::spawn(move || {
        let mut signal = 0;
        // SAFETY: `set` was initialised above; sigwait writes `signal`.
        if unsafe { libc::sigwait(&set, &mut signal) } == 0 {
            eprintln!("interrupted: cleaning up the sandbox");
            crate::sandbox::clean_up_all();
            std::process::exit(130);
        }
    });
    Ok(())
}
