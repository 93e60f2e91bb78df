//! Integration tests of `bella_vqa::hub`, all offline: a small HTTP server on 127.0.0.1 serves the
//! hub's URL layout from a directory of files.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bella_vqa::hub::{resolve, HubError, HubOptions, ModelFiles, ModelSource, Origin};
use common::{assert_close, fixture, get, reference, reference_prompt};

const SHA_A: &str = "0123456789abcdef0123456789abcdef01234567";
const SHA_B: &str = "89abcdef0123456789abcdef0123456789abcdef";
const SHARD_1: &str = "model-00001-of-00002.safetensors";
const SHARD_2: &str = "model-00002-of-00002.safetensors";

// ------------------------------------------------------------------------------------------------
// Fake models
// ------------------------------------------------------------------------------------------------

/// A valid safetensors file with one F32 tensor.
fn write_safetensors(path: &Path, tensor: &str, values: &[f32]) {
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut header = format!(
        r#"{{"{tensor}":{{"dtype":"F32","shape":[{}],"data_offsets":[0,{}]}}}}"#,
        values.len(),
        data.len()
    );
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&data);
    std::fs::write(path, bytes).unwrap();
}

fn write_common(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type": "llava"}"#).unwrap();
    std::fs::write(dir.join("tokenizer.json"), r#"{"version": "1.0"}"#).unwrap();
}

/// config.json, tokenizer.json, an index and two shards (the index names shard 2 twice).
fn make_sharded_model(dir: &Path) {
    write_common(dir);
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        format!(
            r#"{{"metadata": {{"total_size": 32}}, "weight_map": {{
                "b.weight": "{SHARD_2}", "a.weight": "{SHARD_1}", "c.weight": "{SHARD_2}"}}}}"#
        ),
    )
    .unwrap();
    write_safetensors(&dir.join(SHARD_1), "a.weight", &[1.0, 2.0]);
    write_safetensors(&dir.join(SHARD_2), "b.weight", &[3.0, 4.0]);
}

fn make_single_model(dir: &Path) {
    write_common(dir);
    write_safetensors(&dir.join("model.safetensors"), "w", &[1.0, 2.0, 3.0]);
}

// ------------------------------------------------------------------------------------------------
// A fake hub
// ------------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Request {
    path: String,
    authorization: Option<String>,
    range: Option<String>,
}

#[derive(Clone)]
struct RepoSpec {
    id: String,
    dir: PathBuf,
    /// When set, requests without `Authorization: Bearer <token>` get 401 GatedRepo.
    token: Option<String>,
}

struct State {
    repos: Vec<RepoSpec>,
    sha: Mutex<String>,
    /// Send `X-Error-Code` headers as the real hub does.
    error_codes: bool,
    /// Redirect LFS files to an absolute `http://host:port/cdn/...` URL instead of `/cdn/...`.
    absolute_redirects: bool,
    /// Send only half of each CDN body (with the full Content-Length), then close.
    truncate_cdn: AtomicBool,
    /// Send each CDN body one byte every 200 ms (a server that never stalls long enough to time
    /// out, yet would take forever).
    trickle_cdn: bool,
    port: u16,
    log: Mutex<Vec<Request>>,
}

struct HubServer {
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct ServerOptions {
    no_error_codes: bool,
    absolute_redirects: bool,
    truncate_cdn: bool,
    trickle_cdn: bool,
}

impl HubServer {
    fn start(repos: Vec<RepoSpec>, options: ServerOptions) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            repos,
            sha: Mutex::new(SHA_A.to_string()),
            error_codes: !options.no_error_codes,
            absolute_redirects: options.absolute_redirects,
            truncate_cdn: AtomicBool::new(options.truncate_cdn),
            trickle_cdn: options.trickle_cdn,
            port,
            log: Mutex::new(Vec::new()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let state = state.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let state = state.clone();
                    std::thread::spawn(move || handle_connection(stream, &state));
                }
            })
        };
        HubServer {
            state,
            stop,
            handle: Some(handle),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.state.port)
    }

    fn set_sha(&self, sha: &str) {
        *self.state.sha.lock().unwrap() = sha.to_string();
    }

    fn requests(&self) -> Vec<Request> {
        self.state.log.lock().unwrap().clone()
    }

    fn count(&self, prefix: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.path.starts_with(prefix))
            .count()
    }

    /// Stop accepting and close the port.
    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.state.port));
        if let Some(handle) = self.handle.take() {
            handle.join().unwrap();
        }
    }
}

/// A hub-style etag: a 64-hex-digit string derived from the content (FNV-1a, 4 seeds).
fn etag_of(bytes: &[u8]) -> String {
    (0u64..4)
        .map(|seed| {
            let mut h: u64 = 0xcbf29ce484222325 ^ seed;
            for b in bytes {
                h ^= *b as u64;
                h = h.wrapping_mul(0x100000001b3);
            }
            format!("{h:016x}")
        })
        .collect()
}

fn list_files(dir: &Path, prefix: &str, out: &mut Vec<String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        if entry.path().is_dir() {
            list_files(&entry.path(), &format!("{name}/"), out);
        } else {
            out.push(name);
        }
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Announce this Content-Length instead of the body's.
    content_length: Option<usize>,
}

fn reply(status: u16, headers: &[(&str, String)], body: Vec<u8>) -> Reply {
    Reply {
        status,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        body,
        content_length: None,
    }
}

fn json_error(status: u16, code: Option<&str>, state: &State, message: &str) -> Reply {
    let mut headers = vec![("Content-Type", "application/json".to_string())];
    if let (Some(code), true) = (code, state.error_codes) {
        headers.push(("X-Error-Code", code.to_string()));
    }
    reply(
        status,
        &headers,
        format!(r#"{{"error": "{message}"}}"#).into_bytes(),
    )
}

fn handle_connection(mut stream: TcpStream, state: &State) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    });
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() || request_line.is_empty() {
        return;
    }
    let mut authorization = None;
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() || line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("authorization") {
                authorization = Some(value.trim().to_string());
            }
            if name.eq_ignore_ascii_case("range") {
                range = Some(value.trim().to_string());
            }
        }
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_string();
    state.log.lock().unwrap().push(Request {
        path: path.clone(),
        authorization: authorization.clone(),
        range: range.clone(),
    });
    let r = route(state, &path, authorization.as_deref(), range.as_deref());
    let reason = match r.status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Other",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", r.status);
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        r.content_length.unwrap_or(r.body.len())
    ));
    let _ = stream.write_all(head.as_bytes());
    if state.trickle_cdn && path.starts_with("/cdn/") {
        for byte in &r.body {
            std::thread::sleep(Duration::from_millis(200));
            if stream
                .write_all(&[*byte])
                .and_then(|()| stream.flush())
                .is_err()
            {
                return;
            }
        }
    }
    let _ = stream.write_all(&r.body);
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

fn route(state: &State, path: &str, authorization: Option<&str>, range: Option<&str>) -> Reply {
    let path = path.replace("%2F", "/");
    let sha = state.sha.lock().unwrap().clone();
    let find = |id: &str| state.repos.iter().find(|r| r.id == id);
    let allowed = |repo: &RepoSpec| match &repo.token {
        None => true,
        Some(t) => authorization == Some(format!("Bearer {t}").as_str()),
    };

    if let Some(rest) = path.strip_prefix("/cdn/") {
        for repo in &state.repos {
            let mut files = Vec::new();
            list_files(&repo.dir, "", &mut files);
            for file in files {
                let bytes = std::fs::read(repo.dir.join(&file)).unwrap();
                if etag_of(&bytes) == rest {
                    // `Range: bytes=N-` is answered with the rest, as a CDN does.
                    let from: usize = range
                        .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
                        .unwrap_or(0);
                    let len = bytes.len();
                    let mut r = if from > 0 && from < len {
                        reply(
                            206,
                            &[("Content-Range", format!("bytes {from}-{}/{len}", len - 1))],
                            bytes[from..].to_vec(),
                        )
                    } else {
                        reply(200, &[("ETag", "\"cdn-etag-ignored\"".into())], bytes)
                    };
                    if state.truncate_cdn.load(Ordering::SeqCst) {
                        let announced = r.body.len();
                        r.body.truncate(announced / 2);
                        r.content_length = Some(announced);
                    }
                    return r;
                }
            }
        }
        return reply(404, &[], Vec::new());
    }

    if let Some(rest) = path.strip_prefix("/api/models/") {
        let parts: Vec<&str> = rest.splitn(4, '/').collect();
        let id = parts[..2.min(parts.len())].join("/");
        let Some(repo) = find(&id) else {
            return json_error(404, Some("RepoNotFound"), state, "Repository not found");
        };
        if !allowed(repo) {
            return json_error(
                401,
                Some("GatedRepo"),
                state,
                "Access to this repo is restricted",
            );
        }
        let revision = match parts.as_slice() {
            [_, _] => return reply(200, &[], format!(r#"{{"id": "{id}"}}"#).into_bytes()),
            [_, _, "revision", rev] => *rev,
            _ => return reply(404, &[], Vec::new()),
        };
        if revision != "main" && revision != sha {
            return json_error(404, Some("RevisionNotFound"), state, "Invalid rev id");
        }
        let mut files = Vec::new();
        list_files(&repo.dir, "", &mut files);
        let siblings: Vec<String> = files
            .iter()
            .map(|f| format!(r#"{{"rfilename": "{f}"}}"#))
            .collect();
        let body = format!(
            r#"{{"id": "{id}", "sha": "{sha}", "siblings": [{}]}}"#,
            siblings.join(",")
        );
        return reply(
            200,
            &[("Content-Type", "application/json".into())],
            body.into_bytes(),
        );
    }

    // /{org}/{name}/resolve/{rev}/{file...}
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    if let [org, name, "resolve", rev, file] = parts.as_slice() {
        let id = format!("{org}/{name}");
        let Some(repo) = find(&id) else {
            return json_error(404, Some("RepoNotFound"), state, "Repository not found");
        };
        if !allowed(repo) {
            return json_error(
                401,
                Some("GatedRepo"),
                state,
                "Access to this repo is restricted",
            );
        }
        if *rev != "main" && *rev != sha {
            return json_error(404, Some("RevisionNotFound"), state, "Invalid rev id");
        }
        let Ok(bytes) = std::fs::read(repo.dir.join(file)) else {
            return json_error(404, Some("EntryNotFound"), state, "Entry not found");
        };
        let etag = etag_of(&bytes);
        if file.ends_with(".safetensors") {
            let location = if state.absolute_redirects {
                format!("http://127.0.0.1:{}/cdn/{etag}", state.port)
            } else {
                format!("/cdn/{etag}")
            };
            return reply(
                302,
                &[
                    ("Location", location),
                    ("X-Repo-Commit", sha.clone()),
                    ("X-Linked-Etag", format!("\"{etag}\"")),
                    ("X-Linked-Size", bytes.len().to_string()),
                    ("ETag", "\"git-pointer-etag\"".into()),
                ],
                Vec::new(),
            );
        }
        return reply(
            200,
            &[
                ("X-Repo-Commit", sha.clone()),
                ("ETag", format!("W/\"{etag}\"")),
            ],
            bytes,
        );
    }
    reply(404, &[], Vec::new())
}

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

fn options(endpoint: &str, cache_dir: &Path) -> HubOptions {
    HubOptions {
        endpoint: endpoint.to_string(),
        cache_dir: cache_dir.to_path_buf(),
        token: None,
        offline: false,
        timeout: Duration::from_secs(10),
        progress: false,
    }
}

/// A local hub serving one public repository from `dir`.
fn serve_one(id: &str, dir: &Path) -> HubServer {
    HubServer::start(
        vec![RepoSpec {
            id: id.into(),
            dir: dir.to_path_buf(),
            token: None,
        }],
        ServerOptions::default(),
    )
}

fn hub(repo_id: &str, revision: Option<&str>) -> ModelSource {
    ModelSource::Hub {
        repo_id: repo_id.to_string(),
        revision: revision.map(str::to_string),
    }
}

fn hub_error(err: &anyhow::Error) -> &HubError {
    err.downcast_ref::<HubError>()
        .unwrap_or_else(|| panic!("not a HubError: {err:#}"))
}

/// Run `f` on a thread; fail (instead of hanging) if it takes longer than `limit`.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("did not finish within {limit:?}"))
}

fn file_names(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if dir.exists() {
        list_files(dir, "", &mut out);
    }
    out
}

/// Every file of `model_dir` resolved from the hub is byte-identical to the source.
fn assert_same_content(files: &ModelFiles, model_dir: &Path) {
    let mut names = Vec::new();
    list_files(model_dir, "", &mut names);
    for name in names {
        if let Some(path) = files.optional(&name) {
            assert_eq!(
                std::fs::read(&path).unwrap(),
                std::fs::read(model_dir.join(&name)).unwrap(),
                "{name}"
            );
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Sources and options
// ------------------------------------------------------------------------------------------------

#[test]
fn parse_model_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_str().unwrap();
    assert_eq!(
        ModelSource::parse(dir).unwrap(),
        ModelSource::Dir(tmp.path().to_path_buf())
    );
    assert_eq!(
        ModelSource::parse("llava-hf/llava-1.5-7b-hf").unwrap(),
        hub("llava-hf/llava-1.5-7b-hf", None)
    );
    assert_eq!(
        ModelSource::parse("openai/clip-vit-base-patch32@main").unwrap(),
        hub("openai/clip-vit-base-patch32", Some("main"))
    );
    assert_eq!(
        ModelSource::parse("org/name@refs/pr/1").unwrap(),
        hub("org/name", Some("refs/pr/1"))
    );
    assert_eq!(
        ModelSource::parse("org/name@refs/pr/1")
            .unwrap()
            .to_string(),
        "org/name@refs/pr/1"
    );
    assert_eq!(hub("org/name", None).to_string(), "org/name");
    assert_eq!(
        ModelSource::Dir(tmp.path().to_path_buf()).to_string(),
        dir.to_string()
    );
    // The embedded demo by name (what `train` records as the base without --model); the
    // repository's own demo/ folder holds no config.json, so the name wins here too.
    for (name, model) in [
        ("demo", bella_vqa::demo::LLAVA),
        ("demo:llava", bella_vqa::demo::LLAVA),
        ("demo:clip", bella_vqa::demo::CLIP),
    ] {
        assert_eq!(
            ModelSource::parse(name).unwrap(),
            ModelSource::Dir(bella_vqa::demo::path(model).unwrap()),
            "{name}"
        );
        // Its cache copy given by path (as an exported demo adapter names its base) is stored
        // by name as well: the path changes with the cache.
        let path = bella_vqa::demo::path(model).unwrap();
        let stored = bella_vqa::io::stored_model_source(path.to_str().unwrap());
        assert_eq!(stored, if name == "demo:clip" { name } else { "demo" });
    }
    // Another folder is stored by its path.
    let stored = bella_vqa::io::stored_model_source(tmp.path().to_str().unwrap());
    assert_eq!(stored, tmp.path().display().to_string());

    for bad in [
        "",
        "gpt2",
        "a/b/c",
        "org/",
        "/name",
        "org/-x",
        "org/a..b",
        "org/na me",
    ] {
        let err = ModelSource::parse(bad).unwrap_err().to_string();
        assert!(
            err.contains("org/name") || err.contains("empty") || err.contains("does not exist"),
            "{bad:?}: {err}"
        );
    }
    let err = ModelSource::parse("org/name@").unwrap_err().to_string();
    assert!(err.contains("revision"), "{err}");
    let err = ModelSource::parse("org/name@../x").unwrap_err().to_string();
    assert!(err.contains("revision"), "{err}");
    let missing = tmp.path().join("missing");
    let err = ModelSource::parse(missing.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not exist"), "{err}");
    let err = ModelSource::parse("./no-such-model")
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not exist"), "{err}");
    let file = tmp.path().join("config.json");
    std::fs::write(&file, "{}").unwrap();
    let err = ModelSource::parse(file.to_str().unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("is a file"), "{err}");
    assert_eq!(
        "org/name".parse::<ModelSource>().unwrap(),
        hub("org/name", None)
    );
}

#[test]
fn options_from_lookup() {
    let home = tempfile::tempdir().unwrap();
    let env = |pairs: &[(&str, &str)]| -> HubOptions {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubOptions::from_lookup(move |k| map.get(k).cloned())
    };
    let h = home.path().to_str().unwrap();

    let o = env(&[("HOME", h)]);
    assert_eq!(o.endpoint, "https://huggingface.co");
    assert_eq!(o.cache_dir, home.path().join(".cache/huggingface/hub"));
    assert_eq!(o.token, None);
    assert!(!o.offline);
    assert_eq!(o.timeout, Duration::from_secs(10));
    assert!(o.progress);

    let o = env(&[("HOME", h), ("XDG_CACHE_HOME", "/xdg")]);
    assert_eq!(o.cache_dir, PathBuf::from("/xdg/huggingface/hub"));

    // HF_HOME gives the cache and the token file (what `hf auth login` writes).
    let hf_home = home.path().join("hf");
    std::fs::create_dir_all(&hf_home).unwrap();
    std::fs::write(hf_home.join("token"), "hf_file_token\n").unwrap();
    let o = env(&[("HOME", h), ("HF_HOME", hf_home.to_str().unwrap())]);
    assert_eq!(o.cache_dir, hf_home.join("hub"));
    assert_eq!(o.token.as_deref(), Some("hf_file_token"));

    // Variables in the paths are expanded as huggingface_hub does (`expandvars`); unset ones
    // stay as written.
    let o = env(&[("HOME", h), ("BASE", "/data"), ("HF_HOME", "$BASE/hf")]);
    assert_eq!(o.cache_dir, PathBuf::from("/data/hf/hub"));
    let o = env(&[
        ("HOME", h),
        ("BASE", "/data"),
        ("HF_HUB_CACHE", "${BASE}_x/$UNSET/$"),
    ]);
    assert_eq!(o.cache_dir, PathBuf::from("/data_x/$UNSET/$"));
    let o = env(&[("HOME", h), ("HF_HOME", "~/$HOME-like")]);
    assert_eq!(o.cache_dir, PathBuf::from(format!("{h}/{h}-like/hub")));

    // HF_HUB_CACHE wins over HF_HOME for the cache; HF_TOKEN over the token file.
    let o = env(&[
        ("HOME", h),
        ("HF_HOME", hf_home.to_str().unwrap()),
        ("HF_HUB_CACHE", "/elsewhere/hub"),
        ("HF_TOKEN", "hf_env_token"),
        ("HF_ENDPOINT", "http://127.0.0.1:9999/"),
        ("HF_HUB_OFFLINE", "1"),
        ("BELLA_HUB_TIMEOUT_SECS", "2.5"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "true"),
    ]);
    assert_eq!(o.cache_dir, PathBuf::from("/elsewhere/hub"));
    assert_eq!(o.token.as_deref(), Some("hf_env_token"));
    assert_eq!(o.endpoint, "http://127.0.0.1:9999");
    assert!(o.offline);
    assert_eq!(o.timeout, Duration::from_millis(2500));
    assert!(!o.progress);
    let debug = format!("{o:?}");
    assert!(!debug.contains("hf_env_token"), "{debug}");
    // huggingface_hub's timeouts, the larger of those set, unless this program's own is.
    let timeout = |vars: &[(&str, &str)]| env(&[&[("HOME", h)], vars].concat()).timeout;
    assert_eq!(
        timeout(&[("HF_HUB_ETAG_TIMEOUT", "1")]),
        Duration::from_secs(1)
    );
    assert_eq!(
        timeout(&[
            ("HF_HUB_ETAG_TIMEOUT", "1"),
            ("HF_HUB_DOWNLOAD_TIMEOUT", "30")
        ]),
        Duration::from_secs(30)
    );
    assert_eq!(
        timeout(&[
            ("HF_HUB_ETAG_TIMEOUT", "1"),
            ("BELLA_HUB_TIMEOUT_SECS", "4")
        ]),
        Duration::from_secs(4)
    );

    for (value, offline) in [
        ("yes", true),
        ("TRUE", true),
        ("on", true),
        ("0", false),
        ("no", false),
        ("", false),
    ] {
        assert_eq!(
            env(&[("HOME", h), ("HF_HUB_OFFLINE", value)]).offline,
            offline,
            "{value}"
        );
    }
    // TRANSFORMERS_OFFLINE when HF_HUB_OFFLINE is unset or empty, as huggingface_hub reads them.
    for (vars, offline) in [
        (&[("TRANSFORMERS_OFFLINE", "1")][..], true),
        (
            &[("HF_HUB_OFFLINE", ""), ("TRANSFORMERS_OFFLINE", "1")][..],
            true,
        ),
        (
            &[("HF_HUB_OFFLINE", "0"), ("TRANSFORMERS_OFFLINE", "1")][..],
            false,
        ),
        (&[("TRANSFORMERS_OFFLINE", "0")][..], false),
    ] {
        let mut all = vec![("HOME", h)];
        all.extend_from_slice(vars);
        assert_eq!(env(&all).offline, offline, "{vars:?}");
    }
    for bad in ["abc", "-1", "0", "inf", "1e12"] {
        assert_eq!(
            env(&[("HOME", h), ("BELLA_HUB_TIMEOUT_SECS", bad)]).timeout,
            Duration::from_secs(10),
            "{bad}"
        );
    }
    let o = env(&[("HOME", h), ("HF_HOME", "~/hf2")]);
    assert_eq!(o.cache_dir, home.path().join("hf2/hub"));
}

// ------------------------------------------------------------------------------------------------
// Local directories
// ------------------------------------------------------------------------------------------------

#[test]
fn local_sharded_directory() {
    let tmp = tempfile::tempdir().unwrap();
    make_sharded_model(tmp.path());
    let files = resolve(
        &ModelSource::Dir(tmp.path().to_path_buf()),
        &options("http://127.0.0.1:9", tmp.path()),
    )
    .unwrap();
    assert_eq!(files.dir, tmp.path());
    assert_eq!(file_names(&files.weights), vec![SHARD_1, SHARD_2]);
    assert_eq!(
        files.index.as_deref(),
        Some(tmp.path().join("model.safetensors.index.json").as_path())
    );
    assert_eq!(files.origin, Origin::Directory);
    assert_eq!(files.origin.to_string(), "local directory");
    assert!(files.optional("tokenizer.json").is_some());
    assert!(files.optional("chat_template.json").is_none());
    assert_eq!(
        files.required("config.json").unwrap(),
        tmp.path().join("config.json")
    );
    let err = files
        .required("chat_template.json")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("chat_template.json") && err.contains(tmp.path().to_str().unwrap()),
        "{err}"
    );
}

#[test]
fn local_single_file_directory() {
    let tmp = tempfile::tempdir().unwrap();
    make_single_model(tmp.path());
    let files = resolve(
        &ModelSource::Dir(tmp.path().to_path_buf()),
        &options("http://127.0.0.1:9", tmp.path()),
    )
    .unwrap();
    assert_eq!(file_names(&files.weights), vec!["model.safetensors"]);
    assert!(files.index.is_none());
}

#[test]
fn local_directory_without_safetensors() {
    let expected = "expected model.safetensors or model.safetensors.index.json; .bin/pytorch \
                    checkpoints are not supported, convert them to safetensors";
    let tmp = tempfile::tempdir().unwrap();
    write_common(tmp.path());
    let opts = options("http://127.0.0.1:9", tmp.path());
    let source = ModelSource::Dir(tmp.path().to_path_buf());
    let err = resolve(&source, &opts).unwrap_err();
    assert!(matches!(hub_error(&err), HubError::NoWeights { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("no weights in {}", tmp.path().display())) && msg.contains(expected),
        "{msg}"
    );

    std::fs::write(tmp.path().join("pytorch_model.bin"), b"not supported").unwrap();
    let msg = resolve(&source, &opts).unwrap_err().to_string();
    assert!(msg.contains(expected), "{msg}");
}

#[test]
fn local_directory_missing_shard_or_config() {
    let tmp = tempfile::tempdir().unwrap();
    make_sharded_model(tmp.path());
    std::fs::remove_file(tmp.path().join(SHARD_2)).unwrap();
    let opts = options("http://127.0.0.1:9", tmp.path());
    let source = ModelSource::Dir(tmp.path().to_path_buf());
    let err = resolve(&source, &opts).unwrap_err();
    assert!(
        matches!(hub_error(&err), HubError::MissingShard { shard, .. } if shard == SHARD_2),
        "{err}"
    );
    assert!(err.to_string().contains(SHARD_2), "{err}");

    std::fs::remove_file(tmp.path().join("config.json")).unwrap();
    let err = resolve(&source, &opts).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");

    let err = resolve(&ModelSource::Dir(tmp.path().join("nope")), &opts)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn local_directory_with_shards_but_no_index_or_a_dangling_link_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    make_sharded_model(tmp.path());
    let opts = options("http://127.0.0.1:9", tmp.path());
    let source = ModelSource::Dir(tmp.path().to_path_buf());
    // A link whose target is gone (a hub snapshot whose blob was deleted).
    let link = tmp.path().join("chat_template.jinja");
    std::os::unix::fs::symlink(tmp.path().join("blobs/0123abcd"), &link).unwrap();
    let err = resolve(&source, &opts).unwrap_err().to_string();
    assert!(
        err.contains("chat_template.jinja is a link to a missing file") && err.contains("0123abcd"),
        "{err}"
    );
    std::fs::remove_file(&link).unwrap();
    assert!(resolve(&source, &opts).is_ok());
    // A dangling shard is named as such too; a dangling file the model is not read from is not
    // a reason to refuse it.
    let shard = tmp.path().join(SHARD_2);
    let kept = std::fs::read(&shard).unwrap();
    std::fs::remove_file(&shard).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("blobs/feed"), &shard).unwrap();
    let err = resolve(&source, &opts).unwrap_err().to_string();
    assert!(err.contains("is a link to a missing file"), "{err}");
    std::fs::remove_file(&shard).unwrap();
    std::fs::write(&shard, kept).unwrap();
    std::os::unix::fs::symlink(tmp.path().join("blobs/0ld"), tmp.path().join("README.md")).unwrap();
    assert!(resolve(&source, &opts).is_ok());
    std::fs::remove_file(tmp.path().join("model.safetensors.index.json")).unwrap();
    let err = resolve(&source, &opts).unwrap_err().to_string();
    assert!(
        err.contains(SHARD_2) && err.contains("no model.safetensors.index.json"),
        "{err}"
    );
}

// ------------------------------------------------------------------------------------------------
// The hub
// ------------------------------------------------------------------------------------------------

/// Download `model_dir` through a fake hub into an empty cache and check everything about it;
/// used with our temporary model and with the committed fixture.
fn download_resolve_reuse_offline(
    model_dir: &Path,
    server_options: ServerOptions,
) -> (tempfile::TempDir, ModelFiles) {
    let cache = tempfile::tempdir().unwrap();
    let repo_id = "bella-test/tiny";
    let server = HubServer::start(
        vec![RepoSpec {
            id: repo_id.into(),
            dir: model_dir.to_path_buf(),
            token: None,
        }],
        server_options,
    );
    let opts = options(&server.endpoint(), cache.path());

    let files = resolve(&hub(repo_id, None), &opts).unwrap();
    let repo_dir = cache.path().join("models--bella-test--tiny");
    let snapshot = repo_dir.join("snapshots").join(SHA_A);
    assert_eq!(files.dir, snapshot);
    assert_eq!(
        files.origin,
        Origin::HubCache {
            repo_id: repo_id.into(),
            revision: "main".into(),
            commit: SHA_A.into(),
            cache_dir: cache.path().to_path_buf(),
        }
    );
    assert!(files.origin.to_string().contains(SHA_A));
    assert_same_content(&files, model_dir);
    assert!(files.required("config.json").is_ok());

    // The layout huggingface_hub writes.
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        SHA_A
    );
    let blobs: BTreeSet<String> = files_under(&repo_dir.join("blobs")).into_iter().collect();
    let snapshot_files = files_under(&snapshot);
    let targets: BTreeSet<String> = snapshot_files
        .iter()
        .map(|name| {
            let link = std::fs::read_link(snapshot.join(name)).unwrap();
            link.file_name().unwrap().to_string_lossy().into_owned()
        })
        .collect();
    assert_eq!(
        blobs, targets,
        "every blob is linked, nothing else is in blobs/"
    );
    for name in &snapshot_files {
        let link = std::fs::read_link(snapshot.join(name)).unwrap();
        let depth = name.matches('/').count() + 2;
        let expected_prefix = "../".repeat(depth) + "blobs/";
        assert!(
            link.to_str().unwrap().starts_with(&expected_prefix),
            "{name} -> {link:?}"
        );
        let bytes = std::fs::read(model_dir.join(name)).unwrap();
        // Blobs are named by the hub's (linked) etag, not by the CDN's.
        assert_eq!(link.file_name().unwrap().to_str().unwrap(), etag_of(&bytes));
    }
    let api = server.count("/api/");
    let downloads = server.count("/bella-test/") + server.count("/cdn/");
    assert_eq!(api, 1);
    assert!(server.requests().iter().all(|r| r.authorization.is_none()));

    // Online again: metadata only, no download.
    let again = resolve(&hub(repo_id, None), &opts).unwrap();
    assert_eq!(again.weights, files.weights);
    assert_eq!(server.count("/api/"), api + 1);
    assert_eq!(
        server.count("/bella-test/") + server.count("/cdn/"),
        downloads
    );

    // Offline, with the server gone (the endpoint would refuse connections now).
    let endpoint = server.endpoint();
    server.stop();
    let offline = HubOptions {
        offline: true,
        ..options(&endpoint, cache.path())
    };
    let cached = resolve(&hub(repo_id, None), &offline).unwrap();
    assert_eq!(cached.dir, files.dir);
    assert_eq!(cached.weights, files.weights);
    assert_eq!(cached.origin, files.origin);
    let cached = resolve(&hub(repo_id, Some(SHA_A)), &offline).unwrap();
    assert_eq!(cached.weights, files.weights);
    // Online with the hub unreachable: the cached snapshot, as huggingface_hub falls back to it.
    let fallback = resolve(&hub(repo_id, None), &options(&endpoint, cache.path())).unwrap();
    assert_eq!(fallback.weights, files.weights);
    assert_eq!(fallback.origin, files.origin);
    // A commit sha that is complete in the cache needs no network even when online.
    let pinned = resolve(
        &hub(repo_id, Some(SHA_A)),
        &options(&endpoint, cache.path()),
    )
    .unwrap();
    assert_eq!(pinned.weights, files.weights);
    (cache, cached)
}

#[test]
fn hub_download_fills_cache_reuses_it_and_works_offline() {
    let model = tempfile::tempdir().unwrap();
    make_sharded_model(model.path());
    download_resolve_reuse_offline(model.path(), ServerOptions::default());
}

#[test]
fn hub_single_file_model_with_absolute_redirects() {
    let model = tempfile::tempdir().unwrap();
    make_single_model(model.path());
    download_resolve_reuse_offline(
        model.path(),
        ServerOptions {
            absolute_redirects: true,
            ..Default::default()
        },
    );
}

/// The committed tiny LLaVA in hub layout: downloaded through the local hub, then loaded from
/// the cache with the server stopped, it gives transformers' logits.
#[test]
fn hub_fixture_llava_tiny_downloads_and_loads_offline() {
    use bella_vqa::models::{self, Model};
    use candle_core::{DType, Device};
    let (_cache, files) =
        download_resolve_reuse_offline(&fixture("llava-tiny-hub"), ServerOptions::default());
    assert_eq!(files.weights.len(), 2, "both shards");
    let loaded = models::load(&files, &Device::Cpu, DType::F32).unwrap();
    let Model::Llava(m) = loaded.model else {
        panic!("not LLaVA")
    };
    let text = reference_prompt("text");
    let mut cache = m.language_model.new_cache();
    let logits = m
        .forward(&text.input(), &mut cache, 1, false)
        .unwrap()
        .logits;
    assert_close(
        "text.logits",
        &logits,
        get(&reference("llava"), "text.logits"),
    );
}

#[test]
fn hub_new_commit_reuses_unchanged_blobs() {
    let model = tempfile::tempdir().unwrap();
    make_sharded_model(model.path());
    let cache = tempfile::tempdir().unwrap();
    let server = serve_one("bella-test/tiny", model.path());
    let opts = options(&server.endpoint(), cache.path());
    resolve(&hub("bella-test/tiny", None), &opts).unwrap();
    assert_eq!(server.count("/cdn/"), 2);

    server.set_sha(SHA_B);
    let files = resolve(&hub("bella-test/tiny", None), &opts).unwrap();
    assert!(files.dir.ends_with(SHA_B));
    assert_eq!(
        server.count("/cdn/"),
        2,
        "unchanged shards were downloaded again"
    );
    let repo_dir = cache.path().join("models--bella-test--tiny");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        SHA_B
    );
    assert_eq!(files_under(&repo_dir.join("blobs")).len(), 5);
    assert!(repo_dir.join("snapshots").join(SHA_A).is_dir());
    server.stop();
}

#[test]
fn hub_large_download_with_progress() {
    let model = tempfile::tempdir().unwrap();
    write_common(model.path());
    let values: Vec<f32> = (0..(6 << 20) / 4).map(|i| i as f32).collect();
    write_safetensors(&model.path().join("model.safetensors"), "big", &values);
    let cache = tempfile::tempdir().unwrap();
    let server = serve_one("bella-test/big", model.path());
    let opts = HubOptions {
        progress: true,
        ..options(&server.endpoint(), cache.path())
    };
    let files = resolve(&hub("bella-test/big", None), &opts).unwrap();
    assert_same_content(&files, model.path());
    server.stop();
}

#[test]
fn hub_interrupted_download_is_kept_apart_and_resumed() {
    let model = tempfile::tempdir().unwrap();
    make_sharded_model(model.path());
    let cache = tempfile::tempdir().unwrap();
    let server = HubServer::start(
        vec![RepoSpec {
            id: "bella-test/tiny".into(),
            dir: model.path().to_path_buf(),
            token: None,
        }],
        ServerOptions {
            truncate_cdn: true,
            ..Default::default()
        },
    );
    let opts = options(&server.endpoint(), cache.path());
    let err = resolve(&hub("bella-test/tiny", None), &opts).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("model-0000") && msg.contains("broke off") && msg.contains("resume"),
        "{msg}"
    );
    assert!(!msg.contains("could not be reached"), "{msg}");
    let repo_dir = cache.path().join("models--bella-test--tiny");
    // What came is kept as huggingface_hub keeps it: `{etag}.incomplete`, the file's beginning.
    let shard = std::fs::read(model.path().join(SHARD_1)).unwrap();
    let partial = repo_dir
        .join("blobs")
        .join(format!("{}.incomplete", etag_of(&shard)));
    let kept = std::fs::read(&partial).unwrap();
    assert!(
        !kept.is_empty() && kept.len() < shard.len() && shard.starts_with(&kept),
        "{} of {} bytes",
        kept.len(),
        shard.len()
    );
    for blob in files_under(&repo_dir.join("blobs")) {
        if blob.ends_with(".incomplete") {
            continue;
        }
        let bytes = std::fs::read(repo_dir.join("blobs").join(&blob)).unwrap();
        assert_eq!(blob, etag_of(&bytes), "a blob does not match its etag");
    }
    for name in files_under(&repo_dir.join("snapshots")) {
        assert!(
            !name.ends_with(".safetensors"),
            "{name} linked after a failed download"
        );
    }
    // No ref to a half-downloaded snapshot: offline use reports "not in cache".
    assert!(!repo_dir.join("refs/main").exists());

    // The next run asks the CDN for the rest only, and the blob is whole.
    server.state.truncate_cdn.store(false, Ordering::SeqCst);
    let files = resolve(&hub("bella-test/tiny", None), &opts).unwrap();
    assert_same_content(&files, model.path());
    let resumed: Vec<_> = server
        .requests()
        .into_iter()
        .filter(|r| r.path == format!("/cdn/{}", etag_of(&shard)))
        .map(|r| r.range)
        .collect();
    assert_eq!(
        resumed.last().cloned().flatten(),
        Some(format!("bytes={}-", kept.len())),
        "{resumed:?}"
    );
    assert!(files_under(&repo_dir.join("blobs"))
        .iter()
        .all(|b| !b.contains("incomplete")));
    // huggingface_hub's lock of the blob was taken (and is where it looks for it).
    assert!(cache
        .path()
        .join(".locks/models--bella-test--tiny")
        .join(format!("{}.lock", etag_of(&shard)))
        .is_file());
    server.stop();
}

#[test]
fn hub_offline_with_empty_cache() {
    let cache = tempfile::tempdir().unwrap();
    let opts = HubOptions {
        offline: true,
        ..options("http://127.0.0.1:9", cache.path())
    };
    let err = resolve(&hub("bella-test/tiny", Some("v1")), &opts).unwrap_err();
    assert!(matches!(hub_error(&err), HubError::NotInCache { .. }));
    assert!(hub_error(&err).is_not_found());
    let msg = err.to_string();
    for needle in [
        "bella-test/tiny@v1",
        "not in the hub cache",
        cache.path().to_str().unwrap(),
        "hf download",
        "local model directory",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing: {msg}");
    }
}

#[test]
fn hub_repo_and_revision_not_found() {
    for no_error_codes in [false, true] {
        let model = tempfile::tempdir().unwrap();
        make_single_model(model.path());
        let cache = tempfile::tempdir().unwrap();
        let server = HubServer::start(
            vec![RepoSpec {
                id: "bella-test/tiny".into(),
                dir: model.path().to_path_buf(),
                token: None,
            }],
            ServerOptions {
                no_error_codes,
                ..Default::default()
            },
        );
        let opts = options(&server.endpoint(), cache.path());

        let err = resolve(&hub("bella-test/nope", None), &opts).unwrap_err();
        assert!(
            matches!(hub_error(&err), HubError::RepoNotFound { repo_id, .. } if repo_id == "bella-test/nope"),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("bella-test/nope")
                && msg.contains("not found")
                && msg.contains("HF_TOKEN"),
            "{msg}"
        );

        let err = resolve(&hub("bella-test/tiny", Some("v9")), &opts).unwrap_err();
        assert!(
            matches!(hub_error(&err), HubError::RevisionNotFound { revision, .. } if revision == "v9"),
            "{err}"
        );
        assert!(err.to_string().contains("\"v9\""), "{err}");
        assert!(!cache.path().join("models--bella-test--nope").exists());
        server.stop();
    }
}

#[test]
fn hub_gated_repo_needs_token() {
    let model = tempfile::tempdir().unwrap();
    make_single_model(model.path());
    let cache = tempfile::tempdir().unwrap();
    let server = HubServer::start(
        vec![RepoSpec {
            id: "bella-test/gated".into(),
            dir: model.path().to_path_buf(),
            token: Some("hf_secret".into()),
        }],
        ServerOptions::default(),
    );
    let opts = options(&server.endpoint(), cache.path());
    let err = resolve(&hub("bella-test/gated", None), &opts).unwrap_err();
    assert!(
        matches!(
            hub_error(&err),
            HubError::AccessDenied {
                status: 401,
                authenticated: false,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("HF_TOKEN"), "{err}");

    let with_token = HubOptions {
        token: Some("hf_secret".into()),
        ..opts.clone()
    };
    let files = resolve(&hub("bella-test/gated", None), &with_token).unwrap();
    assert_same_content(&files, model.path());
    let last = server.requests();
    assert!(last
        .iter()
        .rev()
        .take(3)
        .all(|r| r.authorization.as_deref() == Some("Bearer hf_secret")));

    let other_cache = tempfile::tempdir().unwrap();
    let wrong = HubOptions {
        token: Some("hf_wrong".into()),
        cache_dir: other_cache.path().to_path_buf(),
        ..opts
    };
    let err = resolve(&hub("bella-test/gated", None), &wrong).unwrap_err();
    assert!(
        matches!(
            hub_error(&err),
            HubError::AccessDenied {
                authenticated: true,
                ..
            }
        ),
        "{err}"
    );
    server.stop();
}

#[test]
fn hub_missing_shard_is_named() {
    let model = tempfile::tempdir().unwrap();
    make_sharded_model(model.path());
    std::fs::remove_file(model.path().join(SHARD_2)).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let server = serve_one("bella-test/tiny", model.path());
    let err = resolve(
        &hub("bella-test/tiny", None),
        &options(&server.endpoint(), cache.path()),
    )
    .unwrap_err();
    assert!(
        matches!(hub_error(&err), HubError::MissingShard { shard, .. } if shard == SHARD_2),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(SHARD_2) && msg.contains("bella-test/tiny"),
        "{msg}"
    );
    server.stop();
}

/// Offline, a cached snapshot that has only PyTorch .bin weights is not called incomplete
/// (downloading again cannot help), and one whose download was interrupted says so.
#[test]
fn offline_snapshots_without_weights_say_why() {
    let cache = tempfile::tempdir().unwrap();
    let opts = HubOptions {
        offline: true,
        ..options("http://127.0.0.1:9", cache.path())
    };
    let sha = "a".repeat(40);
    let snapshot = |repo: &str, files: &[(&str, &[u8])]| {
        let root = cache.path().join(format!("models--org--{repo}"));
        let dir = root.join("snapshots").join(&sha);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(root.join("refs")).unwrap();
        std::fs::write(root.join("refs/main"), &sha).unwrap();
        write_common(&dir);
        for (name, bytes) in files {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        root
    };
    snapshot("bin", &[("pytorch_model.bin", b"pickle")]);
    let msg = format!("{:#}", resolve(&hub("org/bin", None), &opts).unwrap_err());
    assert!(
        msg.contains(".bin/pytorch checkpoints are not supported") && !msg.contains("incomplete"),
        "{msg}"
    );
    let root = snapshot("cut", &[]);
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::write(
        root.join("blobs").join(format!("{sha}.incomplete")),
        b"half",
    )
    .unwrap();
    let msg = format!("{:#}", resolve(&hub("org/cut", None), &opts).unwrap_err());
    assert!(msg.contains("a download was interrupted"), "{msg}");
}

#[test]
fn hub_repo_without_safetensors() {
    let model = tempfile::tempdir().unwrap();
    write_common(model.path());
    std::fs::write(model.path().join("pytorch_model.bin"), b"pickle").unwrap();
    let cache = tempfile::tempdir().unwrap();
    let server = serve_one("bella-test/bin", model.path());
    let err = resolve(
        &hub("bella-test/bin", None),
        &options(&server.endpoint(), cache.path()),
    )
    .unwrap_err();
    assert!(
        matches!(hub_error(&err), HubError::NoWeights { .. }),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("bella-test/bin")
            && msg.contains(".bin/pytorch checkpoints are not supported"),
        "{msg}"
    );
    server.stop();
}

#[test]
fn hub_that_never_answers_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Accept and hold every connection without a byte of answer.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    let cache = tempfile::tempdir().unwrap();
    let cache_path = cache.path().to_path_buf();
    let opts = HubOptions {
        timeout: Duration::from_secs(1),
        ..options(&format!("http://127.0.0.1:{port}"), &cache_path)
    };
    let started = Instant::now();
    let result = within(Duration::from_secs(30), move || {
        resolve(&hub("bella-test/tiny", None), &opts).map(|_| ())
    });
    let elapsed = started.elapsed();
    let err = result.unwrap_err();
    assert!(
        matches!(
            hub_error(&err),
            HubError::Unreachable {
                timed_out: true,
                ..
            }
        ),
        "{err}"
    );
    assert!(hub_error(&err).is_unreachable());
    let msg = err.to_string();
    assert!(
        msg.contains("could not be reached")
            && msg.contains("not in the cache")
            && msg.contains("BELLA_HUB_TIMEOUT_SECS"),
        "{msg}"
    );
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
}

#[test]
fn hub_that_trickles_a_file_hits_its_deadline_and_names_the_file() {
    let model = tempfile::tempdir().unwrap();
    make_single_model(model.path());
    let cache = tempfile::tempdir().unwrap();
    let server = HubServer::start(
        vec![RepoSpec {
            id: "bella-test/slow".into(),
            dir: model.path().to_path_buf(),
            token: None,
        }],
        ServerOptions {
            trickle_cdn: true,
            ..ServerOptions::default()
        },
    );
    // A 1 s stall timeout never fires (a byte every 200 ms); the deadline (5 timeouts of grace
    // plus the size at the minimum rate) does.
    let opts = HubOptions {
        timeout: Duration::from_secs(1),
        ..options(&server.endpoint(), cache.path())
    };
    let started = Instant::now();
    let err = within(Duration::from_secs(60), move || {
        resolve(&hub("bella-test/slow", None), &opts).map(|_| ())
    })
    .unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(hub_error(&err), HubError::TooSlow { .. }),
        "{err:#}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("too slowly"),
        "{msg}"
    );
    assert!(elapsed < Duration::from_secs(15), "took {elapsed:?}");
    server.stop();
}

#[test]
fn hub_refused_connection_is_unreachable() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let cache = tempfile::tempdir().unwrap();
    let endpoint = format!("http://127.0.0.1:{port}");
    let opts = options(&endpoint, cache.path());
    let err = within(Duration::from_secs(30), move || {
        resolve(&hub("bella-test/tiny", None), &opts).map(|_| ())
    })
    .unwrap_err();
    let e = hub_error(&err);
    assert!(
        matches!(
            e,
            HubError::Unreachable {
                timed_out: false,
                ..
            }
        ),
        "{err}"
    );
    assert!(!e.is_not_found());
    let msg = err.to_string();
    for needle in [
        "could not be reached",
        endpoint.as_str(),
        // Not cached: working offline cannot help, and is not suggested.
        "not in the cache",
        cache.path().to_str().unwrap(),
        "local model directory",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing: {msg}");
    }
    assert!(!msg.contains("--offline"), "{msg}");
}

/// A hub that answers every request with `status` (a hub that is down, or a proxy in front of it).
fn answering(status: u16) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut stream, &mut buf);
            let reply = format!(
                "HTTP/1.1 {status} Down\r\ncontent-length: 4\r\nconnection: close\r\n\r\ndown"
            );
            let _ = std::io::Write::write_all(&mut stream, reply.as_bytes());
        }
    });
    format!("http://127.0.0.1:{port}")
}

#[test]
fn a_hub_that_fails_or_refuses_falls_back_to_the_cache_as_huggingface_hub_does() {
    let model = tempfile::tempdir().unwrap();
    make_single_model(model.path());
    let cache = tempfile::tempdir().unwrap();
    let server = serve_one("bella-test/tiny", model.path());
    let files = resolve(
        &hub("bella-test/tiny", None),
        &options(&server.endpoint(), cache.path()),
    )
    .unwrap();
    // huggingface_hub uses the cache for every HTTP error but a missing revision or file: a hub
    // that is down, a repo renamed or made private, an expired token, a proxy saying 403/404.
    for status in [500, 502, 503, 504, 429, 400, 401, 403, 404] {
        let opts = options(&answering(status), cache.path());
        let cached = resolve(&hub("bella-test/tiny", None), &opts)
            .unwrap_or_else(|e| panic!("HTTP {status}: {e:#}"));
        assert_eq!(cached.weights, files.weights, "HTTP {status}");
    }
    // The real hub's answers: repo gone (x-error-code RepoNotFound) falls back, a missing
    // revision does not, even with another revision cached.
    let opts = options(&server.endpoint(), cache.path());
    let renamed = HubServer::start(Vec::new(), ServerOptions::default());
    let gone = options(&renamed.endpoint(), cache.path());
    let cached = resolve(&hub("bella-test/tiny", None), &gone).unwrap();
    assert_eq!(cached.weights, files.weights);
    renamed.stop();
    let err = resolve(&hub("bella-test/tiny", Some("v9")), &opts).unwrap_err();
    assert!(
        matches!(hub_error(&err), HubError::RevisionNotFound { .. }),
        "{err}"
    );
    server.stop();

    // A hub that answers 200 and then trickles its listing (past the deadline), or breaks off:
    // the cache, too.
    for trickle in [true, false] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let _ = std::io::Read::read(&mut stream, &mut buf);
                    let head = "HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n{";
                    let _ = std::io::Write::write_all(&mut stream, head.as_bytes());
                    while trickle && std::io::Write::write_all(&mut stream, b" ").is_ok() {
                        std::thread::sleep(Duration::from_millis(300));
                    }
                });
            }
        });
        let opts = HubOptions {
            timeout: Duration::from_millis(300),
            ..options(&format!("http://127.0.0.1:{port}"), cache.path())
        };
        let cached = within(Duration::from_secs(30), move || {
            resolve(&hub("bella-test/tiny", None), &opts).map(|f| f.weights)
        })
        .unwrap_or_else(|e| panic!("trickle {trickle}: {e:#}"));
        assert_eq!(cached, files.weights);
    }

    // Nothing cached: the hub's answer, with its status and what to do.
    let empty = tempfile::tempdir().unwrap();
    for status in [401, 404] {
        let opts = options(&answering(status), empty.path());
        let err = resolve(&hub("bella-test/tiny", None), &opts).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(hub_error(&err), HubError::RepoNotFound { .. })
                && msg.contains(&format!("HTTP {status}"))
                && msg.contains("HF_TOKEN"),
            "{msg}"
        );
    }
    let opts = options(&answering(403), empty.path());
    let err = resolve(&hub("bella-test/tiny", None), &opts).unwrap_err();
    assert!(
        matches!(hub_error(&err), HubError::AccessDenied { status: 403, .. }),
        "{err}"
    );
}
