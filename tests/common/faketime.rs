//! Workers whose wall clock is off: libfaketime, preloaded.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The library the `faketime` command preloads. The workers are started with it preloaded
/// directly (what `faketime` does), because the `faketime` command forks: its pid would not be
/// the worker's, and killing it would leave the worker running.
pub fn libfaketime() -> Option<PathBuf> {
    let works = Command::new("faketime")
        .args(["-f", "+0", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        return None;
    }
    let dirs = std::fs::read_dir("/usr/lib")
        .ok()?
        .flatten()
        .map(|e| e.path());
    ["/usr/lib", "/usr/local/lib"]
        .into_iter()
        .map(PathBuf::from)
        .chain(dirs)
        .map(|dir| dir.join("faketime/libfaketime.so.1"))
        .find(|lib| lib.is_file())
}
