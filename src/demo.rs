//! The embedded demo (design §7): a shapes-world LLaVA and CLIP in the Hugging Face layout with
//! Bella particles, compiled into the binary from `demo/` and written to a cache directory on first
//! use, so that the same loading code path reads them as any local model.
//!
//! Processes take turns at unpacking (a lock file `.demo-<hash>.lock` in the cache). One that
//! waits for another says so after a second, naming the lock file and the process, and gives up
//! after [`LOCK_WAIT_ENV`] seconds (default 120) with [`LockTimedOut`]: a holder that is stopped
//! (Ctrl-Z) or hung never makes it wait without end.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

mod files {
    include!(concat!(env!("OUT_DIR"), "/demo_files.rs"));
}
use files::FILES;

/// The demo LLaVA (relative to the demo directory).
pub const LLAVA: &str = "llava";
/// The demo CLIP.
pub const CLIP: &str = "clip";
/// The calibrated Bella particles used by default with the demo LLaVA.
pub const PARTICLES: &str = "particles/llava-ensemble";

/// The variable that sets how many seconds to wait for another process's unpacking of the demo
/// (default [`DEFAULT_LOCK_WAIT`]).
pub const LOCK_WAIT_ENV: &str = "BELLA_DEMO_LOCK_TIMEOUT_SECS";

/// How long to wait for another process's unpacking of the demo without [`LOCK_WAIT_ENV`].
pub const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(120);

/// After this long waiting for the lock, a note says for what.
const LOCK_NOTE_AFTER: Duration = Duration::from_secs(1);

/// Another process held the demo's lock file for longer than the limit.
#[derive(Debug, thiserror::Error)]
#[error(
    "the demo model's lock file {} is held by another bella-vqa ({holder}) that is unpacking the \
     demo into the cache, and it did not finish in {} s: it may be stopped (Ctrl-Z: resume it with \
     `fg` or `kill -CONT`) or hung (end it): then run this again; or point BELLA_VQA_CACHE at \
     another folder ({LOCK_WAIT_ENV} waits longer)",
    path.display(),
    waited.as_secs_f64().round()
)]
pub struct LockTimedOut {
    pub path: PathBuf,
    /// "process PID" as the holder wrote it, or "process unknown" when it wrote none.
    pub holder: String,
    pub waited: Duration,
}

/// The wait of [`LOCK_WAIT_ENV`] (seconds, > 0; unset, empty or not such a number: the default).
fn lock_wait() -> Duration {
    std::env::var(LOCK_WAIT_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86_400.0)
        .map_or(DEFAULT_LOCK_WAIT, Duration::from_secs_f64)
}

/// Whether this binary carries the demo.
pub fn available() -> bool {
    FILES.iter().any(|(name, _)| name.starts_with("llava/"))
}

/// The directory the embedded demo files live in (written there on first use):
/// [`crate::io::cache_dir`], then `demo-<hash of the contents>`.
pub fn directory() -> Result<PathBuf> {
    // Hashing and checking the embedded files is start-up work: once per process.
    static DIRECTORY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    if let Some(dir) = DIRECTORY.get() {
        return Ok(dir.clone());
    }
    let dir = write_or_find()?;
    Ok(DIRECTORY.get_or_init(|| dir).clone())
}

/// The cache directory of the embedded files, written (or repaired) if needed.
fn write_or_find() -> Result<PathBuf> {
    if !available() {
        bail!("this binary was built without the demo model (demo/ was empty): pass --model");
    }
    let mut hasher = Sha256::new();
    for (name, bytes) in FILES {
        hasher.update(name.as_bytes());
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    let digest = format!("{:x}", hasher.finalize());
    let root = crate::io::cache_dir()?;
    let dir = root.join(format!("demo-{}", &digest[..16]));
    if dir.join(".complete").exists() && intact(&dir)? {
        return Ok(dir);
    }
    unpack(&root, &dir, &digest[..16]).map_err(|e| {
        // Not a matter of space or permissions: said as it is.
        if e.is::<LockTimedOut>() {
            return e;
        }
        let todo = if crate::io::DiskFull::caused(&e) {
            "free space there, or point BELLA_VQA_CACHE at a folder with room"
        } else {
            "point BELLA_VQA_CACHE at a folder you can write to"
        };
        e.context(format!(
            "cannot unpack the demo model into the cache directory {} ($BELLA_VQA_CACHE, else \
             $XDG_CACHE_HOME/bella-vqa, else ~/.cache/bella-vqa): {todo}",
            root.display()
        ))
    })
}

/// Writes the demo files as `dir` in `root` (replacing a damaged copy), one process at a time.
fn unpack(root: &Path, dir: &Path, tag: &str) -> Result<PathBuf> {
    crate::io::create_cache_dir(root)?;
    // Taken while a copy is checked, repaired or written: a process that waited for another's
    // repair uses it instead of moving it away. Where files cannot be locked, the renames below
    // still keep copies whole.
    let _lock = lock(&root.join(format!(".demo-{tag}.lock")), lock_wait())?;
    if dir.join(".complete").exists() && intact(dir)? {
        return Ok(dir.to_path_buf());
    }
    // Copies are placed whole, with their marker: anything else there is a damaged copy (a file
    // truncated, edited or removed, the marker too) or something else in its place, and is
    // written again from the binary.
    if std::fs::symlink_metadata(dir).is_ok() {
        crate::note!(
            "note: the demo copy in {} was damaged; writing it again",
            dir.display()
        );
        let stale = crate::io::temp_name(&root.join(format!("demo-stale-{tag}")))?;
        match std::fs::rename(dir, &stale) {
            // Another process moved it first (to repair it): write our own, or use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            moved => moved.and_then(|()| match std::fs::symlink_metadata(&stale) {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(&stale),
                _ => std::fs::remove_file(&stale),
            }),
        }
        .with_context(|| {
            format!(
                "cannot replace the damaged demo copy {}: remove it by hand",
                dir.display()
            )
        })?;
    }
    // What a killed first use left (a copy of the demo each time) goes first.
    crate::io::remove_stale_temps(root);
    // Written into a fresh temporary directory, then renamed into place; this process's own
    // temporary copy goes at once on a failure (a full disk), not an hour later.
    let tmp = crate::io::temp_name(dir)?;
    let _ = std::fs::remove_dir_all(&tmp);
    let written = FILES
        .iter()
        .chain([&(".complete", &b""[..])])
        .try_for_each(|(name, bytes)| {
            let path = tmp.join(name);
            if let Some(parent) = path.parent() {
                crate::io::create_cache_dir(parent)?;
            }
            std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
        });
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if std::fs::rename(&tmp, dir).is_err() {
        // Another process won the race: use its copy.
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.join(".complete").exists() {
            bail!(
                "cannot place the demo model in {}: something else took its place; remove it",
                dir.display()
            );
        }
    }
    Ok(dir.to_path_buf())
}

/// Locks `path` (created if missing) for this process and writes its PID there, waiting at most
/// `limit` for another holder (with a note after [`LOCK_NOTE_AFTER`]). `None` where the file
/// cannot be created or locked (a read-only cache, a file system without locks): unpacking goes
/// on without (see [`unpack`]).
fn lock(path: &Path, limit: Duration) -> Result<Option<std::fs::File>, LockTimedOut> {
    let Ok(mut file) = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
    else {
        return Ok(None);
    };
    let start = Instant::now();
    let mut noted = false;
    loop {
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => break,
            Err(fs4::TryLockError::Error(_)) => return Ok(None),
            Err(fs4::TryLockError::WouldBlock) => {}
        }
        let waited = start.elapsed();
        if waited >= limit {
            return Err(LockTimedOut {
                path: path.to_path_buf(),
                holder: holder(&mut file),
                waited,
            });
        }
        if waited >= LOCK_NOTE_AFTER && !noted {
            noted = true;
            crate::note!(
                "note: waiting for {}: another bella-vqa ({}) is unpacking the demo model into \
                 the cache (giving up after {} s)",
                path.display(),
                holder(&mut file),
                limit.as_secs_f64().round()
            );
        }
        std::thread::sleep(Duration::from_millis(50).min(limit - waited));
    }
    // Who holds it, for a process that waits (best effort: the lock is what counts).
    let _ = file
        .rewind()
        .and_then(|()| file.set_len(0))
        .and_then(|()| file.write_all(std::process::id().to_string().as_bytes()));
    Ok(Some(file))
}

/// The holder a lock file names: "process PID", or "process unknown" when it names none.
fn holder(file: &mut std::fs::File) -> String {
    let mut pid = String::new();
    let _ = file
        .rewind()
        .and_then(|()| file.read_to_string(&mut pid).map(drop));
    match pid.trim() {
        p if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => format!("process {p}"),
        _ => "process unknown".to_string(),
    }
}

/// Whether every demo file in `dir` still holds what the binary carries (a missing file, or a
/// FIFO or any other non-regular file in its place, does not: it is never opened, which could
/// block). A file that cannot be read (too many open files, no memory, an I/O error) is an
/// error, not a damaged copy: moving a good copy away would pull it from under other processes.
fn intact(dir: &Path) -> Result<bool> {
    for (name, bytes) in FILES {
        let path = dir.join(name);
        let cannot = || format!("cannot read the demo copy's {}", path.display());
        let meta = match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            meta => meta.with_context(cannot)?,
        };
        if !meta.is_file() || meta.len() != bytes.len() as u64 {
            return Ok(false);
        }
        if std::fs::read(&path).with_context(cannot)? != *bytes {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The candidate answers of `demo` (a component, as [`crate::hub::demo_model`] names it) when
/// neither an answer list nor particles (which bring theirs) are given: the demo CLIP's ship
/// with it (`answers.txt`); `None` for everything else.
pub fn default_answers(demo: Option<&str>, particles_given: bool) -> Result<Option<PathBuf>> {
    match demo {
        Some(CLIP) if !particles_given => Ok(Some(path(CLIP)?.join("answers.txt"))),
        _ => Ok(None),
    }
}

/// A demo component (`LLAVA`, `CLIP`, `PARTICLES`, …) as a directory.
pub fn path(component: &str) -> Result<PathBuf> {
    let dir = directory()?.join(component);
    if !dir.is_dir() {
        bail!("the demo has no {component}");
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_is_given_up_after_the_limit_naming_it_and_taken_once_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".demo-test.lock");
        // A second handle on the same file holds the lock (flock: per open file).
        let held = lock(&path, Duration::from_secs(1)).unwrap().unwrap();
        let start = Instant::now();
        let err = lock(&path, Duration::from_millis(300)).unwrap_err();
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(300) && waited < Duration::from_secs(10),
            "{waited:?}"
        );
        assert_eq!(err.path, path);
        assert_eq!(err.holder, format!("process {}", std::process::id()));
        let message = err.to_string();
        for part in [
            path.display().to_string(),
            format!("process {}", std::process::id()),
            "kill -CONT".into(),
            "BELLA_VQA_CACHE".into(),
            LOCK_WAIT_ENV.into(),
        ] {
            assert!(message.contains(&part), "{part:?} not in {message}");
        }
        // Released while another waits: that one takes it.
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(held);
        });
        assert!(lock(&path, Duration::from_secs(20)).unwrap().is_some());
        release.join().unwrap();
    }
}
