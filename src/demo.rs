//! The embedded demo (design §7): a shapes-world LLaVA and CLIP in the Hugging Face layout with
//! Bella particles, compiled into the binary from `demo/` and written to a cache directory on first
//! use, so that the same loading code path reads them as any local model.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

mod files {
    include!(concat!(env!("OUT_DIR"), "/demo_files.rs"));
}

/// The demo LLaVA (relative to the demo directory).
pub const LLAVA: &str = "llava";
/// The demo CLIP.
pub const CLIP: &str = "clip";
/// The calibrated Bella particles used by default with the demo LLaVA.
pub const PARTICLES: &str = "particles/llava-ensemble";

/// Whether this binary carries the demo.
pub fn available() -> bool {
    files::FILES
        .iter()
        .any(|(name, _)| name.starts_with("llava/"))
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
    for (name, bytes) in files::FILES {
        hasher.update(name.as_bytes());
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    let digest = format!("{:x}", hasher.finalize());
    let root = crate::io::cache_dir();
    let dir = root.join(format!("demo-{}", &digest[..16]));
    if dir.join(".complete").exists() {
        if intact(&dir) {
            return Ok(dir);
        }
        // A damaged copy (a file truncated, edited or removed): written again from the binary.
        crate::note!(
            "note: the demo copy in {} was damaged; writing it again",
            dir.display()
        );
        let stale = crate::io::temp_name(&root.join(format!("demo-stale-{}", &digest[..16])))?;
        std::fs::rename(&dir, &stale)
            .and_then(|()| std::fs::remove_dir_all(&stale))
            .with_context(|| {
                format!(
                    "cannot replace the damaged demo copy {}: remove it by hand",
                    dir.display()
                )
            })?;
    }
    // Write everything into a fresh temporary directory, then rename it into place.
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    // What a killed first use left (a copy of the demo each time) goes first.
    crate::io::remove_stale_temps(&root);
    let tmp = crate::io::temp_name(&dir)?;
    let _ = std::fs::remove_dir_all(&tmp);
    for (name, bytes) in files::FILES {
        let path = tmp.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    std::fs::write(tmp.join(".complete"), b"")
        .with_context(|| format!("cannot write into {}", tmp.display()))?;
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another process won the race: use its copy.
        let _ = std::fs::remove_dir_all(&tmp);
        if !dir.join(".complete").exists() {
            bail!("cannot place the demo model in {}", dir.display());
        }
    }
    Ok(dir)
}

/// Whether every demo file in `dir` still holds what the binary carries.
fn intact(dir: &std::path::Path) -> bool {
    files::FILES
        .iter()
        .all(|(name, bytes)| std::fs::read(dir.join(name)).is_ok_and(|b| b == *bytes))
}

/// A demo component (`LLAVA`, `CLIP`, `PARTICLES`, …) as a directory.
pub fn path(component: &str) -> Result<PathBuf> {
    let dir = directory()?.join(component);
    if !dir.is_dir() {
        bail!("the demo has no {component}");
    }
    Ok(dir)
}
