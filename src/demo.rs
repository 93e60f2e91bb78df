//! The embedded demo (design §7): a shapes-world LLaVA and CLIP in the Hugging Face layout with
//! Bella particles, compiled into the binary from `demo/` and written to a cache directory on first
//! use, so that the same loading code path reads them as any local model.

use std::path::{Path, PathBuf};

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

/// Whether this binary carries the demo.
pub fn available() -> bool {
    FILES.iter().any(|(name, _)| name.starts_with("llava/"))
}

/// The directory the embedded demo files live in (written there on first use):
/// `$BELLA_VQA_CACHE` or `~/.cache/bella-vqa`, then `demo-<hash of the contents>`.
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
    let root = crate::io::cache_dir();
    let dir = root.join(format!("demo-{}", &digest[..16]));
    if dir.join(".complete").exists() && intact(&dir) {
        return Ok(dir);
    }
    unpack(&root, &dir, &digest[..16]).map_err(|e| {
        e.context(format!(
            "cannot unpack the demo model into the cache directory {} ($BELLA_VQA_CACHE, else \
             ~/.cache/bella-vqa): free space there, or point BELLA_VQA_CACHE at a writable \
             folder",
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
    let _lock = lock(&root.join(format!(".demo-{tag}.lock"))).ok();
    if dir.join(".complete").exists() {
        if intact(dir) {
            return Ok(dir.to_path_buf());
        }
        // A damaged copy (a file truncated, edited or removed): written again from the binary.
        crate::note!(
            "note: the demo copy in {} was damaged; writing it again",
            dir.display()
        );
        let stale = crate::io::temp_name(&root.join(format!("demo-stale-{tag}")))?;
        match std::fs::rename(dir, &stale) {
            // Another process moved it first (to repair it): write our own, or use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            moved => moved.and_then(|()| std::fs::remove_dir_all(&stale)),
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
            bail!("cannot place the demo model in {}", dir.display());
        }
    }
    Ok(dir.to_path_buf())
}

/// Locks `path` (created if missing) for this process, waiting for another holder.
fn lock(path: &Path) -> Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    fs4::FileExt::lock(&file).with_context(|| format!("cannot lock {}", path.display()))?;
    Ok(file)
}

/// Whether every demo file in `dir` still holds what the binary carries (a FIFO or any other
/// non-regular file in its place does not: it is never opened, which could block).
fn intact(dir: &Path) -> bool {
    FILES.iter().all(|(name, bytes)| {
        let path = dir.join(name);
        std::fs::metadata(&path).is_ok_and(|m| m.is_file() && m.len() == bytes.len() as u64)
            && std::fs::read(&path).is_ok_and(|b| b == *bytes)
    })
}

/// A demo component (`LLAVA`, `CLIP`, `PARTICLES`, …) as a directory.
pub fn path(component: &str) -> Result<PathBuf> {
    let dir = directory()?.join(component);
    if !dir.is_dir() {
        bail!("the demo has no {component}");
    }
    Ok(dir)
}
