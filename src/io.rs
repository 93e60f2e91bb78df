//! Every file a run writes goes through here, so that:
//!
//! - a crash never leaves a half-written file: a file is written to a temporary sibling
//!   (`.NAME.tmp-PID`), synced and renamed over the target; a directory of files (a training
//!   checkpoint) is written the same way as a whole ([`write_dir_atomically`]);
//! - files get the permissions of a plain `File::create` (0666 minus the umask), whatever wrote
//!   them;
//! - one process at a time writes an output directory ([`OutputLock`]), and temporary files that
//!   a killed run left there are removed by the next one;
//! - paths stored in configs do not depend on the working directory ([`stored_path`]).
//!
//! Fault injection, for the kill tests only: with `BELLA_FAULT_AFTER_OPS=N` in the environment
//! the process aborts (as `kill -9` would stop it) right before the N-th file operation (create,
//! write, append, rename, remove; 1-based) made through this module; with `BELLA_FAULT_SIGNAL=int`
//! as well it sends itself one SIGINT there instead (a Ctrl-C, [`crate::interrupt`]) and goes on;
//! with `BELLA_FAULT_SIGNAL=full` the first operation from the N-th on that takes space (a
//! create, write or append; not a rename or removal) fails as on a full disk (ENOSPC), and the
//! run handles the error. Unset, it does nothing.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};

/// The environment variable of the fault injector.
pub const FAULT_ENV: &str = "BELLA_FAULT_AFTER_OPS";

/// The lock file of an output directory (holds the PID of the process that writes it).
pub const LOCK_FILE: &str = ".bella-vqa.lock";

/// With [`FAULT_ENV`], `int` here makes the fault a SIGINT instead of an abort, `full` a
/// "No space left on device" error.
pub const FAULT_SIGNAL_ENV: &str = "BELLA_FAULT_SIGNAL";

/// What the fault injector does at its operation.
#[derive(Clone, Copy)]
enum Fault {
    Abort,
    Interrupt,
    DiskFull,
}

/// Counts a file operation that takes space; aborts the process (sends it a SIGINT, or fails
/// the operation as on a full disk) at the one `BELLA_FAULT_AFTER_OPS` names.
fn file_op() -> std::io::Result<()> {
    counted_op(true)
}

/// [`file_op`] for a rename or a removal, which a full disk does not make fail.
fn spaceless_op() -> std::io::Result<()> {
    counted_op(false)
}

fn counted_op(takes_space: bool) -> std::io::Result<()> {
    static FULL_DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    static FAULT_AT: OnceLock<Option<(u64, Fault)>> = OnceLock::new();
    static OPS: AtomicU64 = AtomicU64::new(0);
    let fault = FAULT_AT.get_or_init(|| {
        let at = std::env::var(FAULT_ENV).ok()?.parse().ok()?;
        let kind = match std::env::var(FAULT_SIGNAL_ENV).as_deref() {
            Ok("int") => Fault::Interrupt,
            Ok("full") => Fault::DiskFull,
            _ => Fault::Abort,
        };
        Some((at, kind))
    });
    if let Some((at, kind)) = *fault {
        let n = OPS.fetch_add(1, Ordering::SeqCst) + 1;
        match kind {
            Fault::Interrupt if n == at => {
                let _ = signal_hook::low_level::raise(signal_hook::consts::SIGINT);
                crate::interrupt::await_own_sigint();
            }
            Fault::DiskFull
                if n >= at && takes_space && !FULL_DONE.swap(true, Ordering::SeqCst) =>
            {
                return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
            }
            Fault::Abort if n >= at => std::process::abort(),
            _ => {}
        }
    }
    Ok(())
}

/// Whether `e` comes from a full disk or an exhausted quota (ENOSPC, EDQUOT).
fn is_disk_full(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind::{QuotaExceeded, StorageFull};
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| matches!(io.kind(), StorageFull | QuotaExceeded))
}

/// A write of the output `path` that failed: a full disk is told as such, naming `path` (not the
/// temporary file it was being written as) and what to do; other errors are left as they are.
fn on_failed_write(e: anyhow::Error, path: &Path) -> anyhow::Error {
    if !is_disk_full(&e) {
        // Named by the output, not only by the temporary file it was being written as.
        let shown = path.display().to_string();
        return if e.to_string().contains(&shown) {
            e
        } else {
            e.context(format!("cannot write {shown}"))
        };
    }
    let cause = e
        .chain()
        .find_map(|c| c.downcast_ref::<std::io::Error>())
        .map_or_else(|| e.to_string(), ToString::to_string);
    DiskFull {
        path: path.to_path_buf(),
        cause,
    }
    .into()
}

/// An output that could not be written because the disk (or quota) is full. A command whose
/// rerun needs an option to continue (train's `--resume`, data shapes' `--force`) says so
/// around it.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot write {}: the disk (or quota) is full ({cause}); what was written before is kept \
     and nothing is half-written: free space there and run the same command again",
    .path.display()
)]
pub struct DiskFull {
    pub path: PathBuf,
    pub cause: String,
}

impl DiskFull {
    /// Whether `e` is (or was caused by) a full disk, told as such or as the system's error.
    pub fn caused(e: &anyhow::Error) -> bool {
        e.chain().any(|c| c.is::<DiskFull>()) || is_disk_full(e)
    }

    /// `e` with `advice` (what the rerun needs) around it when a full disk caused it.
    pub fn advise(e: anyhow::Error, advice: &'static str) -> anyhow::Error {
        if Self::caused(&e) {
            e.context(advice)
        } else {
            e
        }
    }
}

/// The longest file name most file systems take (NAME_MAX).
const NAME_MAX: usize = 255;

/// The temporary sibling `.NAME.tmp-PID` a file or directory `path` is written as before it is
/// renamed into place.
pub fn temp_name(path: &Path) -> Result<PathBuf> {
    sibling_name(path, "tmp")
}

/// The hidden sibling `.NAME.{kind}-PID` of `path` (of a legal length whatever NAME's).
fn sibling_name(path: &Path, kind: &str) -> Result<PathBuf> {
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?
        .to_string_lossy();
    let suffix = format!(".{kind}-{}", std::process::id());
    if 1 + name.len() + suffix.len() <= NAME_MAX {
        return Ok(path.with_file_name(format!(".{name}{suffix}")));
    }
    // A long (legal) name: its start and a hash of the whole, so that the temporary name is
    // legal too and still one per target.
    let hash = &sha256_bytes(name.as_bytes())[..16];
    let mut keep = NAME_MAX - (1 + 1 + hash.len() + suffix.len());
    while !name.is_char_boundary(keep) {
        keep -= 1;
    }
    Ok(path.with_file_name(format!(".{}~{hash}{suffix}", &name[..keep])))
}

/// Whether `name` is a temporary name made by [`temp_name`] (of any process).
fn is_temp_name(name: &str) -> bool {
    is_pid_name(name, "tmp")
}

/// Whether `name` is a hidden `.NAME.{kind}-PID` ([`sibling_name`]).
fn is_pid_name(name: &str, kind: &str) -> bool {
    name.starts_with('.')
        && name
            .rsplit_once(&format!(".{kind}-"))
            .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

fn parent_of(path: &Path) -> Option<&Path> {
    path.parent().filter(|d| !d.as_os_str().is_empty())
}

/// Makes the entries of `dir` durable; not every platform can open a directory, so best effort.
fn sync_dir(dir: Option<&Path>) {
    if let Ok(d) = fs::File::open(dir.unwrap_or(Path::new("."))) {
        let _ = d.sync_all();
    }
}

/// Creates a directory and its parents (counted as one file operation).
pub fn create_dir_all(dir: &Path) -> Result<()> {
    file_op()
        .map_err(|e| anyhow::Error::new(e).context(format!("cannot create {}", dir.display())))
        .and_then(|()| create_cache_dir(dir))
}

/// [`create_dir_all`] for a cache directory, which is not an output of a run: not counted by
/// the fault injector.
pub fn create_cache_dir(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        let what = if dir.is_file() {
            "a file"
        } else {
            "something else"
        };
        bail!("{} is {what}, not a directory", dir.display());
    }
    fs::create_dir_all(dir).map_err(|e| {
        // A file where a folder of the path should be: named as such ("File exists" was all).
        match dir.ancestors().find(|a| a.is_file()) {
            Some(file) => anyhow!(
                "cannot create {}: {} is a file, not a directory",
                dir.display(),
                file.display()
            ),
            None => anyhow::Error::new(e).context(format!("cannot create {}", dir.display())),
        }
    })
}

/// Removes a directory and everything in it; a missing one is fine.
pub fn remove_dir_all(dir: &Path) -> Result<()> {
    match spaceless_op().and_then(|()| fs::remove_dir_all(dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Removes a file; a missing one is fine.
pub fn remove_file(path: &Path) -> Result<()> {
    match spaceless_op().and_then(|()| fs::remove_file(path)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Creates (or truncates) `path` with the permissions of `File::create`, writes `bytes` and
/// syncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = file_op()
        .and_then(|()| fs::File::create(path))
        .with_context(|| format!("cannot create {}", path.display()))?;
    file_op()
        .and_then(|()| f.write_all(bytes))
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Renames `from` to `to` (counted) and makes the rename durable.
fn rename_synced(from: &Path, to: &Path) -> Result<()> {
    spaceless_op()
        .and_then(|()| fs::rename(from, to))
        .with_context(|| format!("cannot move {} to {}", from.display(), to.display()))?;
    sync_dir(parent_of(to));
    Ok(())
}

/// Where a write to `path` lands.
enum Destination {
    /// A regular file, new or replaced atomically: `path` itself, or the file a symbolic link at
    /// `path` names (the link is kept, not replaced by a file).
    File(PathBuf),
    /// A device or a pipe (`/dev/null`, `/dev/stdout`, a FIFO): written into directly, since
    /// renaming a file over it would replace it.
    Special(PathBuf),
}

fn destination(path: &Path) -> Result<Destination> {
    let is_link = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    match fs::metadata(path) {
        Ok(m) if m.is_dir() => bail!(
            "{} is a folder; give the path of a file to write",
            path.display()
        ),
        // Opened through `path`: /dev/stdout is a link to a pipe that has no path of its own.
        Ok(m) if !m.is_file() => Ok(Destination::Special(path.to_path_buf())),
        Ok(_) if is_link => Ok(Destination::File(
            fs::canonicalize(path)
                .with_context(|| format!("cannot resolve the link {}", path.display()))?,
        )),
        // A dangling link: the file it names is created.
        Err(_) if is_link => {
            let link = fs::read_link(path)
                .with_context(|| format!("cannot read the link {}", path.display()))?;
            Ok(Destination::File(match parent_of(path) {
                Some(dir) if link.is_relative() => dir.join(link),
                _ => link,
            }))
        }
        _ => Ok(Destination::File(path.to_path_buf())),
    }
}

/// Opens a device or a pipe for writing (not created, not truncated).
fn open_special(path: &Path) -> Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {} for writing", path.display()))
}

/// A failed write into a device or a pipe. A reader that closed the pipe (`--out /dev/stdout |
/// head -c 10`) has what it wanted, as with standard output: told as
/// [`StdoutError`](crate::console::StdoutError), which the CLI ends quietly on.
fn special_write_failed(e: std::io::Error, path: &Path) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        return crate::console::StdoutError(e).into();
    }
    anyhow::Error::new(e).context(format!("cannot write {}", path.display()))
}

/// Writes `bytes` to `path` atomically: a reader (or a crash) sees the old file or the new one.
/// A symbolic link is written through; a device or a pipe is written into directly.
pub fn write_bytes_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    stage_file(path, bytes)?.commit()
}

/// A file written in full as a temporary sibling of its target, put in place by
/// [`Staged::commit`]; dropped uncommitted, the temporary file is removed. Writing the new
/// version of several files first lets a failure (a full disk) leave all the old ones whole.
pub struct Staged {
    /// The temporary file and its target; `None` once committed, or for a device or a pipe
    /// (written into at once).
    rename: Option<(PathBuf, PathBuf)>,
}

/// Writes `bytes` as the staged new version of `path` (see [`Staged`]).
pub fn stage_file(path: &Path, bytes: &[u8]) -> Result<Staged> {
    let path = match destination(path)? {
        Destination::File(path) => path,
        Destination::Special(path) => {
            file_op()
                .map_err(anyhow::Error::new)
                .and_then(|()| open_special(&path))
                .and_then(|mut f| {
                    f.write_all(bytes)
                        .map_err(|e| special_write_failed(e, &path))
                })
                .map_err(|e| on_failed_write(e, &path))?;
            return Ok(Staged { rename: None });
        }
    };
    if let Some(dir) = parent_of(&path) {
        if !dir.is_dir() {
            create_dir_all(dir)?;
        }
    }
    let tmp = temp_name(&path)?;
    // Owned from here: a failed write removes the temporary file.
    let staged = Staged {
        rename: Some((tmp.clone(), path.clone())),
    };
    write_synced(&tmp, bytes).map_err(|e| on_failed_write(e, &path))?;
    Ok(staged)
}

impl Staged {
    /// Renames the new version over its target.
    pub fn commit(mut self) -> Result<()> {
        match self.rename.take() {
            Some((tmp, path)) => rename_synced(&tmp, &path).inspect_err(|_| {
                let _ = fs::remove_file(&tmp);
            }),
            None => Ok(()),
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some((tmp, _)) = &self.rename {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// Writes `path` atomically from a stream (a large file that should not be built in memory
/// first): `write` fills a buffered temporary sibling, which is synced and renamed over `path`.
/// For cache files, which are not outputs of a run: not counted by the fault injector. A symbolic
/// link is written through; a device or a pipe is written into directly.
pub fn write_stream_atomically(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<fs::File>) -> Result<()>,
) -> Result<()> {
    let path = match destination(path)? {
        Destination::File(path) => path,
        Destination::Special(path) => {
            let mut w = std::io::BufWriter::new(open_special(&path)?);
            write(&mut w)?;
            return w.flush().map_err(|e| special_write_failed(e, &path));
        }
    };
    let path = path.as_path();
    if let Some(dir) = parent_of(path) {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let tmp = temp_name(path)?;
    let result = (|| {
        let file =
            fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(file);
        write(&mut w)?;
        let file = w
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        file.sync_all()
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
        sync_dir(parent_of(path));
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| on_failed_write(e, path))
}

/// Writes the files `(name, bytes)` as the directory `dir`, atomically as a whole: they are
/// written into a temporary sibling directory that is renamed to `dir` when complete. An
/// existing `dir` is replaced (the caller makes sure nothing points at it).
pub fn write_dir_atomically(dir: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    let tmp = stage_dir(dir, files)?;
    let placed = if dir.exists() {
        remove_dir_all(dir)
    } else {
        Ok(())
    }
    .and_then(|()| rename_synced(&tmp, dir));
    if placed.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    placed.map_err(|e| on_failed_write(e, dir))
}

/// The files `(name, bytes)` of a directory.
pub type DirFiles<'a> = Vec<(&'a str, Vec<u8>)>;

/// Several directories of one parent as one set (see [`write_dir_atomically`]): every one is
/// written in full first; then a journal of the swap is written (`.bella-vqa.swap-PID`: what
/// moves where), the old directories (those of `replace`, and any at the new ones' places) are
/// renamed aside, each new one is renamed into place, the journal is removed, and only then are
/// the old ones removed. A failure before the renames (a full disk) leaves what was there
/// untouched; a stop during them leaves the journal, and the next [`OutputLock`] of the parent
/// completes the swap, so the set is the old one or the new one, never a mix.
pub fn write_dirs_atomically(dirs: &[(PathBuf, DirFiles)], replace: &[PathBuf]) -> Result<()> {
    let Some(parent) = dirs.first().and_then(|(d, _)| parent_of(d)) else {
        return Ok(());
    };
    if let Some(other) = dirs
        .iter()
        .map(|(d, _)| d)
        .chain(replace)
        .find(|d| parent_of(d) != Some(parent))
    {
        bail!(
            "{} is not in {}: a set of directories is replaced within one folder",
            other.display(),
            parent.display()
        );
    }
    let mut staged: Vec<PathBuf> = Vec::with_capacity(dirs.len());
    for (dir, files) in dirs {
        let files: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        match stage_dir(dir, &files) {
            Ok(tmp) => staged.push(tmp),
            Err(e) => {
                for tmp in &staged {
                    let _ = fs::remove_dir_all(tmp);
                }
                return Err(e);
            }
        }
    }
    let mut old: Vec<&PathBuf> = replace.iter().collect();
    old.extend(
        dirs.iter()
            .map(|(dir, _)| dir)
            .filter(|d| !replace.contains(d)),
    );
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    let journal = SwapJournal {
        aside: old
            .into_iter()
            .filter(|d| d.exists())
            .map(|d| Some((name(d)?, name(&sibling_name(d, "old").ok()?)?)))
            .collect::<Option<_>>()
            .context("a directory to replace has no name")?,
        place: staged
            .iter()
            .zip(dirs)
            .map(|(tmp, (dir, _))| Some((name(tmp)?, name(dir)?)))
            .collect::<Option<_>>()
            .context("a directory to write has no name")?,
    };
    let journal_path = sibling_name(&parent.join(SWAP_JOURNAL), "swap")?;
    if let Err(e) = write_synced(&journal_path, &serde_json::to_vec(&journal)?) {
        for tmp in &staged {
            let _ = fs::remove_dir_all(tmp);
        }
        let _ = fs::remove_file(&journal_path);
        return Err(e);
    }
    sync_dir(Some(parent));
    journal.complete(parent, &journal_path)
}

/// The name (before `.swap-PID`) of the journal of a swap of directories in progress.
const SWAP_JOURNAL: &str = "bella-vqa";

/// What a [`write_dirs_atomically`] swap does, by name within its folder: written once every
/// new directory is staged, so a swap stopped at any point can be completed from it.
#[derive(serde::Serialize, serde::Deserialize)]
struct SwapJournal {
    /// (an old directory, where it is put aside)
    aside: Vec<(String, String)>,
    /// (a staged new directory, its place)
    place: Vec<(String, String)>,
}

impl SwapJournal {
    /// Puts the old directories aside (those not aside yet: an old one is only ever at its
    /// place before the first new one is placed, and the asides are all there until the journal
    /// is gone), the staged ones in place, removes the journal, then the old directories.
    fn complete(&self, dir: &Path, journal: &Path) -> Result<()> {
        for (old, aside) in &self.aside {
            let (old, aside) = (dir.join(old), dir.join(aside));
            if !aside.exists() && old.exists() {
                rename_synced(&old, &aside)?;
            }
        }
        for (staged, place) in &self.place {
            let staged = dir.join(staged);
            if staged.exists() {
                rename_synced(&staged, &dir.join(place))?;
            }
        }
        spaceless_op()
            .and_then(|()| fs::remove_file(journal))
            .with_context(|| format!("cannot remove {}", journal.display()))?;
        sync_dir(Some(dir));
        for (_, aside) in &self.aside {
            remove_dir_all(&dir.join(aside))?;
        }
        Ok(())
    }
}

/// The journal of a swap of directories in `dir` that has not completed (an export stopped
/// midway, or one in progress), if any.
pub fn unfinished_swap(dir: &Path) -> Option<PathBuf> {
    let prefix = format!(".{SWAP_JOURNAL}.swap-");
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
}

/// The files of `dir`, written and synced in a temporary sibling directory (returned).
fn stage_dir(dir: &Path, files: &[(&str, &[u8])]) -> Result<PathBuf> {
    let tmp = temp_name(dir)?;
    if tmp.exists() {
        remove_dir_all(&tmp)?;
    }
    create_dir_all(&tmp).map_err(|e| on_failed_write(e, dir))?;
    let written = files
        .iter()
        .try_for_each(|(name, bytes)| write_synced(&tmp.join(name), bytes));
    if let Err(e) = written {
        // A full disk must not stay full of a half-written copy.
        let _ = fs::remove_dir_all(&tmp);
        return Err(on_failed_write(e, dir));
    }
    sync_dir(Some(&tmp));
    Ok(tmp)
}

/// The named tensors as the bytes of a safetensors file.
pub fn safetensors_bytes(
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
) -> Result<Vec<u8>> {
    safetensors::tensor::serialize(tensors, None).context("cannot serialise tensors")
}

/// Saves named tensors as safetensors atomically.
pub fn save_safetensors_atomically(
    path: &Path,
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
) -> Result<()> {
    write_bytes_atomically(path, &safetensors_bytes(tensors)?)
}

/// A file that records are appended to, each in one write and flushed at once; a write that
/// fails part way (a full disk, `ulimit -f`) is cut off again, so the file holds whole records.
pub struct AppendFile {
    file: fs::File,
    path: PathBuf,
    /// The length of the whole records written.
    len: u64,
}

impl AppendFile {
    /// Opens (or creates) `path` for appending; with `keep`, first cuts it to that many bytes
    /// (dropping a damaged end).
    pub fn open(path: &Path, keep: Option<u64>) -> Result<Self> {
        if let Some(dir) = parent_of(path) {
            if !dir.is_dir() {
                create_dir_all(dir)?;
            }
        }
        let file = file_op()
            .and_then(|()| fs::OpenOptions::new().create(true).append(true).open(path))
            .with_context(|| format!("cannot open {} for appending", path.display()))
            .map_err(|e| on_failed_write(e, path))?;
        let len = file
            .metadata()
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        let len = match keep.filter(|&k| k < len) {
            Some(keep) => {
                file_op()
                    .and_then(|()| file.set_len(keep))
                    .with_context(|| format!("cannot cut {} to {keep} bytes", path.display()))?;
                keep
            }
            None => len,
        };
        Ok(Self {
            file,
            path: path.to_path_buf(),
            len,
        })
    }

    /// Appends `bytes` in one write; a write that fails leaves the file as it was (best
    /// effort: cutting it can fail too).
    pub fn append(&mut self, bytes: &[u8]) -> Result<()> {
        let written = file_op()
            .and_then(|()| self.file.write_all(bytes))
            .and_then(|()| self.file.flush());
        match written {
            Ok(()) => {
                self.len += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.len);
                Err(anyhow::Error::new(e)
                    .context(format!("cannot append to {}", self.path.display())))
                .map_err(|e| on_failed_write(e, &self.path))
            }
        }
    }

    pub fn sync(&mut self) -> Result<()> {
        self.file
            .sync_data()
            .with_context(|| format!("cannot sync {}", self.path.display()))
    }
}

impl Drop for AppendFile {
    fn drop(&mut self) {
        let _ = self.file.sync_data();
    }
}

/// Appends one line (`line` without its end) to `path`, synced; after a line cut off by a kill
/// it starts on a new line.
pub fn append_line(path: &Path, line: &[u8]) -> Result<()> {
    let ends_cut = match fs::File::open(path) {
        Ok(mut f) => {
            let mut last = [0u8; 1];
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            len > 0
                && f.seek(SeekFrom::End(-1)).is_ok()
                && f.read_exact(&mut last).is_ok()
                && last[0] != b'\n'
        }
        Err(_) => false,
    };
    let mut bytes = Vec::with_capacity(line.len() + 2);
    if ends_cut {
        bytes.push(b'\n');
    }
    bytes.extend_from_slice(line);
    bytes.push(b'\n');
    let mut f = AppendFile::open(path, None)?;
    f.append(&bytes)?;
    f.sync()
}

/// Exclusive use of an output directory by this process, until dropped: a second process that
/// asks for it fails at once, naming the holder. Taking it removes the temporary files that a
/// killed run left in the directory (nobody else can be writing them). A directory that the
/// lock created and that holds nothing but the lock when it is dropped (the command failed
/// before writing anything) is removed with it.
pub struct OutputLock {
    file: Option<fs::File>,
    created: Option<PathBuf>,
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        let Some(dir) = &self.created else {
            return;
        };
        let only_the_lock = fs::read_dir(dir)
            .is_ok_and(|mut entries| entries.all(|e| e.is_ok_and(|e| e.file_name() == LOCK_FILE)));
        if only_the_lock {
            // Closed first, so that the lock is released before its file goes.
            drop(self.file.take());
            let _ = fs::remove_file(dir.join(LOCK_FILE));
            let _ = fs::remove_dir(dir);
        }
    }
}

/// The process that holds the lock of `dir` (its PID as written, or "(unknown)"), if one does;
/// `None` when nobody does or there is no lock file. Takes nothing.
pub fn lock_holder(dir: &Path) -> Option<String> {
    use fs4::FileExt;
    let mut file = fs::File::open(dir.join(LOCK_FILE)).ok()?;
    match FileExt::try_lock_shared(&file) {
        Err(fs4::TryLockError::WouldBlock) => Some(holder_of(&mut file)),
        _ => None,
    }
}

/// The PID a lock file holds, as written ("(unknown)" when empty). A holder that has just taken
/// the lock writes its PID a moment later: an empty file is read again for up to 0.5 s.
fn holder_of(file: &mut fs::File) -> String {
    for _ in 0..25 {
        let mut holder = String::new();
        let _ = file.seek(SeekFrom::Start(0));
        let _ = file.read_to_string(&mut holder);
        if !holder.trim().is_empty() {
            return holder.trim().to_string();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    "(unknown)".to_string()
}

impl OutputLock {
    /// Takes the lock of `dir` (created if missing).
    pub fn acquire(dir: &Path) -> Result<Self> {
        use fs4::FileExt;
        if dir.exists() && !dir.is_dir() {
            bail!(
                "{} is a file, not a directory: choose another output directory",
                dir.display()
            );
        }
        if dir.is_symlink() && !dir.exists() {
            bail!(
                "{} is a link to a directory that is not there ({}): create it, or choose \
                 another output directory",
                dir.display(),
                fs::read_link(dir)
                    .map(|t| t.display().to_string())
                    .unwrap_or_default()
            );
        }
        let created = (!dir.is_dir()).then(|| dir.to_path_buf());
        if created.is_some() {
            create_dir_all(dir)?;
        }
        // From here on, a failure (a full disk) removes the directory made for nothing.
        let mut lock = Self {
            file: None,
            created,
        };
        let path = dir.join(LOCK_FILE);
        let mut file = file_op()
            .and_then(|()| {
                fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
            })
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        match FileExt::try_lock(&file) {
            Ok(()) => {}
            Err(fs4::TryLockError::WouldBlock) => bail!(
                "{} is in use by process {}: wait for it to finish, or use another output \
                 directory",
                dir.display(),
                holder_of(&mut file)
            ),
            Err(fs4::TryLockError::Error(e)) => {
                return Err(anyhow!(e)).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
        file_op()
            .and_then(|()| file.set_len(0))
            .and_then(|()| file.write_all(std::process::id().to_string().as_bytes()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        lock.file = Some(file);
        tidy_output_dir(dir)?;
        Ok(lock)
    }
}

/// At the depths where this program writes (`dir`, `dir/checkpoints/step-N`,
/// `dir/images/<split>`, `dir/particle-N`), and not under a subdirectory another run has locked
/// (its own output directory): removes the temporary files and directories ([`temp_name`]) that
/// an interrupted run left, only those of processes that are gone; and refuses a FIFO or socket,
/// which a run resuming from the directory would block on when it reads it.
fn tidy_output_dir(dir: &Path) -> Result<()> {
    tidy_below(dir, 2)
}

fn tidy_below(dir: &Path, depth: usize) -> Result<()> {
    // A swap of directories that a run now gone left midway is completed first (its staged
    // copies are temporaries, which would be removed below).
    if let Some(journal) = unfinished_swap(dir) {
        let name = journal
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        if !name.is_some_and(|n| owner_is_alive(&n, "swap")) {
            let read = crate::input::read_to_string(&journal, "swap journal")
                .and_then(|t| Ok(serde_json::from_str::<SwapJournal>(&t)?));
            match read {
                Ok(swap) => swap.complete(dir, &journal).with_context(|| {
                    format!(
                        "cannot complete the swap of directories {}",
                        journal.display()
                    )
                })?,
                // Torn (a kill while it was written, before any rename): nothing moved yet.
                Err(_) => remove_file(&journal)?,
            }
        }
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(()); // unreadable: nothing of ours can be there
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        let name = entry.file_name().to_string_lossy().into_owned();
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileTypeExt;
            if let Ok(t) = fs::metadata(&path).map(|m| m.file_type()) {
                if t.is_fifo() || t.is_socket() {
                    bail!(
                        "{} is a {} in the output directory, where a run reads and writes \
                         regular files (reading it would block): remove it, or choose another \
                         output directory",
                        path.display(),
                        if t.is_fifo() {
                            "FIFO (named pipe)"
                        } else {
                            "socket"
                        }
                    );
                }
            }
        }
        // Temporaries, and old directories a completed swap had not removed yet.
        let kind = if is_temp_name(&name) {
            Some("tmp")
        } else {
            is_pid_name(&name, "old").then_some("old")
        };
        if let Some(kind) = kind {
            if owner_is_alive(&name, kind) {
                continue;
            }
            spaceless_op()
                .and_then(|()| remove_entry(&entry))
                .with_context(|| format!("cannot remove the stale {}", path.display()))?;
        } else if is_dir && depth > 0 && !path.join(LOCK_FILE).exists() {
            tidy_below(&path, depth - 1)?;
        }
    }
    Ok(())
}

/// How long a cache temporary must have been left untouched before it counts as abandoned.
const STALE_CACHE_TEMP: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes, best effort, the temporary files and directories ([`temp_name`]) that processes now
/// gone left directly in `dir`: a cache directory, where a killed first use (a demo copy, a
/// multi-GB quantized model) would otherwise leave them for good. Takes no lock: another live
/// process's temporaries are kept, and so is any written to in the last hour (a cache shared
/// between containers holds temporaries of processes this one cannot see).
pub fn remove_stale_temps(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let untouched = |entry: &fs::DirEntry| {
        entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= STALE_CACHE_TEMP)
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_temp_name(&name) && !temp_owner_is_alive(&name) && untouched(&entry) {
            let _ = remove_entry(&entry);
        }
    }
}

/// Removes a directory entry: a file, or a folder with everything in it.
fn remove_entry(entry: &fs::DirEntry) -> std::io::Result<()> {
    if entry.file_type().is_ok_and(|t| t.is_dir()) {
        fs::remove_dir_all(entry.path())
    } else {
        fs::remove_file(entry.path())
    }
}

/// Whether the process whose id ends the temporary name is running (Linux: `/proc/PID`; where
/// that cannot be told, it is taken as gone).
fn temp_owner_is_alive(name: &str) -> bool {
    owner_is_alive(name, "tmp")
}

/// Whether the process whose id ends `name` (`.NAME.{kind}-PID`) is running, this one aside.
fn owner_is_alive(name: &str, kind: &str) -> bool {
    let pid = name
        .rsplit_once(&format!(".{kind}-"))
        .map_or("", |(_, pid)| pid);
    pid != std::process::id().to_string() && Path::new("/proc").join(pid).is_dir()
}

/// How a path is stored in a config or results file: absolute, so that it means the same
/// whatever the working directory of the run that reads it.
pub fn stored_path(path: &Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

/// A `--model` as stored: a local directory as its absolute path ([`stored_path`]), a hub id as
/// given.
pub fn stored_model_source(model: &str) -> String {
    // The embedded demo is stored by name: its cache directory moves with the binary's demo.
    if crate::hub::demo_model(model).is_some() {
        model.to_string()
    } else if let Some(name) = demo_name_of(Path::new(model)) {
        // Its cache copy by path (the base an exported demo adapter names): by name too.
        name.to_string()
    } else if Path::new(model).is_dir() {
        stored_path(Path::new(model))
    } else {
        model.to_string()
    }
}

/// Whether two paths name the same file or folder however they are written (relative,
/// absolute, through `..` or a link); paths that cannot be resolved (not there) are compared
/// as written.
pub fn same_path(a: &Path, b: &Path) -> bool {
    match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The name (`demo`, `demo:clip`) of a directory that is the embedded demo's cache copy of its
/// LLaVA or CLIP; `None` for anything else (the copy of another build's demo included).
fn demo_name_of(path: &Path) -> Option<&'static str> {
    let copy = path.parent()?.file_name()?.to_str()?;
    if !copy.starts_with("demo-") || !path.is_dir() {
        return None;
    }
    let demo = crate::demo::directory().ok()?;
    [
        (crate::demo::LLAVA, "demo"),
        (crate::demo::CLIP, "demo:clip"),
    ]
    .into_iter()
    .find(|(component, _)| same_path(path, &demo.join(component)))
    .map(|(_, name)| name)
}

/// This program's cache directory (the demo model, file hashes, quantized weights, images
/// extracted from Parquet): `$BELLA_VQA_CACHE`, else `bella-vqa` in `$XDG_CACHE_HOME` (as the hub
/// cache's default lies in it), else `.cache/bella-vqa` in the user's home (`$HOME`, else the
/// password database's, as Python's `expanduser` finds it). Never a folder shared with other
/// users: with no home at all it is an error that says to set the variable.
pub fn cache_dir() -> Result<PathBuf> {
    cache_dir_from(
        std::env::var_os("BELLA_VQA_CACHE"),
        std::env::var_os("XDG_CACHE_HOME"),
        home_dir(),
    )
}

/// [`cache_dir`] from the variables' values and the home directory.
fn cache_dir_from(
    variable: Option<std::ffi::OsString>,
    xdg_cache_home: Option<std::ffi::OsString>,
    home: Option<PathBuf>,
) -> Result<PathBuf> {
    // An empty variable is unset (it meant the current directory), as for HOME; the XDG
    // specification ignores a relative XDG_CACHE_HOME.
    if let Some(dir) = variable.filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(xdg) = xdg_cache_home
        .map(PathBuf::from)
        .filter(|x| x.is_absolute())
    {
        return Ok(xdg.join("bella-vqa"));
    }
    home.map(|h| h.join(".cache/bella-vqa")).context(
        "no home directory for the cache (HOME is unset or empty and this user has none in the \
         password database): set BELLA_VQA_CACHE to a folder of yours",
    )
}

/// The user's home: `$HOME` when set and not empty, else the password database's entry for this
/// user (what `std::env::home_dir` does on Unix); `None` when neither has one.
pub fn home_dir() -> Option<PathBuf> {
    std::env::home_dir().filter(|h| !h.as_os_str().is_empty())
}

/// The sha256 of a file, remembered in [`cache_dir`]`/file-hashes.json` under its canonical path,
/// size and modification time (on Unix also its inode and change time, which no tool can set
/// back), so checking particles against a 14 GB base hashes it once, not at every load. A
/// changed file is hashed again, even one rewritten in place with its old size and time.
pub fn sha256_file_cached(path: &Path) -> Result<String> {
    sha256_file_cached_in(path, &cache_dir()?.join("file-hashes.json"))
}

/// [`sha256_file_cached`] with the cache file given. The cache is best effort: an unreadable or
/// corrupt one is ignored and rewritten; it is not an output of the run, so it is written
/// directly (atomically) and not counted by the fault injector.
pub fn sha256_file_cached_in(path: &Path, cache: &Path) -> Result<String> {
    use std::collections::BTreeMap;
    let meta = fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let canonical = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    #[cfg(unix)]
    let changed = {
        use std::os::unix::fs::MetadataExt;
        format!("|{}|{}.{}", meta.ino(), meta.ctime(), meta.ctime_nsec())
    };
    #[cfg(not(unix))]
    let changed = String::new();
    let key = format!("{}|{}|{modified}{changed}", canonical.display(), meta.len());
    // Only a regular file is read: a FIFO there would block (and is replaced below).
    let regular = fs::metadata(cache).is_ok_and(|m| m.is_file());
    let mut known: BTreeMap<String, String> = regular
        .then(|| fs::read(cache).ok())
        .flatten()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    if let Some(hash) = known.get(&key) {
        return Ok(hash.clone());
    }
    let hash = sha256_file(path)?;
    known.insert(key, hash.clone());
    if let (Some(dir), Ok(json), Ok(tmp)) = (
        cache.parent(),
        serde_json::to_vec_pretty(&known),
        temp_name(cache),
    ) {
        remove_stale_temps(dir);
        let written = fs::create_dir_all(dir)
            .and_then(|()| fs::write(&tmp, json))
            .and_then(|()| fs::rename(&tmp, cache));
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
    }
    Ok(hash)
}

/// The sha256 of `bytes`, in lower-case hex.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(bytes))
}

/// SHA-256 of a file's contents, lower-case hex (read in 1 MiB pieces).
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut file =
        fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_temporaries_of_gone_processes_leave_a_cache_and_nothing_else_does() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join(".model.gguf.tmp-4000000000");
        let gone_dir = dir.path().join(".demo-0123.tmp-4000000001");
        let alive = dir.path().join(".other.tmp-1"); // init's: running
        let kept = dir.path().join("model.gguf");
        for f in [&gone, &alive, &kept] {
            fs::write(f, b"x").unwrap();
        }
        fs::create_dir_all(gone_dir.join("llava")).unwrap();
        // Written to a moment ago: kept (its writer may be a process of another container).
        remove_stale_temps(dir.path());
        assert!(gone.exists() && gone_dir.exists());
        // Untouched for two hours: removed.
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        for p in [&gone, &gone_dir, &alive] {
            fs::File::open(p).unwrap().set_modified(old).unwrap();
        }
        remove_stale_temps(dir.path());
        assert!(!gone.exists() && !gone_dir.exists());
        assert!(alive.exists() && kept.exists());
    }

    #[test]
    fn a_replaced_file_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        write_bytes_atomically(&path, b"old").unwrap();
        write_bytes_atomically(&path, b"new").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[cfg(unix)]
    #[test]
    fn links_are_written_through_and_pipes_into_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        // A link to a file: the file gets the bytes, the link stays a link.
        let target = dir.path().join("target.json");
        fs::write(&target, b"old").unwrap();
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink("target.json", &link).unwrap();
        write_bytes_atomically(&link, b"new").unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(&target).unwrap(), b"new");
        // A dangling link: the file it names is created.
        let dangling = dir.path().join("dangling.json");
        std::os::unix::fs::symlink("made.json", &dangling).unwrap();
        write_stream_atomically(&dangling, |w| Ok(w.write_all(b"made")?)).unwrap();
        assert!(fs::symlink_metadata(&dangling)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(dir.path().join("made.json")).unwrap(), b"made");
        // A folder is refused, named.
        let err = write_bytes_atomically(dir.path(), b"x").unwrap_err();
        assert!(format!("{err:#}").contains("is a folder"), "{err:#}");
        // A pipe (as /dev/null or /dev/stdout would be) is written into and stays a pipe.
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !made.is_ok_and(|s| s.success()) {
            return; // no mkfifo here
        }
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || fs::read(fifo).unwrap())
        };
        write_bytes_atomically(&fifo, b"through the pipe").unwrap();
        assert_eq!(reader.join().unwrap(), b"through the pipe");
        use std::os::unix::fs::FileTypeExt;
        assert!(fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
        // Through a link to the pipe, as /dev/stdout is one.
        let stdout_like = dir.path().join("stdout");
        std::os::unix::fs::symlink(&fifo, &stdout_like).unwrap();
        let reader = std::thread::spawn(move || fs::read(fifo).unwrap());
        write_stream_atomically(&stdout_like, |w| Ok(w.write_all(b"streamed")?)).unwrap();
        assert_eq!(reader.join().unwrap(), b"streamed");
        assert!(fs::symlink_metadata(&stdout_like)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn a_directory_is_replaced_as_a_whole() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("step-1");
        write_dir_atomically(&dir, &[("a", b"1"), ("b", b"2")]).unwrap();
        write_dir_atomically(&dir, &[("a", b"3")]).unwrap();
        assert_eq!(fs::read(dir.join("a")).unwrap(), b"3");
        assert!(!dir.join("b").exists(), "the old directory is gone");
        assert_eq!(
            fs::read_dir(root.path()).unwrap().count(),
            1,
            "no temp left"
        );
        // A write that fails (here: into a folder that is not there; a full disk alike) leaves
        // the old directory and no temporary copy.
        assert!(write_dir_atomically(&dir, &[("a", b"4"), ("missing/b", b"5")]).is_err());
        assert_eq!(fs::read(dir.join("a")).unwrap(), b"3");
        assert_eq!(
            fs::read_dir(root.path()).unwrap().count(),
            1,
            "no temp left"
        );
    }

    #[test]
    fn a_directory_the_lock_made_goes_with_it_when_nothing_was_written() {
        let root = tempfile::tempdir().unwrap();
        // Made by the lock, nothing written: removed.
        let out = root.path().join("run");
        drop(OutputLock::acquire(&out).unwrap());
        assert!(!out.exists());
        // Made by the lock, something written: kept (with the lock file).
        let lock = OutputLock::acquire(&out).unwrap();
        fs::write(out.join("results.json"), b"{}").unwrap();
        drop(lock);
        assert!(out.join("results.json").is_file());
        // Already there: kept even when empty.
        let empty = root.path().join("empty");
        fs::create_dir(&empty).unwrap();
        drop(OutputLock::acquire(&empty).unwrap());
        assert!(empty.is_dir());
    }

    #[test]
    fn the_lock_removes_stale_temps_and_keeps_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("checkpoints");
        // Above Linux's largest PID: processes that are gone.
        fs::create_dir_all(sub.join(".step-00000004.tmp-4194377")).unwrap();
        fs::write(dir.path().join(".particles.safetensors.tmp-4194399"), b"x").unwrap();
        fs::write(sub.join(".latest.tmp-4194309"), b"x").unwrap();
        fs::write(dir.path().join("keep.tmp-1"), b"x").unwrap();
        fs::write(dir.path().join(".tmp-notapid"), b"x").unwrap();
        let _lock = OutputLock::acquire(dir.path()).unwrap();
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .chain(fs::read_dir(&sub).unwrap())
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".bella-vqa.lock",
                ".tmp-notapid",
                "checkpoints",
                "keep.tmp-1"
            ]
        );
    }

    #[test]
    fn file_hashes_are_remembered_until_the_file_changes() {
        let dir = tempfile::tempdir().unwrap();
        let (file, cache) = (dir.path().join("w.bin"), dir.path().join("hashes.json"));
        fs::write(&file, b"abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_file_cached_in(&file, &cache).unwrap(), abc);
        // Read from the cache: a doctored entry for the same path, size and time is believed.
        let doctored = fs::read_to_string(&cache).unwrap().replace(abc, "cafe");
        fs::write(&cache, doctored).unwrap();
        assert_eq!(sha256_file_cached_in(&file, &cache).unwrap(), "cafe");
        // A changed file (new size and time) is hashed again.
        fs::write(&file, b"abcd").unwrap();
        assert_eq!(
            sha256_file_cached_in(&file, &cache).unwrap(),
            "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589"
        );
        // Rewritten in place with the same size and its modification time set back (as
        // `touch -r` does): hashed again all the same.
        let time = fs::metadata(&file).unwrap().modified().unwrap();
        // File times tick coarsely (a few ms): let the change time move on.
        std::thread::sleep(std::time::Duration::from_millis(50));
        fs::write(&file, b"abce").unwrap();
        fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(time)
            .unwrap();
        #[cfg(unix)]
        assert_eq!(
            sha256_file_cached_in(&file, &cache).unwrap(),
            sha256_file(&file).unwrap()
        );
        fs::write(&file, b"abcd").unwrap();
        // A corrupt cache is ignored.
        fs::write(&cache, b"{not json").unwrap();
        assert_eq!(
            sha256_file_cached_in(&file, &cache).unwrap(),
            "88d4266fd4e6338d13b845fcf289579d209c897823b9217da3e161936f031589"
        );
    }

    #[test]
    fn a_name_of_up_to_255_bytes_is_written_through_a_legal_temporary_name() {
        let dir = tempfile::tempdir().unwrap();
        for len in [240, 255] {
            let name = format!(
                "{}.json",
                "é".repeat((len - 5) / 2) + &"b".repeat((len - 5) % 2)
            );
            assert_eq!(name.len(), len);
            let path = dir.path().join(&name);
            let tmp = temp_name(&path).unwrap();
            let tmp_name = tmp.file_name().unwrap().to_str().unwrap();
            assert!(
                tmp_name.len() <= NAME_MAX && is_temp_name(tmp_name),
                "{tmp_name}"
            );
            write_bytes_atomically(&path, b"x").unwrap();
            assert_eq!(fs::read(&path).unwrap(), b"x");
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2, "no temp left");
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_as_the_hash_cache_is_replaced_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let (file, cache) = (dir.path().join("w.bin"), dir.path().join("hashes.json"));
        fs::write(&file, b"abc").unwrap();
        let made = std::process::Command::new("mkfifo").arg(&cache).status();
        assert!(made.is_ok_and(|s| s.success()));
        // On a thread: a regression blocks on the FIFO, and fails here instead of hanging.
        let (tx, rx) = std::sync::mpsc::channel();
        let cache_file = cache.clone();
        std::thread::spawn(move || {
            let _ = tx.send(sha256_file_cached_in(&file, &cache_file).unwrap());
        });
        let hash = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("the hash cache FIFO blocked");
        assert!(hash.starts_with("ba7816bf"), "{hash}");
        assert!(
            fs::metadata(&cache).unwrap().is_file(),
            "replaced by a file"
        );
    }

    #[test]
    fn sha256_of_a_known_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        fs::write(&path, b"abc").unwrap();
        // FIPS 180-2 test vector.
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn the_cache_is_never_a_folder_shared_with_other_users() {
        let home = || Some(PathBuf::from("/home/ann"));
        let dir = |v: Option<&str>, h: Option<PathBuf>| cache_dir_from(v.map(Into::into), None, h);
        assert_eq!(dir(Some("/c"), home()).unwrap(), Path::new("/c"));
        assert_eq!(dir(Some("/c"), None).unwrap(), Path::new("/c"));
        // An empty variable is unset.
        assert_eq!(
            dir(Some(""), home()).unwrap(),
            Path::new("/home/ann/.cache/bella-vqa")
        );
        // No home: an error naming the way out, not the temporary directory.
        let err = dir(None, None).unwrap_err().to_string();
        assert!(err.contains("set BELLA_VQA_CACHE"), "{err}");
        assert!(dir(Some(""), None).is_err());
        // XDG_CACHE_HOME moves it as it moves the hub cache; BELLA_VQA_CACHE still wins, and a
        // relative (or empty) XDG_CACHE_HOME is ignored, as the XDG specification says.
        let xdg =
            |v: Option<&str>, x: &str| cache_dir_from(v.map(Into::into), Some(x.into()), home());
        assert_eq!(xdg(None, "/x").unwrap(), Path::new("/x/bella-vqa"));
        assert_eq!(xdg(Some("/c"), "/x").unwrap(), Path::new("/c"));
        for ignored in ["x", ""] {
            assert_eq!(
                xdg(None, ignored).unwrap(),
                Path::new("/home/ann/.cache/bella-vqa")
            );
        }
    }
}
