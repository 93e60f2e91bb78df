//! Opening the files a user names (images, data, configs, weights, particles, templates).
//!
//! Only regular files (or links to them) are opened: a FIFO blocks the reader forever until a
//! writer comes, a character device such as `/dev/zero` never ends, and a directory cannot be
//! read. [`check_regular`] refuses them before anything opens the path; every reader of
//! user-supplied files goes through it (or through [`open`] / [`read_to_string`]).

use std::fs;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// What kind of thing `meta` describes, for messages.
fn kind(meta: &fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "a directory (folder)";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    "not a regular file"
}

/// Errors unless `path` is a regular file (links are followed). `what` names the file's role in
/// the message ("image", "data file", "model config").
pub fn check_regular(path: &Path, what: &str) -> Result<()> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("{what} {} does not exist", path.display())
        }
        Err(e) => bail!("cannot read {what} {}: {e}", path.display()),
    };
    if !meta.is_file() {
        bail!(
            "{what} {} is {}: pass a regular file",
            path.display(),
            kind(&meta)
        );
    }
    Ok(())
}

/// Reads a file of an output directory that may be absent (`None` then); one that is there must
/// be a regular file, so that a pipe in its place is refused instead of blocking.
pub fn read_if_present(path: &Path, what: &str) -> Result<Option<Vec<u8>>> {
    let meta = match fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        other => other.with_context(|| format!("cannot read {what} {}", path.display()))?,
    };
    if !meta.is_file() {
        bail!(
            "{what} {} is {}, not a file this program wrote: remove it",
            path.display(),
            kind(&meta)
        );
    }
    fs::read(path)
        .map(Some)
        .with_context(|| format!("cannot read {what} {}", path.display()))
}

/// Opens a regular file for reading (see [`check_regular`]).
pub fn open(path: &Path, what: &str) -> Result<fs::File> {
    check_regular(path, what)?;
    fs::File::open(path).with_context(|| format!("cannot open {what} {}", path.display()))
}

/// Reads a regular file as UTF-8 text (see [`check_regular`]).
pub fn read_to_string(path: &Path, what: &str) -> Result<String> {
    check_regular(path, what)?;
    let text = fs::read_to_string(path)
        .with_context(|| format!("cannot read {what} {}", path.display()))?;
    // A byte-order mark (as Windows editors write) is not part of the text.
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_pass_and_directories_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.txt");
        fs::write(&file, "hi").unwrap();
        assert_eq!(read_to_string(&file, "note").unwrap(), "hi");
        fs::write(&file, "\u{feff}hi").unwrap();
        assert_eq!(read_to_string(&file, "note").unwrap(), "hi");
        let err = format!("{:#}", check_regular(dir.path(), "image").unwrap_err());
        assert!(
            err.contains("image") && err.contains("a directory"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            open(&dir.path().join("no"), "data file").unwrap_err()
        );
        assert!(
            err.contains("data file") && err.contains("does not exist"),
            "{err}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(status.success());
        let err = format!("{:#}", read_to_string(&fifo, "model config").unwrap_err());
        assert!(err.contains("FIFO") && err.contains("pipe"), "{err}");
        let err = format!(
            "{:#}",
            check_regular(Path::new("/dev/null"), "image").unwrap_err()
        );
        assert!(err.contains("a device"), "{err}");
    }
}
