//! One run per run directory: a run claims its directory with an exclusive `flock` on
//! [`RUN_LOCK_FILE`], so that a second process started on the same directory (a `--resume` while
//! the first still trains, a requeued job) is refused instead of writing its checkpoints,
//! metrics and model over the first one's.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use crate::error::{io, Result, TrainError};

/// The file in a run directory whose lock marks the run as in progress; it holds the process id
/// of the run that last claimed the directory.
pub const RUN_LOCK_FILE: &str = ".lock";

/// The run directories this process holds, so that claiming one twice in one process (the
/// caller, then [`crate::Trainer::run`]) shares the claim: two `flock`s of one file from one
/// process conflict like two processes' would.
static HELD: Mutex<Vec<(PathBuf, Weak<File>)>> = Mutex::new(Vec::new());

/// A claim on a run directory, held until the last clone is dropped (or the process ends, even
/// killed: the operating system lets go of the lock).
#[derive(Debug, Clone)]
pub struct RunLock {
    _file: Option<Arc<File>>,
}

impl RunLock {
    /// Claims the existing directory `dir` for this process. Fails with [`TrainError::InUse`]
    /// when another process holds it; a second claim from this process succeeds. Where the file
    /// system cannot lock, warns and returns an empty claim: the run goes ahead unprotected.
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        let canonical = dir.canonicalize().map_err(io(dir))?;
        let mut held = HELD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        held.retain(|(_, f)| f.strong_count() > 0);
        if let Some(file) = held.iter().find(|(p, _)| *p == canonical).and_then(|(_, f)| f.upgrade()) {
            return Ok(RunLock { _file: Some(file) });
        }
        let path = canonical.join(RUN_LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let pid = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse().ok());
                return Err(TrainError::InUse { dir: dir.to_path_buf(), pid });
            }
            Err(std::fs::TryLockError::Error(e)) => {
                eprintln!(
                    "warning: cannot lock {} ({e}); a second run started in {} would not be stopped",
                    path.display(),
                    dir.display()
                );
                return Ok(RunLock { _file: None });
            }
        }
        file.set_len(0).map_err(io(&path))?;
        write!(file, "{}", std::process::id()).map_err(io(&path))?;
        let file = Arc::new(file);
        held.push((canonical, Arc::downgrade(&file)));
        Ok(RunLock { _file: Some(file) })
    }
}

/// Whether a run holds `dir` now ([`RunLock`]): a run still training there. Only looks: the
/// lock file is neither created nor written, and nothing is held after it returns. `false` for
/// a directory that no run ever claimed, and where the file system cannot lock.
pub fn is_held(dir: &Path) -> bool {
    let Ok(file) = File::open(dir.join(RUN_LOCK_FILE)) else { return false };
    matches!(file.try_lock_shared(), Err(std::fs::TryLockError::WouldBlock))
}

/// The process id in `dir`'s lock file: the run that claimed the directory last (training now
/// if [`is_held`]).
pub fn holder_pid(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join(RUN_LOCK_FILE)).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Another holder of the lock (here a second open file, which `flock` treats as another
    /// process would be treated) makes a claim fail, naming the pid in the file; this process's
    /// own claims share one lock, which goes when the last one is dropped.
    #[test]
    fn a_directory_held_elsewhere_is_refused_and_claims_in_one_process_share() {
        let dir = tempfile::tempdir().unwrap();
        let other = std::fs::File::create(dir.path().join(RUN_LOCK_FILE)).unwrap();
        other.lock().unwrap();
        std::fs::write(dir.path().join(RUN_LOCK_FILE), "4242").unwrap();
        assert!(is_held(dir.path()) && holder_pid(dir.path()) == Some(4242));
        let e = RunLock::acquire(dir.path()).unwrap_err();
        assert!(matches!(e, TrainError::InUse { pid: Some(4242), .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("4242") && msg.contains(&dir.path().display().to_string()), "{msg}");
        drop(other);

        assert!(!is_held(dir.path()), "released");
        let first = RunLock::acquire(dir.path()).unwrap();
        let pid = std::fs::read_to_string(dir.path().join(RUN_LOCK_FILE)).unwrap();
        assert_eq!(pid, std::process::id().to_string());
        assert!(is_held(dir.path()));
        assert_eq!(holder_pid(dir.path()), Some(std::process::id()));
        let second = RunLock::acquire(&dir.path().join(".")).unwrap(); // the same directory, spelt otherwise
        let probe = std::fs::File::open(dir.path().join(RUN_LOCK_FILE)).unwrap();
        assert!(probe.try_lock().is_err(), "held while claims remain");
        drop(first);
        assert!(probe.try_lock().is_err(), "held while one claim remains");
        drop(second);
        probe.try_lock().expect("released with the last claim");
        drop(probe);
        assert!(!is_held(dir.path()), "released");
        assert!(!is_held(&dir.path().join("never-claimed")));
    }
}
