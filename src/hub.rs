//! Model sources: a hub id (with revision), the local hub cache, or a directory.
//!
//! A [`ModelSource`] is either a Hugging Face hub id (`org/name` or `org/name@revision`) or a local
//! directory. [`resolve`] turns it into [`ModelFiles`]: one directory that holds `config.json`, the
//! safetensors weights (one file or the shards of `model.safetensors.index.json`) and whichever of
//! the optional tokenizer/processor/template files the model has.
//!
//! # The cache
//!
//! Hub models live in the standard Hugging Face cache (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`), in exactly the layout `huggingface_hub` (Python) writes, so the two
//! share one cache:
//!
//! ```text
//! models--org--name/
//!   blobs/<etag>                        file contents, named by the hub's ETag
//!   snapshots/<commit>/<file>           relative symlink -> ../../blobs/<etag>
//!   refs/<revision>                     the commit sha that <revision> pointed to
//! ```
//!
//! Paths and the token file come from `hf_hub` ([`hf_hub::Cache`], [`hf_hub::Repo`],
//! [`hf_hub::CacheRepo`]).
//!
//! # Why the HTTP is done here and not by `hf-hub`
//!
//! `hf-hub` 0.5's `Api` has no request timeout (an endpoint that accepts the connection and never
//! answers hangs forever), no offline switch (`HF_HUB_OFFLINE`), ignores `HF_HUB_CACHE`, and its
//! errors cannot tell "the hub is unreachable" from "the model does not exist". `hf-hub` 1.0 would
//! add several minutes of build (aws-lc, reqwest, xet). So this module talks to the hub itself with
//! a `ureq` agent that has connect/response/read timeouts ([`HubOptions::timeout`], env
//! `BELLA_HUB_TIMEOUT_SECS`), follows redirects by hand (to read the hub's `X-Linked-Etag` /
//! `X-Repo-Commit` before a redirect to the LFS/CDN host, and to send the token only to the hub
//! itself), and reports failures as a typed [`HubError`]. Downloads go to a temporary file in
//! `blobs/` that is synced and renamed into place, so an interrupted download never leaves a
//! corrupt blob.
//!
//! # Environment ([`HubOptions::from_env`])
//!
//! `HF_ENDPOINT`, `HF_HUB_CACHE` (or legacy `HUGGINGFACE_HUB_CACHE`), `HF_HOME`, `XDG_CACHE_HOME`,
//! `HF_TOKEN` (or legacy `HUGGING_FACE_HUB_TOKEN`), `HF_TOKEN_PATH`, `HF_HUB_OFFLINE`,
//! `HF_HUB_DISABLE_PROGRESS_BARS` and `BELLA_HUB_TIMEOUT_SECS`.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use hf_hub::{Cache, CacheRepo, Repo, RepoType};

/// The public Hugging Face hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// Default for [`HubOptions::timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The revision used when a hub id has no `@revision`.
pub const DEFAULT_REVISION: &str = "main";
/// The model configuration (required).
pub const CONFIG_FILE: &str = "config.json";
/// Unsharded safetensors weights.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Index of sharded safetensors weights.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";
/// Files that are fetched and used when the model has them.
pub const OPTIONAL_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// Downloads at least this large get a progress bar (when [`HubOptions::progress`]).
const PROGRESS_MIN_BYTES: u64 = 4 * 1024 * 1024;
/// Redirects followed per request.
const MAX_REDIRECTS: usize = 10;
/// Largest JSON answer read from the hub API.
const MAX_JSON_BYTES: u64 = 64 * 1024 * 1024;
/// Largest error body read for a message.
const MAX_ERROR_BODY_BYTES: u64 = 64 * 1024;

/// Every transfer from the hub gets an overall deadline: this many request timeouts
/// ([`HubOptions::timeout`]) of grace, plus the size at [`MIN_TRANSFER_BYTES_PER_SEC`]. The
/// request timeout itself is the stall timeout (no byte for that long fails at once); the
/// deadline catches a server that trickles bytes just often enough never to stall.
const DEADLINE_GRACE_TIMEOUTS: u32 = 5;

/// The slowest average rate a transfer may have, beyond the grace period (2 Mbit/s).
const MIN_TRANSFER_BYTES_PER_SEC: u64 = 256 * 1024;

// ---------------------------------------------------------------------------------------------
// Model sources
// ---------------------------------------------------------------------------------------------

/// Where a model comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A hub model id `org/name`, at `revision` (a branch, tag or commit; default `main`).
    Hub {
        repo_id: String,
        revision: Option<String>,
    },
    /// A local directory in the Hugging Face layout.
    Dir(PathBuf),
}

/// The names of the embedded demo models ([`crate::demo`]) as a model source: `demo` (its
/// LLaVA, what `train` records as the base when no `--model` was given), `demo:llava`,
/// `demo:clip`.
const DEMO_NAMES: [(&str, &str); 3] = [
    ("demo", crate::demo::LLAVA),
    ("demo:llava", crate::demo::LLAVA),
    ("demo:clip", crate::demo::CLIP),
];

/// Which embedded demo model `s` names (`demo` and `demo:llava`: [`crate::demo::LLAVA`];
/// `demo:clip`: [`crate::demo::CLIP`]), unless a model directory of that name is here.
pub fn demo_model(s: &str) -> Option<&'static str> {
    DEMO_NAMES
        .iter()
        .find(|(name, _)| *name == s)
        .filter(|_| !Path::new(s).join("config.json").is_file())
        .map(|(_, model)| *model)
}

impl ModelSource {
    /// An existing directory path -> [`ModelSource::Dir`]; the demo's names (`demo`,
    /// `demo:llava`, `demo:clip`, unless a model directory of that name is here) -> the embedded
    /// demo's directory; otherwise `org/name[@revision]` -> [`ModelSource::Hub`]; anything else
    /// a clear error.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        if s.trim().is_empty() {
            bail!("empty model source: expected a model directory or a hub id org/name[@revision]");
        }
        // `--model=~/x` reaches us unexpanded (the shell expands `~` only at a word's start).
        let expanded = s
            .strip_prefix("~/")
            .zip(crate::io::home_dir())
            .map(|(rest, home)| home.join(rest));
        let path = expanded.as_deref().unwrap_or(Path::new(s));
        if let Some(model) = demo_model(s) {
            return Ok(ModelSource::Dir(crate::demo::path(model)?));
        }
        if path.is_dir() {
            return Ok(ModelSource::Dir(path.to_path_buf()));
        }
        if path.exists() {
            bail!(
                "{s} is a file, not a model directory: pass the directory that holds config.json, \
                 or a hub id org/name[@revision]"
            );
        }
        if let Some(id) = hub_id_in_url(s) {
            bail!(
                "{s} is a web address: pass the hub id {id} (a revision with --revision or \
                 {id}@REV)"
            );
        }
        if looks_like_path(s) {
            match s
                .strip_suffix('/')
                .filter(|id| validate_repo_id(id).is_ok())
            {
                Some(id) => bail!(
                    "model directory {s} does not exist (for the hub model, write its id without \
                     the slash: {id})"
                ),
                None => bail!("model directory {s} does not exist"),
            }
        }
        let (repo_id, revision) = match s.split_once('@') {
            Some((repo_id, revision)) => (repo_id, Some(revision)),
            None => (s, None),
        };
        validate_repo_id(repo_id).map_err(|why| {
            anyhow!(
                "{s:?} is neither an existing directory nor a hub model id: {why} \
                 (expected org/name or org/name@revision; `demo` names the embedded demo LLaVA)"
            )
        })?;
        if let Some(revision) = revision {
            validate_revision(revision)
                .map_err(|why| anyhow!("invalid revision in {s:?}: {why}"))?;
        }
        Ok(ModelSource::Hub {
            repo_id: repo_id.to_string(),
            revision: revision.map(str::to_string),
        })
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModelSource::Hub {
                repo_id,
                revision: Some(revision),
            } => write!(f, "{repo_id}@{revision}"),
            ModelSource::Hub {
                repo_id,
                revision: None,
            } => write!(f, "{repo_id}"),
            ModelSource::Dir(dir) => write!(f, "{}", dir.display()),
        }
    }
}

impl std::str::FromStr for ModelSource {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Self::parse(s)
    }
}

/// The `org/name` and the revision of a hub id `org/name[@revision]`; `None` for a path, an
/// existing directory or a demo name.
pub fn split_hub_id(s: &str) -> Option<(&str, Option<&str>)> {
    if demo_model(s).is_some() || looks_like_path(s) || Path::new(s).exists() {
        return None;
    }
    let (repo_id, revision) = match s.split_once('@') {
        Some((repo_id, revision)) => (repo_id, Some(revision)),
        None => (s, None),
    };
    validate_repo_id(repo_id).ok()?;
    Some((repo_id, revision))
}

/// The `org/name` of a hub address people copy from a browser or from PEFT docs
/// (`https://huggingface.co/org/name[/tree/rev]`, `hf://org/name`), for a message saying to pass
/// the id; `None` for anything else.
fn hub_id_in_url(s: &str) -> Option<String> {
    let rest = s.strip_prefix("hf://").or_else(|| {
        let (_, after) = s.split_once("://")?;
        after.split_once('/').map(|(_, path)| path)
    })?;
    let mut parts = rest.split('/').filter(|p| !p.is_empty());
    let id = format!("{}/{}", parts.next()?, parts.next()?);
    validate_repo_id(&id).is_ok().then_some(id)
}

/// Strings that are meant as paths, never as hub ids.
fn looks_like_path(s: &str) -> bool {
    let bytes = s.as_bytes();
    s == "."
        || s == ".."
        || s.starts_with('/')
        || s.starts_with("./")
        || s.starts_with("../")
        || s.starts_with('~')
        || s.ends_with('/')
        || s.contains('\\')
        || (bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':')
}

/// The hub's rule for repo ids, restricted to `org/name`.
fn validate_repo_id(repo_id: &str) -> Result<(), String> {
    let parts: Vec<&str> = repo_id.split('/').collect();
    if parts.len() != 2 {
        return Err(format!("{repo_id:?} must have exactly one '/' (org/name)"));
    }
    for part in parts {
        if part.is_empty() {
            return Err(format!("{repo_id:?} has an empty org or name"));
        }
        if part.len() > 96 {
            return Err(format!("{part:?} is longer than 96 characters"));
        }
        if !part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "{part:?} may only hold letters, digits, '-', '_' and '.'"
            ));
        }
        let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if !word(part.chars().next()) || !word(part.chars().last()) {
            return Err(format!(
                "{part:?} must start and end with a letter, digit or '_'"
            ));
        }
        if part.contains("--") || part.contains("..") {
            return Err(format!("{part:?} may not contain '--' or '..'"));
        }
    }
    Ok(())
}

/// Revisions are branch/tag names or commit shas; they become a path under `refs/`.
fn validate_revision(revision: &str) -> Result<(), String> {
    if revision.is_empty() {
        return Err("the revision after '@' is empty".into());
    }
    if revision.len() > 256 {
        return Err("the revision is longer than 256 characters".into());
    }
    if revision
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '\\')
    {
        return Err(format!(
            "{revision:?} contains whitespace, control characters or '\\'"
        ));
    }
    if revision
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(format!(
            "{revision:?} has an empty, '.' or '..' path component"
        ));
    }
    Ok(())
}

fn is_commit_sha(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A single path component that the hub sent us (commit sha, etag) and that we use as a file name.
fn is_safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s != "."
        && s != ".."
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// A relative file path inside a model directory (as listed in an index): only normal components.
fn is_safe_rel_file(name: &str) -> bool {
    !name.is_empty()
        && !name.contains('\\')
        && Path::new(name)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

/// How to reach the hub and where its cache is.
#[derive(Clone)]
pub struct HubOptions {
    /// `HF_ENDPOINT` or `https://huggingface.co` (no trailing slash).
    pub endpoint: String,
    /// `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    pub cache_dir: PathBuf,
    /// `HF_TOKEN`, else the token file under `HF_HOME` (what `hf auth login` writes).
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE=1/true/yes/on` (or, when that is unset, `TRANSFORMERS_OFFLINE`): use the
    /// cache only, never the network.
    pub offline: bool,
    /// Limit for connecting, for waiting for an answer and for each read while downloading
    /// (`BELLA_HUB_TIMEOUT_SECS`, else the larger of huggingface_hub's `HF_HUB_ETAG_TIMEOUT` and
    /// `HF_HUB_DOWNLOAD_TIMEOUT`, default 10 s). Zero means the default.
    pub timeout: Duration,
    /// Show an indicatif progress bar for large downloads, and the status line of a loaded model
    /// (what it computes in) on standard error; `false` for a library caller that wants neither
    /// (warnings are written all the same).
    pub progress: bool,
}

impl fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the token itself.
        f.debug_struct("HubOptions")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("offline", &self.offline)
            .field("timeout", &self.timeout)
            .field("progress", &self.progress)
            .finish()
    }
}

impl HubOptions {
    /// Options from the process environment (see the module docs for the variables).
    pub fn from_env() -> Self {
        Self::from_lookup(|key| std::env::var(key).ok())
    }

    /// Options from a variable lookup (`from_env` uses `std::env::var`); empty values count as
    /// unset. The only side effects are reading the token file when no token variable is set, and
    /// the password database's home when the lookup has no HOME or USERPROFILE.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let get = |key: &str| {
            lookup(key)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let home = get("HOME")
            .or_else(|| get("USERPROFILE"))
            .map(PathBuf::from)
            .or_else(crate::io::home_dir)
            .unwrap_or_else(std::env::temp_dir);
        // As huggingface_hub reads its paths: `expandvars(expanduser(value))`.
        let expand = |p: String| -> PathBuf {
            let p = match p.strip_prefix("~/") {
                Some(rest) => home.join(rest).to_string_lossy().into_owned(),
                None if p == "~" => home.to_string_lossy().into_owned(),
                None => p,
            };
            PathBuf::from(expand_vars(&p, &lookup))
        };

        let endpoint = get("HF_ENDPOINT")
            .map(|e| e.trim_end_matches('/').to_string())
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let hf_home = get("HF_HOME").map(&expand).unwrap_or_else(|| {
            get("XDG_CACHE_HOME")
                .map(&expand)
                .unwrap_or_else(|| home.join(".cache"))
                .join("huggingface")
        });
        let cache_dir = get("HF_HUB_CACHE")
            .or_else(|| get("HUGGINGFACE_HUB_CACHE"))
            .map(&expand)
            .unwrap_or_else(|| hf_home.join("hub"));
        let token = get("HF_TOKEN")
            .or_else(|| get("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| match get("HF_TOKEN_PATH") {
                Some(path) => fs::read_to_string(expand(path))
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty()),
                // hf_hub's token file lives next to `<HF_HOME>/hub`.
                None => Cache::new(hf_home.join("hub")).token(),
            });
        // As huggingface_hub reads it: `HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE` (the first set
        // and non-empty decides).
        let offline = get("HF_HUB_OFFLINE")
            .filter(|v| !v.is_empty())
            .or_else(|| get("TRANSFORMERS_OFFLINE"))
            .is_some_and(|v| is_truthy(&v));
        // One timeout serves both of huggingface_hub's (metadata, downloads): the larger of
        // those set, unless this program's own is.
        let timeout = get("BELLA_HUB_TIMEOUT_SECS")
            .and_then(|v| parse_timeout_secs(&v))
            .or_else(|| {
                ["HF_HUB_ETAG_TIMEOUT", "HF_HUB_DOWNLOAD_TIMEOUT"]
                    .into_iter()
                    .filter_map(|key| get(key).and_then(|v| parse_timeout_secs(&v)))
                    .max()
            })
            .unwrap_or(DEFAULT_TIMEOUT);
        let progress = !get("HF_HUB_DISABLE_PROGRESS_BARS").is_some_and(|v| is_truthy(&v));
        HubOptions {
            endpoint,
            cache_dir,
            token,
            offline,
            timeout,
            progress,
        }
    }

    /// The timeout actually used (the default for zero).
    fn effective_timeout(&self) -> Duration {
        if self.timeout.is_zero() {
            DEFAULT_TIMEOUT
        } else {
            self.timeout
        }
    }
}

/// `1`, `true`, `yes`, `on` (any case), as `huggingface_hub` reads boolean variables.
fn is_truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "1" | "true" | "yes" | "on"
    )
}

/// Seconds (fractions allowed) > 0 and at most a day; anything else is ignored.
fn parse_timeout_secs(v: &str) -> Option<Duration> {
    let secs: f64 = v.trim().parse().ok()?;
    if !(secs.is_finite() && secs > 0.0 && secs <= 86_400.0) {
        return None;
    }
    Duration::try_from_secs_f64(secs).ok()
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Failures a caller may want to tell apart (returned inside `anyhow::Error`; use
/// `err.downcast_ref::<HubError>()`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HubError {
    /// No connection, DNS failure, timeout, or not an HTTP server.
    #[error(
        "the hub at {endpoint} could not be reached ({cause}){}",
        match offline_hint(cache_dir, *cached, *timed_out) {
            hint if hint.is_empty() => hint,
            hint => format!(". {hint}"),
        }
    )]
    Unreachable {
        endpoint: String,
        cause: String,
        timed_out: bool,
        cache_dir: PathBuf,
        /// Whether the requested model/revision is already in the cache.
        cached: bool,
    },
    /// The repo does not exist (or is private/gated and the request was not allowed to see it).
    #[error(
        "model {repo_id} was not found on the hub at {endpoint} (HTTP {status}): check the name. \
         If it is private or gated, {}",
        token_hint(*authenticated)
    )]
    RepoNotFound {
        repo_id: String,
        endpoint: String,
        status: u16,
        authenticated: bool,
    },
    /// The repo exists but the hub refused access (gated or private).
    #[error(
        "access to model {repo_id} on the hub at {endpoint} was refused (HTTP {status}): it is \
         gated or private. Request access on its hub page, then {}",
        token_hint(*authenticated)
    )]
    AccessDenied {
        repo_id: String,
        endpoint: String,
        status: u16,
        authenticated: bool,
    },
    /// The branch, tag or commit does not exist.
    #[error(
        "revision {revision:?} of model {repo_id} was not found on the hub at {endpoint}: check \
         the branch, tag or commit after '@'"
    )]
    RevisionNotFound {
        repo_id: String,
        revision: String,
        endpoint: String,
    },
    /// A file the repo listing promised is not there.
    #[error(
        "file {file} of model {repo_id} (commit {commit}) was not found on the hub at {endpoint}"
    )]
    FileNotFound {
        repo_id: String,
        commit: String,
        file: String,
        endpoint: String,
    },
    /// Any other HTTP failure status.
    #[error("the hub answered HTTP {status} for {url}{detail}")]
    Http {
        url: String,
        status: u16,
        detail: String,
    },
    /// An answer we cannot use (bad JSON, missing ETag, cut-off download, ...).
    #[error("unexpected answer from the hub for {url}: {reason}")]
    InvalidResponse { url: String, reason: String },
    /// Offline and the model/revision is not in the cache.
    #[error(
        "model {repo_id}@{revision} is not in the hub cache at {} (offline mode: --offline, \
         HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE). To fill the cache, run once online (without \
         --offline, with HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE unset), or run \
         `hf download {repo_id} --revision {revision}` \
         with the same HF_HUB_CACHE/HF_HOME; or pass a local model directory instead",
        cache_dir.display()
    )]
    NotInCache {
        repo_id: String,
        revision: String,
        cache_dir: PathBuf,
    },
    /// Neither `model.safetensors` nor `model.safetensors.index.json`.
    #[error(
        "no weights in {location}: expected model.safetensors or model.safetensors.index.json; \
         .bin/pytorch checkpoints are not supported, convert them to safetensors"
    )]
    NoWeights { location: String },
    /// A shard named in the index is missing.
    #[error("weight shard {shard} listed in {index} is missing")]
    MissingShard { index: String, shard: String },
    /// A required file is missing.
    #[error("required file {file} is missing in {location}")]
    MissingFile { file: String, location: String },
    /// A file or folder of the model this user may not read.
    #[error(
        "cannot read {}: permission denied: give this user read access to it (downloading \
         again cannot help)",
        path.display()
    )]
    NoAccess { path: PathBuf },
    /// The connection broke while a file was coming (after the hub had answered).
    #[error(
        "the download of {what} from {endpoint} broke off after {bytes} bytes ({cause}){}",
        if *kept { "; what came is kept: run again to resume it" } else { "; run again" }
    )]
    BrokeOff {
        endpoint: String,
        what: String,
        bytes: u64,
        cause: String,
        /// The partial file is kept (`blobs/{etag}.incomplete`) and resumed by the next run.
        kept: bool,
    },
    /// A transfer ran past its overall deadline (a server that trickles bytes).
    #[error(
        "the hub at {endpoint} sent {what} too slowly: {bytes} bytes in {seconds:.0} s, past the \
         deadline of {allowed:.0} s for {size} (at least {} KiB/s after a grace of {grace:.0} s). \
         Check the connection or use a mirror (HF_ENDPOINT); BELLA_HUB_TIMEOUT_SECS lengthens the grace",
        MIN_TRANSFER_BYTES_PER_SEC / 1024
    )]
    TooSlow {
        endpoint: String,
        what: String,
        bytes: u64,
        seconds: f64,
        allowed: f64,
        grace: f64,
        size: String,
    },
}

impl HubError {
    /// True for [`HubError::Unreachable`].
    pub fn is_unreachable(&self) -> bool {
        matches!(self, HubError::Unreachable { .. })
    }

    /// True when the hub cannot answer now (unreachable, 5xx, 429), as opposed to answering
    /// that something is not there or not allowed.
    pub fn is_down(&self) -> bool {
        match self {
            HubError::Unreachable { .. } | HubError::BrokeOff { .. } | HubError::TooSlow { .. } => {
                true
            }
            HubError::Http { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }

    /// Whether a cached snapshot is used instead, as huggingface_hub does
    /// (`_get_metadata_or_catch_error`, `snapshot_download`): for every failure to reach the hub
    /// or HTTP error but a missing revision (or file). A repo renamed or made private, an
    /// expired token for a gated model, or a proxy answering 403/404 leave the cache usable.
    pub fn falls_back_to_cache(&self) -> bool {
        matches!(
            self,
            HubError::Unreachable { .. }
                | HubError::BrokeOff { .. }
                | HubError::TooSlow { .. }
                | HubError::Http { .. }
                | HubError::RepoNotFound { .. }
                | HubError::AccessDenied { .. }
        )
    }

    /// True for the "does not exist / no access" family.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            HubError::RepoNotFound { .. }
                | HubError::RevisionNotFound { .. }
                | HubError::FileNotFound { .. }
                | HubError::AccessDenied { .. }
                | HubError::NotInCache { .. }
        )
    }
}

/// What to do about a hub that cannot be reached. A model already in the cache is used then,
/// with this error as the warning (and nothing to do); one that is not cannot be used offline.
fn offline_hint(cache_dir: &Path, cached: bool, timed_out: bool) -> String {
    let slow = if timed_out {
        " On a slow connection, raise the timeout with BELLA_HUB_TIMEOUT_SECS."
    } else {
        ""
    };
    if cached {
        return slow.trim_start().to_string();
    }
    format!(
        "The model is not in the cache at {} yet, so it cannot be used offline either: check \
         the network (or HF_ENDPOINT), or pass a local model directory.{slow}",
        cache_dir.display()
    )
}

fn token_hint(authenticated: bool) -> &'static str {
    if authenticated {
        "make sure the token in use (HF_TOKEN or the token file of `hf auth login`) \
         belongs to an account that has access"
    } else {
        "set HF_TOKEN to a token with access (or run `hf auth login`)"
    }
}

// ---------------------------------------------------------------------------------------------
// Resolved files
// ---------------------------------------------------------------------------------------------

/// The files of a resolved model: all in one directory (a hub snapshot dir or the user's dir).
#[derive(Clone, Debug)]
pub struct ModelFiles {
    /// The directory that holds every file.
    pub dir: PathBuf,
    /// `model.safetensors`, or the shards listed in `model.safetensors.index.json` (sorted,
    /// deduplicated).
    pub weights: Vec<PathBuf>,
    /// `model.safetensors.index.json` if sharded.
    pub index: Option<PathBuf>,
    /// Where the directory came from.
    pub origin: Origin,
}

/// Where the files of a [`ModelFiles`] came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A directory the user passed.
    Directory,
    /// A snapshot in the hub cache.
    HubCache {
        repo_id: String,
        revision: String,
        commit: String,
        cache_dir: PathBuf,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Directory => write!(f, "local directory"),
            Origin::HubCache {
                repo_id,
                revision,
                commit,
                cache_dir,
            } => write!(
                f,
                "hub model {repo_id}@{revision} (commit {commit}), cached in {}",
                cache_dir.display()
            ),
        }
    }
}

impl ModelFiles {
    /// Path of an optional file in `dir` if it exists (tokenizer.json, chat_template.json, ...).
    pub fn optional(&self, name: &str) -> Option<PathBuf> {
        if !is_safe_rel_file(name) {
            return None;
        }
        let path = self.dir.join(name);
        path.is_file().then_some(path)
    }

    /// Path of a required file or a clear error naming the file and the directory.
    pub fn required(&self, name: &str) -> anyhow::Result<PathBuf> {
        self.optional(name).ok_or_else(|| {
            HubError::MissingFile {
                file: name.to_string(),
                location: self.dir.display().to_string(),
            }
            .into()
        })
    }
}

/// Whether `err` comes of a file or folder this user may not read (downloading again cannot
/// help then).
fn is_denied(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        matches!(
            c.downcast_ref::<HubError>(),
            Some(HubError::NoAccess { .. })
        ) || c
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::PermissionDenied)
    })
}

/// The error for `path`, which this user may not read.
fn no_access(path: &Path) -> anyhow::Error {
    HubError::NoAccess {
        path: path.to_path_buf(),
    }
    .into()
}

/// Check a model directory and list its files.
fn collect_files(dir: &Path, origin: Origin) -> anyhow::Result<ModelFiles> {
    if !dir.is_dir() {
        bail!(
            "model directory {} does not exist or is not a directory",
            dir.display()
        );
    }
    if fs::read_dir(dir).is_err_and(|e| e.kind() == io::ErrorKind::PermissionDenied) {
        return Err(no_access(dir));
    }
    // A link into the hub cache's blobs/ whose blob is gone would read as a missing file (only
    // the files a model is read from count).
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let read = [CONFIG_FILE, WEIGHTS_INDEX_FILE].contains(&name.as_str())
                || OPTIONAL_FILES.contains(&name.as_str())
                || name.ends_with(".safetensors");
            if read && path.is_symlink() && !path.exists() {
                if fs::metadata(&path).is_err_and(|e| e.kind() == io::ErrorKind::PermissionDenied) {
                    return Err(no_access(&path));
                }
                bail!(
                    "{} is a link to a missing file ({}): the download is incomplete; download \
                     the model again",
                    path.display(),
                    fs::read_link(&path)
                        .map(|t| t.display().to_string())
                        .unwrap_or_default()
                );
            }
        }
    }
    let location = dir.display().to_string();
    let config = dir.join(CONFIG_FILE);
    if !config.exists() {
        let err = anyhow::Error::from(HubError::MissingFile {
            file: CONFIG_FILE.to_string(),
            location,
        });
        // Folders people pass for a model that are something else.
        let hint = if dir.join("adapter_config.json").is_file() {
            Some(format!(
                "{} is a PEFT adapter, not a model: pass its base model as --model, and the \
                 adapter to import-peft to make particles of it",
                dir.display()
            ))
        } else if dir.join("snapshots").is_dir() {
            Some(format!(
                "{} is a hub cache folder: pass the hub id (with --offline), or one of its \
                 snapshots ({}/snapshots/<commit>)",
                dir.display(),
                dir.display()
            ))
        } else if dir.file_name().is_some_and(|n| n == "snapshots") {
            Some(format!(
                "{} holds a hub cache folder's snapshots: pass one of them ({}/<commit>)",
                dir.display(),
                dir.display()
            ))
        } else if fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("models--"))
        }) {
            Some(format!(
                "{} is a hub cache: pass a hub id, with HF_HUB_CACHE={} (and --offline)",
                dir.display(),
                dir.display()
            ))
        } else if dir.is_relative() && validate_repo_id(&dir.to_string_lossy()).is_ok() {
            // A folder here of a hub id's name is read instead of the hub model, as in
            // transformers.
            Some(format!(
                "{} is a folder here, read instead of the hub model of that name: run from \
                 another folder to use the hub model",
                dir.display()
            ))
        } else {
            None
        };
        return Err(match hint {
            Some(hint) => err.context(hint),
            None => err,
        });
    }
    crate::input::check_regular(&config, "model config")?;
    // A file the model is read from that is there but not a regular file (a pipe, a folder)
    // would read as missing: named as what it is.
    for name in OPTIONAL_FILES
        .iter()
        .chain(&[WEIGHTS_FILE, WEIGHTS_INDEX_FILE])
    {
        let path = dir.join(name);
        if path.exists() {
            crate::input::check_regular(&path, "model file")?;
        }
    }
    let single = dir.join(WEIGHTS_FILE);
    let index = dir.join(WEIGHTS_INDEX_FILE);
    // The order transformers uses: a single file first, then an index.
    let (weights, index) = if single.is_file() {
        (vec![single], None)
    } else if index.is_file() {
        let shards = read_index(&index)?;
        let mut weights = Vec::with_capacity(shards.len());
        for shard in shards {
            let path = dir.join(&shard);
            // Present but not a regular file is refused when the weights are opened.
            if !path.exists() {
                return Err(HubError::MissingShard {
                    index: index.display().to_string(),
                    shard,
                }
                .into());
            }
            weights.push(path);
        }
        (weights, Some(index))
    } else {
        let mut shards: Vec<String> = fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".safetensors"))
                    .collect()
            })
            .unwrap_or_default();
        if !shards.is_empty() {
            shards.sort();
            bail!(
                "{location} holds {} but no {WEIGHTS_INDEX_FILE}, the index that says which \
                 tensor is in which file: download or copy it too",
                shards.join(", ")
            );
        }
        return Err(HubError::NoWeights { location }.into());
    };
    Ok(ModelFiles {
        dir: dir.to_path_buf(),
        weights,
        index,
        origin,
    })
}

/// The shard file names of a safetensors index (sorted, deduplicated, checked to be plain
/// relative names).
fn read_index(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| anyhow!("{} has no \"weight_map\" object", path.display()))?;
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            anyhow!(
                "{}: the weight_map entry of {tensor:?} is not a file name",
                path.display()
            )
        })?;
        if !is_safe_rel_file(file) {
            bail!(
                "{}: the weight_map entry of {tensor:?} is not a plain relative file name: {file:?}",
                path.display()
            );
        }
        shards.insert(file.to_string());
    }
    if shards.is_empty() {
        bail!("{}: the weight_map lists no shards", path.display());
    }
    Ok(shards.into_iter().collect())
}

// ---------------------------------------------------------------------------------------------
// Resolution
// ---------------------------------------------------------------------------------------------

/// Resolve a source to local files, downloading into the cache when online.
pub fn resolve(source: &ModelSource, opts: &HubOptions) -> anyhow::Result<ModelFiles> {
    match source {
        ModelSource::Dir(dir) => collect_files(dir, Origin::Directory),
        ModelSource::Hub { repo_id, revision } => {
            validate_repo_id(repo_id).map_err(|why| anyhow!("invalid hub model id: {why}"))?;
            let revision = revision.as_deref().unwrap_or(DEFAULT_REVISION);
            validate_revision(revision).map_err(|why| anyhow!("invalid revision: {why}"))?;
            if opts.offline {
                resolve_offline(repo_id, revision, opts)
            } else {
                resolve_online(repo_id, revision, opts)
            }
        }
    }
}

fn cache_repo(opts: &HubOptions, repo_id: &str, revision: &str) -> CacheRepo {
    Cache::new(opts.cache_dir.clone()).repo(Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        revision.to_string(),
    ))
}

fn repo_dir(opts: &HubOptions, repo_id: &str) -> PathBuf {
    opts.cache_dir
        .join(Repo::new(repo_id.to_string(), RepoType::Model).folder_name())
}

/// The commit a revision points to in the cache, if its snapshot directory exists.
fn cached_commit(opts: &HubOptions, repo_id: &str, revision: &str) -> Option<String> {
    let repo = cache_repo(opts, repo_id, revision);
    if is_commit_sha(revision) && repo.pointer_path(revision).is_dir() {
        return Some(revision.to_string());
    }
    let ref_path = repo_dir(opts, repo_id).join("refs").join(revision);
    let commit = fs::read_to_string(ref_path).ok()?.trim().to_string();
    (is_safe_name(&commit) && repo.pointer_path(&commit).is_dir()).then_some(commit)
}

/// The cached snapshot directory of any repo (a PEFT adapter too) at `revision` (default
/// `main`), without asking the hub.
pub fn cached_snapshot(
    repo_id: &str,
    revision: Option<&str>,
    opts: &HubOptions,
) -> anyhow::Result<PathBuf> {
    validate_repo_id(repo_id).map_err(|why| anyhow!("invalid hub id: {why}"))?;
    let revision = revision.unwrap_or(DEFAULT_REVISION);
    validate_revision(revision).map_err(|why| anyhow!("invalid revision: {why}"))?;
    let commit = cached_commit(opts, repo_id, revision).ok_or_else(|| {
        anyhow!(
            "{repo_id}@{revision} is not in the hub cache at {}: download it \
             (`hf download {repo_id} --revision {revision}`) and pass it again, or \
             pass its folder",
            opts.cache_dir.display()
        )
    })?;
    Ok(cache_repo(opts, repo_id, revision).pointer_path(&commit))
}

fn resolve_offline(repo_id: &str, revision: &str, opts: &HubOptions) -> anyhow::Result<ModelFiles> {
    resolve_cached(
        repo_id,
        revision,
        opts,
        "run once online (without --offline / HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) to complete it",
    )
}

/// The cached snapshot of `repo_id@revision`; `complete` says how to complete one that lacks
/// files.
fn resolve_cached(
    repo_id: &str,
    revision: &str,
    opts: &HubOptions,
    complete: &str,
) -> anyhow::Result<ModelFiles> {
    let Some(commit) = cached_commit(opts, repo_id, revision) else {
        let reference = repo_dir(opts, repo_id).join("refs").join(revision);
        if fs::read(&reference).is_err_and(|e| e.kind() == io::ErrorKind::PermissionDenied) {
            return Err(no_access(&reference));
        }
        return Err(HubError::NotInCache {
            repo_id: repo_id.to_string(),
            revision: revision.to_string(),
            cache_dir: opts.cache_dir.clone(),
        }
        .into());
    };
    let dir = cache_repo(opts, repo_id, revision).pointer_path(&commit);
    let origin = Origin::HubCache {
        repo_id: repo_id.to_string(),
        revision: revision.to_string(),
        commit,
        cache_dir: opts.cache_dir.clone(),
    };
    collect_files(&dir, origin).map_err(|e| {
        // A repository of PyTorch .bin files only is complete: downloading again cannot help.
        let bin_only = matches!(
            e.downcast_ref::<HubError>(),
            Some(HubError::NoWeights { .. })
        ) && fs::read_dir(&dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|f| f.file_name().to_string_lossy().ends_with(".bin"))
        });
        if bin_only || is_denied(&e) {
            return e;
        }
        // huggingface_hub writes a blob as `<sha>.incomplete` until it is whole.
        let interrupted = fs::read_dir(repo_dir(opts, repo_id).join("blobs")).is_ok_and(|blobs| {
            blobs
                .flatten()
                .any(|b| b.file_name().to_string_lossy().ends_with(".incomplete"))
        });
        let why = if interrupted {
            " (a download was interrupted: its blobs/*.incomplete is still there)"
        } else {
            ""
        };
        e.context(format!(
            "the cached snapshot of {repo_id}@{revision} at {} is incomplete{why}; {complete}",
            dir.display()
        ))
    })
}

fn resolve_online(repo_id: &str, revision: &str, opts: &HubOptions) -> anyhow::Result<ModelFiles> {
    let repo = cache_repo(opts, repo_id, revision);
    let origin_for = |commit: &str| Origin::HubCache {
        repo_id: repo_id.to_string(),
        revision: revision.to_string(),
        commit: commit.to_string(),
        cache_dir: opts.cache_dir.clone(),
    };

    // A commit sha never moves: a complete snapshot needs no network (as huggingface_hub).
    if is_commit_sha(revision) {
        let dir = repo.pointer_path(revision);
        if dir.is_dir() {
            if let Ok(files) = collect_files(&dir, origin_for(revision)) {
                return Ok(files);
            }
        }
    }

    let cached = cached_commit(opts, repo_id, revision).is_some();
    let client = Client::new(opts, cached);
    let info = match client.model_info(repo_id, revision) {
        Ok(info) => info,
        Err(e) if cached && e.falls_back_to_cache() => {
            crate::note!(
                "warning: {e}; using the cached snapshot of {repo_id}@{revision} (--offline or \
                 HF_HUB_OFFLINE=1 skips the hub)"
            );
            let complete = if e.is_down() {
                "reach the hub again (check the network or HF_ENDPOINT) to complete it"
            } else {
                "the hub refused to list it (see the warning above): fix the name or the token \
                 (HF_TOKEN) to complete it"
            };
            return resolve_cached(repo_id, revision, opts, complete);
        }
        Err(e) => return Err(e.into()),
    };
    let commit = info.sha;
    let siblings: HashSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let hub_location = format!("hub model {repo_id}@{revision} (commit {commit})");
    let snapshot = repo.pointer_path(&commit);

    if !siblings.contains(CONFIG_FILE) {
        return Err(HubError::MissingFile {
            file: CONFIG_FILE.to_string(),
            location: hub_location,
        }
        .into());
    }
    // The index first (it names the shards), the small files next, the weights last.
    let mut weights: Vec<String> = Vec::new();
    if siblings.contains(WEIGHTS_FILE) {
        weights.push(WEIGHTS_FILE.to_string());
    } else if siblings.contains(WEIGHTS_INDEX_FILE) {
        client.ensure_file(&repo, repo_id, &commit, WEIGHTS_INDEX_FILE)?;
        for shard in read_index(&snapshot.join(WEIGHTS_INDEX_FILE))? {
            if !siblings.contains(shard.as_str()) {
                return Err(HubError::MissingShard {
                    index: format!("{WEIGHTS_INDEX_FILE} of {hub_location}"),
                    shard,
                }
                .into());
            }
            weights.push(shard);
        }
    } else {
        return Err(HubError::NoWeights {
            location: hub_location,
        }
        .into());
    }
    let small = std::iter::once(CONFIG_FILE).chain(
        OPTIONAL_FILES
            .iter()
            .copied()
            .filter(|f| siblings.contains(f)),
    );
    for file in small.chain(weights.iter().map(String::as_str)) {
        client.ensure_file(&repo, repo_id, &commit, file)?;
    }
    if revision != commit {
        write_ref(&repo_dir(opts, repo_id), revision, &commit)?;
    }
    collect_files(&snapshot, origin_for(&commit))
}

/// `refs/<revision>` := commit, replaced atomically (hf_hub's `create_ref` truncates in place).
fn write_ref(repo_dir: &Path, revision: &str, commit: &str) -> anyhow::Result<()> {
    let path = repo_dir.join("refs").join(revision);
    if fs::read_to_string(&path).is_ok_and(|c| c.trim() == commit) {
        return Ok(());
    }
    let parent = path
        .parent()
        .ok_or_else(|| anyhow!("bad ref path {}", path.display()))?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let mut tmp = TempFile::create(parent, "ref")?;
    tmp.file.write_all(commit.as_bytes())?;
    tmp.persist(&path)
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

#[derive(serde::Deserialize)]
struct ModelInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

#[derive(serde::Deserialize)]
struct Sibling {
    rfilename: String,
}

/// A response after redirects, with what the hub said about the file on the way.
struct Fetched {
    response: ureq::http::Response<ureq::Body>,
    url: String,
    etag: Option<String>,
    size: Option<u64>,
    /// A redirect left unfollowed because the blob is already cached.
    skipped: bool,
    /// The byte the CDN was asked to start at (`Range`), for a download cut off before.
    resume_from: u64,
}

/// What the cache holds of a blob, as [`Client::fetch`] asks once the hub has named it.
enum Cached {
    Whole,
    /// `blobs/{etag}.incomplete`: this many bytes of a download cut off before.
    Part(u64),
    Nothing,
}

struct Client {
    agent: ureq::Agent,
    endpoint: String,
    endpoint_origin: Option<String>,
    token: Option<String>,
    timeout: Duration,
    cache_dir: PathBuf,
    cached: bool,
    progress: bool,
}

impl Client {
    fn new(opts: &HubOptions, cached: bool) -> Self {
        let timeout = opts.effective_timeout();
        let mut config = ureq::Agent::config_builder()
            .timeout_resolve(Some(timeout))
            .timeout_connect(Some(timeout))
            .timeout_send_request(Some(timeout))
            .timeout_recv_response(Some(timeout))
            .timeout_per_read(Some(timeout))
            .timeout_per_write(Some(timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(format!("bella-vqa/{}", env!("CARGO_PKG_VERSION")));
        if is_loopback(&opts.endpoint) {
            // A local endpoint (a mirror, the tests) is never reached through a proxy.
            config = config.proxy(None);
        }
        let endpoint = opts.endpoint.trim_end_matches('/').to_string();
        Client {
            agent: ureq::Agent::new_with_config(config.build()),
            endpoint_origin: url_origin(&endpoint),
            endpoint,
            token: opts.token.clone(),
            timeout,
            cache_dir: opts.cache_dir.clone(),
            cached,
            progress: opts.progress,
        }
    }

    fn unreachable(&self, cause: String, timed_out: bool) -> HubError {
        HubError::Unreachable {
            endpoint: redact(&self.endpoint),
            cause,
            timed_out,
            cache_dir: self.cache_dir.clone(),
            cached: self.cached,
        }
    }

    /// Map a transport error to [`HubError::Unreachable`] with a readable cause.
    fn classify(&self, err: ureq::Error, what: &str) -> HubError {
        let secs = self.timeout.as_secs_f64();
        if !(self.endpoint.starts_with("http://") || self.endpoint.starts_with("https://")) {
            return self.unreachable(
                format!(
                    "the endpoint {} is not an http:// or https:// URL (check HF_ENDPOINT)",
                    redact(&self.endpoint)
                ),
                false,
            );
        }
        match err {
            ureq::Error::Timeout(which) => {
                self.unreachable(format!("{what}: no answer within {secs} s ({which})"), true)
            }
            ureq::Error::HostNotFound => {
                self.unreachable(format!("{what}: host name not found (DNS)"), false)
            }
            ureq::Error::Io(e) => {
                let timed_out = matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                );
                self.unreachable(format!("{what}: {e}"), timed_out)
            }
            ureq::Error::BadUri(uri) => self.unreachable(
                format!("{what}: invalid URL {uri} (check HF_ENDPOINT)"),
                false,
            ),
            other => self.unreachable(format!("{what}: {other}"), false),
        }
    }

    /// GET `url`, from byte `from` on when it is not 0 (`Range`, to resume a download).
    fn send(&self, url: &str, from: u64) -> Result<ureq::http::Response<ureq::Body>, HubError> {
        let mut request = self.agent.get(url);
        if from > 0 {
            request = request.header("Range", format!("bytes={from}-"));
        }
        if let Some(token) = &self.token {
            // The token goes to the hub only, never to the CDN it redirects to.
            if self.endpoint_origin.is_some() && url_origin(url) == self.endpoint_origin {
                request = request.header("Authorization", format!("Bearer {token}"));
            }
        }
        request
            .call()
            .map_err(|e| self.classify(e, &format!("GET {}", redact(url))))
    }

    /// GET with redirects followed by hand; the ETag/size come from the last hub response (one
    /// with `X-Repo-Commit`), else from the final response. `cached` says what the cache holds
    /// of the blob the hub names: a whole one, and the redirect (to the CDN) is not followed
    /// (the redirect response is returned with `skipped` set); part of one, and the CDN is asked
    /// for the rest (`resume_from`).
    fn fetch(
        &self,
        url: &str,
        cached: Option<&dyn Fn(&str) -> Cached>,
    ) -> Result<Fetched, HubError> {
        let mut url = url.to_string();
        let mut etag = None;
        let mut size = None;
        let mut resume_from = 0;
        for _ in 0..=MAX_REDIRECTS {
            let response = self.send(&url, resume_from)?;
            let headers = response.headers();
            if header(headers, "x-repo-commit").is_some() {
                etag = header(headers, "x-linked-etag")
                    .or_else(|| header(headers, "etag"))
                    .map(|e| clean_etag(&e));
                size = header(headers, "x-linked-size").and_then(|s| s.parse().ok());
                let held = match (cached, &etag) {
                    (Some(cached), Some(etag)) if is_safe_name(etag) => cached(etag),
                    _ => Cached::Nothing,
                };
                match held {
                    Cached::Whole if response.status().is_redirection() => {
                        return Ok(Fetched {
                            response,
                            url,
                            etag,
                            size,
                            skipped: true,
                            resume_from,
                        });
                    }
                    Cached::Part(n) if response.status().is_redirection() => resume_from = n,
                    _ => {}
                }
            }
            if response.status().is_redirection() {
                if let Some(location) = header(headers, "location") {
                    url = join_url(&url, &location).ok_or_else(|| HubError::InvalidResponse {
                        url: redact(&url),
                        reason: format!("cannot follow the redirect to {location:?}"),
                    })?;
                    continue;
                }
            }
            if etag.is_none() {
                etag = header(headers, "x-linked-etag")
                    .or_else(|| header(headers, "etag"))
                    .map(|e| clean_etag(&e));
            }
            return Ok(Fetched {
                response,
                url,
                etag,
                size,
                skipped: false,
                resume_from,
            });
        }
        Err(HubError::InvalidResponse {
            url,
            reason: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }

    /// `GET /api/models/{repo}/revision/{revision}`.
    fn model_info(&self, repo_id: &str, revision: &str) -> Result<ModelInfo, HubError> {
        let url = format!(
            "{}/api/models/{repo_id}/revision/{}",
            self.endpoint,
            encode(revision, false)
        );
        let fetched = self.fetch(&url, None)?;
        let status = fetched.response.status().as_u16();
        let authenticated = self.token.is_some();
        match status {
            200..=299 => {}
            404 => {
                let code = header(fetched.response.headers(), "x-error-code");
                let revision_missing = match code.as_deref() {
                    Some("RevisionNotFound") => true,
                    Some(_) => false,
                    // No error code: a repo that answers without a revision means the revision
                    // is the missing part.
                    None => revision != DEFAULT_REVISION && self.repo_exists(repo_id),
                };
                return Err(if revision_missing {
                    HubError::RevisionNotFound {
                        repo_id: repo_id.to_string(),
                        revision: revision.to_string(),
                        endpoint: redact(&self.endpoint),
                    }
                } else {
                    HubError::RepoNotFound {
                        repo_id: repo_id.to_string(),
                        endpoint: redact(&self.endpoint),
                        status,
                        authenticated,
                    }
                });
            }
            // Without a token the hub answers 401 for repos that do not exist as well.
            401 if !authenticated
                && header(fetched.response.headers(), "x-error-code").as_deref()
                    != Some("GatedRepo") =>
            {
                return Err(HubError::RepoNotFound {
                    repo_id: repo_id.to_string(),
                    endpoint: redact(&self.endpoint),
                    status,
                    authenticated,
                });
            }
            401 | 403 => {
                return Err(HubError::AccessDenied {
                    repo_id: repo_id.to_string(),
                    endpoint: redact(&self.endpoint),
                    status,
                    authenticated,
                })
            }
            _ => return Err(http_error(fetched)),
        }
        let url = fetched.url;
        let mut reader = fetched
            .response
            .into_body()
            .into_with_config()
            .limit(MAX_JSON_BYTES)
            .reader();
        let mut bytes = Vec::new();
        self.read_within_deadline(&mut reader, &redact(&url), None, |chunk| {
            bytes.extend_from_slice(chunk);
            Ok::<(), HubError>(())
        })?;
        let text = String::from_utf8(bytes).map_err(|e| HubError::InvalidResponse {
            url: redact(&url),
            reason: format!("the answer is not UTF-8 ({e})"),
        })?;
        let info: ModelInfo =
            serde_json::from_str(&text).map_err(|e| HubError::InvalidResponse {
                url: redact(&url),
                reason: format!("not the model info JSON expected ({e})"),
            })?;
        if !is_safe_name(&info.sha) {
            return Err(HubError::InvalidResponse {
                url,
                reason: format!("invalid commit sha {:?}", info.sha),
            });
        }
        Ok(info)
    }

    /// Whether `GET /api/models/{repo}` succeeds (tells a bad revision from a bad repo).
    fn repo_exists(&self, repo_id: &str) -> bool {
        let url = format!("{}/api/models/{repo_id}", self.endpoint);
        self.fetch(&url, None)
            .is_ok_and(|f| f.response.status().is_success())
    }

    /// Make `snapshots/{commit}/{file}` exist: nothing to do when it does, link an existing blob
    /// when the hub's ETag is already in `blobs/`, download otherwise.
    fn ensure_file(
        &self,
        repo: &CacheRepo,
        repo_id: &str,
        commit: &str,
        file: &str,
    ) -> anyhow::Result<()> {
        if !is_safe_rel_file(file) {
            bail!("refusing to fetch {file:?} from {repo_id}: not a plain relative file name");
        }
        let pointer = repo.pointer_path(commit).join(file);
        if pointer.is_file() {
            return Ok(());
        }
        let url = format!(
            "{}/{repo_id}/resolve/{commit}/{}",
            self.endpoint,
            encode(file, true)
        );
        let cached = |etag: &str| {
            let blob = repo.blob_path(etag);
            if blob.is_file() {
                Cached::Whole
            } else {
                fs::metadata(partial_path(&blob)).map_or(Cached::Nothing, |m| Cached::Part(m.len()))
            }
        };
        let fetched = self.fetch(&url, Some(&cached))?;
        let status = fetched.response.status().as_u16();
        match status {
            _ if fetched.skipped => {}
            200..=299 => {}
            404 => {
                return Err(HubError::FileNotFound {
                    repo_id: repo_id.to_string(),
                    commit: commit.to_string(),
                    file: file.to_string(),
                    endpoint: redact(&self.endpoint),
                }
                .into())
            }
            401 | 403 => {
                return Err(HubError::AccessDenied {
                    repo_id: repo_id.to_string(),
                    endpoint: redact(&self.endpoint),
                    status,
                    authenticated: self.token.is_some(),
                }
                .into())
            }
            _ => return Err(http_error(fetched).into()),
        }
        let etag = match &fetched.etag {
            Some(etag) if is_safe_name(etag) => etag.clone(),
            other => {
                return Err(HubError::InvalidResponse {
                    url: redact(&fetched.url),
                    reason: format!("missing or invalid ETag {other:?} for {file}"),
                }
                .into())
            }
        };
        let blob = repo.blob_path(&etag);
        if !blob.is_file() {
            // huggingface_hub's lock of this blob: a download by either waits for the other.
            let lock = self
                .cache_dir
                .join(".locks")
                .join(Repo::new(repo_id.to_string(), RepoType::Model).folder_name())
                .join(format!("{etag}.lock"));
            self.download_blob(fetched, &lock, &blob, file)?;
        }
        link_pointer(&blob, &pointer, file)
    }

    /// Reads `reader` to its end, handing each chunk to `sink`, within the overall deadline of
    /// a transfer of `expected` bytes (or, unknown, of the bytes so far); `what` names the file
    /// or URL in errors. A `sink` error stops the transfer and is returned. Returns the number
    /// of bytes read.
    fn read_within_deadline<E: From<HubError>>(
        &self,
        reader: &mut impl Read,
        what: &str,
        expected: Option<u64>,
        mut sink: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<u64, E> {
        let started = Instant::now();
        let grace = self.timeout * DEADLINE_GRACE_TIMEOUTS;
        let mut buf = vec![0u8; 1 << 20];
        let mut read: u64 = 0;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(read),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(HubError::BrokeOff {
                        endpoint: redact(&self.endpoint),
                        what: what.to_string(),
                        bytes: read,
                        cause: e.to_string(),
                        kept: false,
                    }
                    .into())
                }
            };
            read += n as u64;
            sink(&buf[..n])?;
            let budget = expected.unwrap_or(read).max(read);
            let allowed =
                grace + Duration::from_secs_f64(budget as f64 / MIN_TRANSFER_BYTES_PER_SEC as f64);
            let elapsed = started.elapsed();
            if elapsed > allowed {
                return Err(HubError::TooSlow {
                    endpoint: redact(&self.endpoint),
                    what: what.to_string(),
                    bytes: read,
                    seconds: elapsed.as_secs_f64(),
                    allowed: allowed.as_secs_f64(),
                    grace: grace.as_secs_f64(),
                    size: match expected {
                        Some(s) => format!("its {s} bytes"),
                        None => format!("the {read} bytes so far"),
                    },
                }
                .into());
            }
        }
    }

    /// Streams the body into `blobs/{etag}.incomplete` (after the part a cut-off download left
    /// there, when the CDN sends the rest), syncs it and renames it into place, as
    /// huggingface_hub does and under its lock file `lock`. A download that breaks off keeps
    /// what came, for the next run to resume.
    fn download_blob(
        &self,
        fetched: Fetched,
        lock: &Path,
        blob: &Path,
        file: &str,
    ) -> anyhow::Result<()> {
        use fs4::FileExt;
        use std::io::{Seek, SeekFrom};
        let blobs_dir = blob
            .parent()
            .ok_or_else(|| anyhow!("bad blob path {}", blob.display()))?;
        fs::create_dir_all(blobs_dir)
            .with_context(|| format!("creating {}", blobs_dir.display()))?;
        remove_abandoned_downloads(blobs_dir);
        if let Some(dir) = lock.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let lock_file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(lock)
            .with_context(|| format!("opening the lock file {}", lock.display()))?;
        // Another process downloading the same blob: wait for it, then take its work.
        FileExt::lock(&lock_file).with_context(|| format!("locking {}", lock.display()))?;
        if blob.is_file() {
            return Ok(());
        }
        let part_path = partial_path(blob);
        let mut part = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part_path)
            .with_context(|| format!("creating {}", part_path.display()))?;
        let held = part
            .metadata()
            .with_context(|| format!("reading {}", part_path.display()))?
            .len();
        let headers = fetched.response.headers();
        // Resumed only where the CDN sends exactly the rest (206 from the byte asked for); any
        // other answer is the whole file.
        let start = match fetched.response.status().as_u16() {
            206 => {
                let from = header(headers, "content-range")
                    .and_then(|r| r.strip_prefix("bytes ")?.split('-').next()?.parse().ok());
                if from != Some(fetched.resume_from) || fetched.resume_from > held {
                    return Err(HubError::InvalidResponse {
                        url: redact(&fetched.url),
                        reason: format!(
                            "asked for {file} from byte {}, the answer starts at {from:?}; \
                             run again",
                            fetched.resume_from
                        ),
                    }
                    .into());
                }
                fetched.resume_from
            }
            _ => 0,
        };
        let remaining = match fetched.size {
            Some(total) => Some(total.saturating_sub(start)),
            // A decoded (gzip) body does not have the Content-Length size.
            None if header(headers, "content-encoding").is_some() => None,
            None => header(headers, "content-length").and_then(|s| s.parse().ok()),
        };
        let expected = remaining.map(|r| r + start);
        part.set_len(start)
            .and_then(|()| part.seek(SeekFrom::Start(start)))
            .with_context(|| format!("writing {}", part_path.display()))?;
        let bar = match expected {
            Some(len) if self.progress && len >= PROGRESS_MIN_BYTES => {
                let bar = progress_bar(len, file);
                bar.set_position(start);
                Some(bar)
            }
            _ => None,
        };
        let url = fetched.url;
        let mut reader = fetched.response.into_body().into_reader();
        let written = self
            .read_within_deadline(&mut reader, file, remaining, |chunk| {
                part.write_all(chunk)
                    .with_context(|| format!("writing {}", part_path.display()))?;
                if let Some(bar) = &bar {
                    bar.inc(chunk.len() as u64);
                }
                anyhow::Ok(())
            })
            .map_err(|e| match e.downcast::<HubError>() {
                // What came stays for the next run (the file is written as it comes).
                Ok(HubError::BrokeOff {
                    endpoint,
                    what,
                    bytes,
                    cause,
                    ..
                }) => HubError::BrokeOff {
                    endpoint,
                    what,
                    bytes: start + bytes,
                    cause,
                    kept: true,
                }
                .into(),
                Ok(other) => other.into(),
                Err(e) => e,
            })?;
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        if let Some(expected) = expected {
            if start + written != expected {
                return Err(HubError::BrokeOff {
                    endpoint: redact(&url_origin(&url).unwrap_or(url)),
                    what: file.to_string(),
                    bytes: start + written,
                    cause: format!("{expected} bytes were announced"),
                    kept: true,
                }
                .into());
            }
        }
        part.sync_all()
            .with_context(|| format!("syncing {}", part_path.display()))?;
        fs::rename(&part_path, blob)
            .with_context(|| format!("moving {} to {}", part_path.display(), blob.display()))
    }
}

/// Where a blob's download goes until it is whole: `blobs/{etag}.incomplete`, as
/// huggingface_hub names it (so that either resumes the other's).
fn partial_path(blob: &Path) -> PathBuf {
    let mut name = blob.file_name().unwrap_or_default().to_os_string();
    name.push(".incomplete");
    blob.with_file_name(name)
}

/// Removes the temporary downloads of earlier versions of this program
/// (`.download.PID.….incomplete`, never resumed) whose process is gone.
fn remove_abandoned_downloads(blobs_dir: &Path) {
    // Whether a process runs is told by /proc (Linux); elsewhere nothing is removed.
    let Ok(entries) = fs::read_dir(blobs_dir) else {
        return;
    };
    if !Path::new("/proc/self").is_dir() {
        return;
    }
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(".download.")?.split('.').next())
        else {
            continue;
        };
        let alive = pid == std::process::id().to_string() || Path::new("/proc").join(pid).is_dir();
        if !alive && pid.bytes().all(|b| b.is_ascii_digit()) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

fn progress_bar(len: u64, file: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(file.to_string());
    bar
}

/// HTTP error with the hub's `{"error": ...}` message when there is one.
fn http_error(fetched: Fetched) -> HubError {
    let status = fetched.response.status().as_u16();
    let mut body = fetched.response.into_body();
    let detail = body
        .with_config()
        .limit(MAX_ERROR_BODY_BYTES)
        .read_to_string()
        .ok()
        .and_then(|text| {
            serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        })
        .map(|msg| format!(": {msg}"))
        .unwrap_or_default();
    HubError::Http {
        url: redact(&fetched.url),
        status,
        detail,
    }
}

/// `url` as a message may show it: a user name and password in it (`http://user:pw@host`)
/// written as `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

fn header(headers: &ureq::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

/// `W/"abc"` -> `abc`.
fn clean_etag(etag: &str) -> String {
    let etag = etag.trim();
    let etag = etag.strip_prefix("W/").unwrap_or(etag);
    etag.trim_matches('"').to_string()
}

/// Percent-encode everything but unreserved characters (and `/` when `keep_slash`).
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `scheme://authority` of a URL, lower-cased.
fn url_origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    if scheme.is_empty() || authority.is_empty() {
        return None;
    }
    Some(format!("{scheme}://{authority}").to_ascii_lowercase())
}

/// Resolve a `Location` header against the URL it came from (absolute, scheme-relative,
/// absolute-path and relative-path forms).
fn join_url(base: &str, location: &str) -> Option<String> {
    let lower = location.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Some(location.to_string());
    }
    let (scheme, rest) = base.split_once("://")?;
    if let Some(r) = location.strip_prefix("//") {
        return Some(format!("{scheme}://{r}"));
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let origin = &base[..scheme.len() + 3 + authority_end];
    if location.starts_with('/') {
        return Some(format!("{origin}{location}"));
    }
    let path = rest[authority_end..].split(['?', '#']).next().unwrap_or("");
    let dir = match path.rfind('/') {
        Some(i) => &path[..=i],
        None => "/",
    };
    Some(format!("{origin}{dir}{location}"))
}

fn is_loopback(endpoint: &str) -> bool {
    let Some(origin) = url_origin(endpoint) else {
        return false;
    };
    let authority = origin.split_once("://").map_or("", |(_, a)| a);
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    let host = if let Some(rest) = host_port.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

// ---------------------------------------------------------------------------------------------
// Cache files
// ---------------------------------------------------------------------------------------------

/// A file created under a unique name that is removed on drop unless persisted by rename.
struct TempFile {
    path: PathBuf,
    file: fs::File,
    persisted: bool,
}

impl TempFile {
    fn create(dir: &Path, tag: &str) -> anyhow::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            ".{tag}.{}.{nanos}.{}.incomplete",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
        let file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(TempFile {
            path,
            file,
            persisted: false,
        })
    }

    fn persist(mut self, dest: &Path) -> anyhow::Result<()> {
        self.file
            .sync_all()
            .with_context(|| format!("syncing {}", self.path.display()))?;
        fs::rename(&self.path, dest)
            .with_context(|| format!("moving {} to {}", self.path.display(), dest.display()))?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// `snapshots/{commit}/{file}` -> `../../blobs/{etag}` (one more `..` per subfolder), created
/// under a temporary name and renamed over any stale entry.
fn link_pointer(blob: &Path, pointer: &Path, file: &str) -> anyhow::Result<()> {
    let parent = pointer
        .parent()
        .ok_or_else(|| anyhow!("bad snapshot path {}", pointer.display()))?;
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let blob_name = blob
        .file_name()
        .ok_or_else(|| anyhow!("bad blob path {}", blob.display()))?;
    let mut target = PathBuf::new();
    for _ in 0..Path::new(file).components().count() + 1 {
        target.push("..");
    }
    target.push("blobs");
    target.push(blob_name);
    place_link(blob, &target, pointer, parent)
        .with_context(|| format!("linking {} to {}", pointer.display(), blob.display()))
}

#[cfg(unix)]
fn place_link(_blob: &Path, target: &Path, pointer: &Path, parent: &Path) -> anyhow::Result<()> {
    let tmp = parent.join(format!(
        ".link.{}.{}.incomplete",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::os::unix::fs::symlink(target, &tmp)?;
    if let Err(e) = fs::rename(&tmp, pointer) {
        let _ = fs::remove_file(&tmp);
        return Err(e.into());
    }
    Ok(())
}

#[cfg(not(unix))]
fn place_link(blob: &Path, target: &Path, pointer: &Path, parent: &Path) -> anyhow::Result<()> {
    // Like huggingface_hub on Windows without symlink rights: fall back to a copy.
    let _ = fs::remove_file(pointer);
    #[cfg(windows)]
    if std::os::windows::fs::symlink_file(target, pointer).is_ok() {
        return Ok(());
    }
    let _ = target;
    let mut tmp = TempFile::create(parent, "copy")?;
    io::copy(&mut fs::File::open(blob)?, &mut tmp.file)?;
    tmp.persist(pointer)
}

/// `$NAME` and `${NAME}` replaced by the variable's value where it is set, left as written
/// where it is not (Python's `os.path.expandvars` on POSIX).
fn expand_vars(text: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = match after.strip_prefix('{') {
            Some(inner) => match inner.find('}') {
                Some(end) => (&inner[..end], end + 2),
                None => ("", 0),
            },
            None => {
                let end = after.find(|c: char| !is_name(c)).unwrap_or(after.len());
                (&after[..end], end)
            }
        };
        match lookup(name).filter(|_| !name.is_empty() && name.chars().all(is_name)) {
            Some(value) => out.push_str(&value),
            None => out.push_str(&rest[at..at + 1 + len]),
        }
        rest = &rest[at + 1 + len..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_url_forms() {
        let base = "http://h:1/org/name/resolve/abc/model.safetensors?x=1";
        assert_eq!(
            join_url(base, "/cdn/x").as_deref(),
            Some("http://h:1/cdn/x")
        );
        assert_eq!(
            join_url(base, "https://cdn.example/x").as_deref(),
            Some("https://cdn.example/x")
        );
        assert_eq!(join_url(base, "//cdn/x").as_deref(), Some("http://cdn/x"));
        assert_eq!(
            join_url(base, "other").as_deref(),
            Some("http://h:1/org/name/resolve/abc/other")
        );
        assert_eq!(join_url("http://h", "x").as_deref(), Some("http://h/x"));
    }

    #[test]
    fn etags_and_origins() {
        assert_eq!(clean_etag("W/\"abc\""), "abc");
        assert_eq!(clean_etag("\"abc\""), "abc");
        assert_eq!(
            url_origin("HTTP://Host:8/x?y"),
            Some("http://host:8".into())
        );
        assert!(is_loopback("http://127.0.0.1:5000"));
        assert!(is_loopback("http://localhost"));
        assert!(is_loopback("http://[::1]:80/"));
        assert!(!is_loopback("https://huggingface.co"));
        assert_eq!(encode("refs/pr/1", false), "refs%2Fpr%2F1");
        assert_eq!(encode("a b/c.json", true), "a%20b/c.json");
        // A file this user may not read is not called missing or incomplete.
        let denied = anyhow::Error::from(io::Error::from(io::ErrorKind::PermissionDenied))
            .context("reading config.json");
        assert!(is_denied(&denied));
        assert!(!is_denied(&anyhow!("truncated")));
        // Credentials in HF_ENDPOINT are never shown.
        assert_eq!(
            redact("http://user:pw@mirror:8080/api?x=a@b"),
            "http://***@mirror:8080/api?x=a@b"
        );
        assert_eq!(redact("https://hf.co/a@b"), "https://hf.co/a@b");
        assert_eq!(redact("mirror"), "mirror");
        // Hub addresses copied from a browser name their id.
        for url in [
            "https://huggingface.co/llava-hf/llava-1.5-7b-hf",
            "https://huggingface.co/llava-hf/llava-1.5-7b-hf/tree/main",
            "hf://llava-hf/llava-1.5-7b-hf",
        ] {
            assert_eq!(
                hub_id_in_url(url).as_deref(),
                Some("llava-hf/llava-1.5-7b-hf"),
                "{url}"
            );
            let err = ModelSource::parse(url).unwrap_err().to_string();
            assert!(
                err.contains("pass the hub id llava-hf/llava-1.5-7b-hf"),
                "{err}"
            );
        }
        assert_eq!(hub_id_in_url("llava-hf/llava-1.5-7b-hf"), None);
        let err = ModelSource::parse("no-such-org/no-such-model/")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("without the slash: no-such-org/no-such-model"),
            "{err}"
        );
        assert_eq!(
            partial_path(Path::new("/c/blobs/0a1b")),
            Path::new("/c/blobs/0a1b.incomplete")
        );
    }

    #[test]
    fn names() {
        assert!(validate_repo_id("llava-hf/llava-1.5-7b-hf").is_ok());
        assert!(validate_repo_id("a/b/c").is_err());
        assert!(validate_repo_id("a/-b").is_err());
        assert!(validate_repo_id("a/b..c").is_err());
        assert!(validate_revision("refs/pr/1").is_ok());
        assert!(validate_revision("../x").is_err());
        assert!(is_safe_rel_file("sub/model.safetensors"));
        assert!(!is_safe_rel_file("../model.safetensors"));
        assert!(!is_safe_rel_file("/etc/passwd"));
        assert!(!is_safe_name("a/b"));
    }
}
