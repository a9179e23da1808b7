//! Ctrl-C and SIGTERM (what a cluster's scheduler sends before it preempts a job) while a run
//! trains: the first one asks the run to stop after its current step, with a checkpoint there
//! (`Trainer::stop_when`), so `--resume` loses nothing; a second one ends the process at once.

use std::sync::atomic::{AtomicBool, Ordering};

static ASKED: AtomicBool = AtomicBool::new(false);

/// Which of [`SIGNALS`] the handler is installed for (and so puts back to the default on a first
/// signal).
#[cfg(unix)]
static INSTALLED: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];

#[cfg(unix)]
const SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

/// While alive, SIGINT and SIGTERM ask for a stop instead of ending the process (a signal the
/// process was started ignoring stays ignored). Dropping it puts the previous handlers back.
pub struct StopOnSignal {
    #[cfg(unix)]
    previous: Vec<(libc::c_int, libc::sighandler_t)>,
}

impl StopOnSignal {
    /// Installs the handlers.
    pub fn install() -> Self {
        ASKED.store(false, Ordering::SeqCst);
        #[cfg(unix)]
        {
            let mut previous = Vec::new();
            for (i, sig) in SIGNALS.into_iter().enumerate() {
                // SAFETY: `on_signal` only stores to an atomic and makes async-signal-safe calls.
                let prev = unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
                if prev == libc::SIG_IGN {
                    // SAFETY: puts back what was there.
                    unsafe { libc::signal(sig, libc::SIG_IGN) };
                } else if prev != libc::SIG_ERR {
                    INSTALLED[i].store(true, Ordering::SeqCst);
                    previous.push((sig, prev));
                }
            }
            Self { previous }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Whether a stop has been asked for since [`StopOnSignal::install`].
    pub fn asked(&self) -> bool {
        ASKED.load(Ordering::SeqCst)
    }
}

impl Drop for StopOnSignal {
    fn drop(&mut self) {
        #[cfg(unix)]
        for &(sig, prev) in &self.previous {
            // SAFETY: restores the handler that `install` replaced.
            unsafe { libc::signal(sig, prev) };
        }
        #[cfg(unix)]
        for installed in &INSTALLED {
            installed.store(false, Ordering::SeqCst);
        }
    }
}

#[cfg(unix)]
extern "C" fn on_signal(_sig: libc::c_int) {
    ASKED.store(true, Ordering::SeqCst);
    const MSG: &[u8] = b"\nstopping after this step, with a checkpoint there (send it again to stop at once)\n";
    // SAFETY: write(2) and signal(2) are async-signal-safe; the next SIGINT or SIGTERM ends the
    // process as it would have without this handler.
    unsafe {
        libc::write(2, MSG.as_ptr().cast(), MSG.len());
        for (sig, installed) in SIGNALS.into_iter().zip(&INSTALLED) {
            if installed.load(Ordering::SeqCst) {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// The handler installed for `sig` now.
    fn handler(sig: libc::c_int) -> libc::sighandler_t {
        // SAFETY: with a null new action, sigaction only reads the current one into `old`.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            assert_eq!(libc::sigaction(sig, std::ptr::null(), &mut old), 0);
            old.sa_sigaction
        }
    }

    #[test]
    fn a_first_signal_asks_for_a_stop_and_leaves_the_next_to_end_the_process() {
        let ours = on_signal as *const () as libc::sighandler_t;
        let before = SIGNALS.map(handler);
        // Installed and dropped: the handlers that were there are back (an ignored signal, as
        // SIGINT is in a job a shell starts with `&`, stays ignored throughout).
        let stop = StopOnSignal::install();
        for (sig, b) in SIGNALS.into_iter().zip(before) {
            assert_eq!(handler(sig), if b == libc::SIG_IGN { libc::SIG_IGN } else { ours }, "signal {sig}");
        }
        drop(stop);
        assert_eq!(SIGNALS.map(handler), before);
        // A first SIGTERM asks for a stop and puts back the default for both signals, so that a
        // second one ends the process at once.
        if before[1] != libc::SIG_DFL {
            return;
        }
        let stop = StopOnSignal::install();
        assert!(!stop.asked());
        // SAFETY: our handler is installed for SIGTERM; it only stores and writes to stderr.
        assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
        assert!(stop.asked());
        for (sig, b) in SIGNALS.into_iter().zip(before) {
            assert_eq!(handler(sig), if b == libc::SIG_IGN { libc::SIG_IGN } else { libc::SIG_DFL }, "signal {sig}");
        }
        drop(stop);
        assert_eq!(SIGNALS.map(handler), before);
    }
}
