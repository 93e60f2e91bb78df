//! `bella-vqa serve`: an OpenAI-compatible chat-completions server whose answers carry the
//! particles' confidence, uncertainty split and abstention (the `bella` object), a web page at
//! `/`, `/v1/models`, `/health` and Prometheus `/metrics`.
//!
//! Shape (design §11): an async front (axum on tokio) checks and decodes requests; one worker
//! thread ([`worker`]) owns the model and answers whatever is waiting as one batch; results come
//! back on one-shot channels. The queue is bounded (503 with `Retry-After` when full), every
//! request has a deadline (504), a connection that stalls is closed ([`idle`]; when stopping,
//! one without a request in the server after [`DRAIN_GRACE`]), the decoded
//! images in flight are bounded, and SIGINT/SIGTERM/SIGHUP stop the server gracefully: requests in
//! flight are answered, new requests on open connections get 503 and new connections are refused.
//! Written only against the crate's public API.

pub mod idle;
pub mod metrics;
pub mod openai;
pub mod worker;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{Html, IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use axum::Extension;
use axum::{Json, Router};
use base64::Engine as _;
use image::DynamicImage;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::answer::generate::Sampling;
use crate::models::image::{decode_image, decoding_bytes, image_size};
use crate::{AskOptions, BellaVqa, Response};
use metrics::Metrics;
use openai::{
    ApiError, Ask, AssistantMessage, ChatRequest, Choice, Chunk, ChunkChoice, Completion, Delta,
    Usage,
};
use worker::{Job, Loaded};

/// The web page served at `/` (no build step, no external resources).
pub const PAGE: &str = include_str!("page.html");

/// The longest request deadline (`--timeout-secs`).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub host: IpAddr,
    /// 0: an ephemeral port (the bound address is printed).
    pub port: u16,
    /// The model id clients send and `/v1/models` lists.
    pub model_name: String,
    /// Bearer token required on `/v1/*` when set.
    pub api_key: Option<String>,
    /// The most questions answered in one pass.
    pub max_batch: usize,
    /// Questions that may wait for the worker; more get 503.
    pub queue: usize,
    /// A request not answered by then gets 504.
    pub timeout: Duration,
    pub max_body_bytes: usize,
    pub max_image_pixels: u64,
    pub max_question_tokens: usize,
    /// The largest `max_tokens` a request may ask for.
    pub max_new_tokens_limit: usize,
    /// Fetch `http(s)://` image URLs (public addresses only); off: data URLs only.
    pub allow_remote_images: bool,
    /// The most memory the images of the questions in flight may hold, decoded and at the peak
    /// of their preprocessing (8-bit RGB; [`ImageProcessor::working_bytes`]); a question whose
    /// image would pass it gets 503 (413 for an image larger than all of it).
    ///
    /// [`ImageProcessor::working_bytes`]: crate::models::image::ImageProcessor::working_bytes
    pub max_image_memory_bytes: u64,
    /// The most memory the bodies of the chat requests in flight may hold (their announced
    /// length, or `max_body_bytes` when not announced), from when they are read until they are
    /// answered; a request past it gets 503.
    pub max_body_memory_bytes: u64,
    /// Origins whose web pages may call the API (CORS); `*`: any. Empty: same origin only.
    pub cors_origins: Vec<String>,
    /// One line on stderr a request: method, path, status, milliseconds.
    pub access_log: bool,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            host: IpAddr::from([127, 0, 0, 1]),
            port: 8080,
            model_name: "bella-vqa".into(),
            api_key: None,
            max_batch: 8,
            queue: 64,
            timeout: Duration::from_secs(120),
            max_body_bytes: 20 * 1024 * 1024,
            max_image_pixels: crate::models::image::MAX_IMAGE_PIXELS,
            max_question_tokens: 512,
            max_new_tokens_limit: 256,
            allow_remote_images: false,
            max_image_memory_bytes: 1 << 30,
            max_body_memory_bytes: 256 << 20,
            cors_origins: Vec::new(),
            access_log: false,
        }
    }
}

impl ServeOptions {
    fn check(&self) -> Result<()> {
        for (name, v) in [
            ("--max-batch", self.max_batch),
            ("--queue", self.queue),
            ("--max-body-mb", self.max_body_bytes),
            ("--max-question-tokens", self.max_question_tokens),
            ("--max-new-tokens-limit", self.max_new_tokens_limit),
        ] {
            if v == 0 {
                crate::bad_option!("{name} must be at least 1");
            }
        }
        if self.timeout.is_zero() {
            crate::bad_option!("--timeout-secs must be at least 1");
        }
        // Deadlines are instants: a timeout near u64::MAX seconds overflowed them (a panic, or a
        // server that closed every connection).
        if self.timeout > MAX_TIMEOUT {
            crate::bad_option!(
                "--timeout-secs must be at most {} (a week)",
                MAX_TIMEOUT.as_secs()
            );
        }
        if self.max_image_pixels == 0 {
            crate::bad_option!("--max-image-pixels must be at least 1");
        }
        if self.max_image_memory_bytes < 1 << 20 {
            crate::bad_option!("--max-image-memory-mb must be at least 1");
        }
        if self.max_body_memory_bytes < self.max_body_bytes as u64 {
            crate::bad_option!(
                "--max-body-memory-mb must be at least --max-body-mb ({} MB): one largest \
                 request must fit",
                self.max_body_bytes >> 20
            );
        }
        if self.api_key.as_deref().is_some_and(str::is_empty) {
            crate::bad_option!("--api-key is empty");
        }
        for origin in &self.cors_origins {
            // What a browser sends as Origin: scheme://host[:port], nothing after it.
            let valid = origin == "*"
                || (HeaderValue::from_str(origin).is_ok()
                    && origin.split_once("://").is_some_and(|(scheme, rest)| {
                        !scheme.is_empty() && !rest.is_empty() && !rest.contains('/')
                    }));
            if !valid {
                crate::bad_option!(
                    "--cors-origin {origin:?} is not an origin a browser sends: give \
                     scheme://host[:port] without a path or trailing slash (e.g. \
                     http://localhost:3000), or *"
                );
            }
        }
        Ok(())
    }
}

/// Binds, prints `listening on http://ADDR`, and serves until SIGINT/SIGTERM/SIGHUP. The model is
/// loaded by `load` on the worker thread while `/health` answers 503 "loading".
pub fn run(
    opts: ServeOptions,
    load: impl FnOnce() -> Result<BellaVqa> + Send + 'static,
) -> Result<()> {
    opts.check()?;
    // Few threads: the compute is the worker's; the blocking pool only decodes images, and every
    // extra thread is another malloc arena holding memory.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let addr = SocketAddr::new(opts.host, opts.port);
        let listener = TcpListener::bind(addr).await.map_err(|e| {
            use std::io::ErrorKind;
            let hint = match e.kind() {
                ErrorKind::AddrInUse => "another program listens there: try another --port",
                ErrorKind::AddrNotAvailable => {
                    "--host is not an address of this machine: use 127.0.0.1 (this machine \
                     only) or 0.0.0.0 (every interface)"
                }
                ErrorKind::PermissionDenied => {
                    "ports below 1024 need privileges: use a --port from 1024 up"
                }
                _ => "try another --host or --port",
            };
            anyhow::Error::new(e).context(format!("cannot listen on {addr} ({hint})"))
        })?;
        if !opts.host.is_loopback() && opts.api_key.is_none() {
            crate::note!(
                "warning: listening on {} without --api-key: anyone who can reach it can use the model",
                opts.host
            );
        }
        crate::note!("listening on http://{}", listener.local_addr()?);
        serve(listener, opts, load, shutdown_signal()).await
    })
}

/// Resolves on SIGINT, SIGTERM or SIGHUP; a second one ends the process at once (exit status 128 + the
/// signal, as the shell's), without waiting for the requests in flight (a graceful stop can
/// take up to --timeout-secs).
async fn shutdown_signal() {
    // Listening from here on: a second signal right after the first is not lost.
    let mut signals = StopSignals::new();
    signals.next().await;
    crate::note!("stopping: finishing the requests in flight (signal again to stop at once)");
    tokio::spawn(async move {
        let signal = signals.next().await;
        crate::note!("stopped at once: the requests in flight were cut off");
        std::process::exit(128 + signal);
    });
}

/// SIGINT, SIGTERM and SIGHUP (the terminal or SSH session that started the server closed),
/// each listened to from its creation (one that cannot be listened to is waited for never).
struct StopSignals {
    interrupt: Option<tokio::signal::unix::Signal>,
    terminate: Option<tokio::signal::unix::Signal>,
    hangup: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn new() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Self {
            interrupt: signal(SignalKind::interrupt()).ok(),
            terminate: signal(SignalKind::terminate()).ok(),
            hangup: signal(SignalKind::hangup()).ok(),
        }
    }

    /// The next one: its number.
    async fn next(&mut self) -> i32 {
        async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
            match signal {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.interrupt) => libc::SIGINT,
            _ = recv(&mut self.terminate) => libc::SIGTERM,
            _ = recv(&mut self.hangup) => libc::SIGHUP,
        }
    }
}

struct AppState {
    opts: ServeOptions,
    /// Permits of [`ServeOptions::max_image_memory_bytes`], one per KiB of image memory.
    image_memory: Arc<tokio::sync::Semaphore>,
    /// Permits of [`ServeOptions::max_body_memory_bytes`], one per KiB of request body.
    body_memory: Arc<tokio::sync::Semaphore>,
    /// Permits of the remote images being fetched ([`REMOTE_FETCHES`]).
    remote_fetches: Arc<tokio::sync::Semaphore>,
    queue: Arc<worker::Queue>,
    loaded: Loaded,
    metrics: Arc<Metrics>,
    draining: AtomicBool,
    /// Woken when `draining` is set.
    drain_started: tokio::sync::Notify,
    /// When the server started (`created` of the model in `/v1/models`).
    started: u64,
}

impl AppState {
    fn vqa(&self) -> Result<&Arc<BellaVqa>, ApiError> {
        self.loaded.get().ok_or_else(|| {
            ApiError::unavailable("the model is still loading; try again in a few seconds", 5)
        })
    }

    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(key) = &self.opts.api_key else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            // The scheme is case-insensitive (RFC 9110 §11.1).
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, token)| token);
        if constant_time_eq(given.trim().as_bytes(), key.as_bytes()) {
            Ok(())
        } else {
            Err(ApiError::unauthorized())
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// How much longer than the request deadline a connection may go without moving a byte
/// ([`idle`]).
const IDLE_MARGIN: Duration = Duration::from_secs(5);

/// Serves on `listener` until `shutdown` resolves (then drains) or the model fails to load.
pub async fn serve(
    listener: TcpListener,
    opts: ServeOptions,
    load: impl FnOnce() -> Result<BellaVqa> + Send + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    opts.check()?;
    let queue = worker::Queue::new(opts.queue);
    // However this function ends, the worker then answers what waits and stops.
    let close = worker::CloseOnDrop(queue.clone());
    let loaded: Loaded = Arc::new(OnceLock::new());
    let metrics = Arc::new(Metrics::new());
    let (done_tx, done_rx) = oneshot::channel::<Result<()>>();
    let worker_ended = Arc::new(tokio::sync::Notify::new());
    {
        let (loaded, metrics, max_batch) = (loaded.clone(), metrics.clone(), opts.max_batch);
        let (ended, queue) = (worker_ended.clone(), queue.clone());
        std::thread::Builder::new()
            .name("bella-worker".into())
            .spawn(move || {
                let result = worker::run(load, loaded, queue, max_batch, metrics);
                let _ = done_tx.send(result);
                ended.notify_one();
            })
            .context("cannot start the worker thread")?;
    }
    let kib_semaphore = |bytes: u64| {
        let kib = usize::try_from(bytes / 1024)
            .unwrap_or(usize::MAX)
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        Arc::new(tokio::sync::Semaphore::new(kib))
    };
    let state = Arc::new(AppState {
        image_memory: kib_semaphore(opts.max_image_memory_bytes),
        body_memory: kib_semaphore(opts.max_body_memory_bytes),
        remote_fetches: Arc::new(tokio::sync::Semaphore::new(REMOTE_FETCHES)),
        opts,
        queue: queue.clone(),
        loaded,
        metrics,
        draining: AtomicBool::new(false),
        drain_started: tokio::sync::Notify::new(),
        started: unix_now(),
    });
    let app = router(state.clone());

    // Stop on the signal, or at once when the worker ends (the model did not load).
    let stopping = state.clone();
    let graceful = async move {
        tokio::select! {
            _ = shutdown => {},
            _ = worker_ended.notified() => {},
        }
        stopping.draining.store(true, Ordering::SeqCst);
        stopping.drain_started.notify_waiters();
    };
    // A connection may stall a little longer than the deadline every request meets.
    let listener = idle::IdleLimitListener {
        listener,
        idle: state.opts.timeout + IDLE_MARGIN,
    };
    serve_connections(listener, app, graceful).await;
    // No handler is left: the worker answers what waits, then ends.
    drop(state);
    drop(close);
    done_rx
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the worker thread stopped unexpectedly")))
}

/// How long a graceful stop gives a connection without a request in the server (idle, or still
/// sending a request's headers) before closing it: a request whose headers are arriving gets
/// this long to reach the server (then it is answered, or refused with 503 while stopping).
pub const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Serves every connection `listener` accepts until `stop` resolves; then accepts no more, lets
/// each connection finish the requests it is answering (hyper's graceful shutdown) and closes
/// one that has none after [`DRAIN_GRACE`] (one still sending its headers held the stop for the
/// whole idle limit under `axum::serve`); returns when all are closed.
async fn serve_connections(
    mut listener: idle::IdleLimitListener,
    app: Router,
    stop: impl Future<Output = ()>,
) {
    use axum::serve::Listener as _;
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;
    let (stopping, stopped) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(stop);
    loop {
        let (io, _) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        // The connection's requests in the server: from their headers to their response's end.
        let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        // Each request carries its connection, for the worker to watch.
        let peer = worker::Peer::of(io.get_ref());
        let service = {
            let (inner, busy) = (TowerToHyperService::new(app.clone()), busy.clone());
            hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
                if let Some(peer) = peer {
                    request.extensions_mut().insert(peer);
                }
                let held = Busy::new(&busy);
                let answered = hyper::service::Service::call(&inner, request);
                async move {
                    let response = answered.await?;
                    Ok::<_, std::convert::Infallible>(holding(response, held, |_| {}))
                }
            })
        };
        let mut stopped = stopped.clone();
        connections.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = stopped.wait_for(|s| *s) => conn.as_mut().graceful_shutdown(),
            }
            // Answering: until its requests are done. Without one: closed after the grace.
            loop {
                tokio::select! {
                    _ = conn.as_mut() => return,
                    () = tokio::time::sleep(DRAIN_GRACE) => {
                        if busy.load(Ordering::SeqCst) == 0 {
                            return;
                        }
                    }
                }
            }
        });
        // Finished connections leave the set as new ones come.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = stopping.send(true);
    while connections.join_next().await.is_some() {}
}

/// One request of a connection in the server ([`serve_connections`]): counted while it lives.
struct Busy(Arc<std::sync::atomic::AtomicUsize>);

impl Busy {
    fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn router(state: Arc<AppState>) -> Router {
    let limit = state.opts.max_body_bytes;
    let app = Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route(CHAT_PATH, post(chat))
        .fallback(|uri: Uri| async move { ApiError::not_found(uri.path()) })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            within_deadline,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            refuse_when_draining,
        ))
        .layer(DefaultBodyLimit::max(limit))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                ApiError::internal("internal error while handling the request").into_response()
            },
        ))
        .layer(middleware::from_fn_with_state(state.clone(), count_chat))
        .layer(middleware::from_fn_with_state(state.clone(), access_log));
    match cors(&state.opts.cors_origins) {
        Some(cors) => app.layer(cors).with_state(state),
        None => app.with_state(state),
    }
}

/// CORS for the origins of `--cors-origin` (preflights answered, `Access-Control-Allow-*` on
/// every response to them); none: no CORS layer, the browser's same-origin rule holds.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
            // Clients add their own headers (the openai JS SDK its x-stainless-*): whatever the
            // preflight asks for is allowed, as the origin is what is checked.
            .allow_headers(tower_http::cors::AllowHeaders::mirror_request())
            // A page on another origin reads how long to wait after a 503.
            .expose_headers([header::RETRY_AFTER])
            .max_age(Duration::from_secs(600)),
    )
}

/// `bella_chat_requests_total` by status and the latency of answered chat requests: every
/// response of `/v1/chat/completions`, the refusals of the layers around the handler (413,
/// 408/504 deadlines, 503 while stopping) included.
fn count_chat(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> impl Future<Output = HttpResponse> {
    let chat = request.uri().path() == CHAT_PATH;
    let arrived = Instant::now();
    // Made when the request is handed over, not at the future's first poll: a client that
    // leaves before that is counted as 499 too (the future is dropped unpolled).
    let left = chat.then(|| LeftEarly(Some(state.metrics.clone())));
    async move {
        let response = next.run(request).await;
        let Some(left) = left else {
            return response;
        };
        left.answered();
        if response.extensions().get::<Streamed>().is_some() {
            return response; // counted when its stream ends
        }
        state.metrics.answered(response.status().as_u16(), arrived);
        response
    }
}

const CHAT_PATH: &str = "/v1/chat/completions";

/// The characters of a request's path that its access-log line shows.
const ACCESS_LOG_PATH_CHARS: usize = 200;

/// One line a request on stderr (unless `--quiet`): `POST /v1/chat/completions 200 812 ms`; a
/// streamed answer when its stream ends; a request whose client left before its answer, or
/// before the end of its stream, as 499 (/metrics' "client closed request").
async fn access_log(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> HttpResponse {
    if !state.opts.access_log {
        return next.run(request).await;
    }
    let method = request.method().clone();
    // A client's path may be tens of KB: the line says how long the rest was.
    let path = request.uri().path();
    let path = match path.char_indices().nth(ACCESS_LOG_PATH_CHARS) {
        Some((cut, _)) => format!("{}… ({} bytes)", &path[..cut], path.len()),
        None => path.to_string(),
    };
    // Written when dropped: here, or when a client that left drops the request.
    let mut line = AccessLine {
        request: format!("{method} {path}"),
        started: Instant::now(),
        status: None,
    };
    let response = next.run(request).await;
    let Some(streamed) = response.extensions().get::<Streamed>().cloned() else {
        line.status = Some(response.status().as_u16());
        return response;
    };
    // The status its answer had (sent as an error event after the headers' 200).
    holding(response, line, move |line| {
        line.status = Some(streamed.status())
    })
}

/// `response` with `held` kept until its body has been sent, or dropped with it when its client
/// leaves first; `at_end` runs on it once the last byte has gone.
fn holding<G, F>(response: HttpResponse, held: G, at_end: F) -> HttpResponse
where
    G: Send + 'static,
    F: FnOnce(&mut G) + Send + 'static,
{
    use futures_util::StreamExt as _;
    let (parts, body) = response.into_parts();
    let body = futures_util::stream::unfold(
        (body.into_data_stream(), held, Some(at_end)),
        |(mut stream, mut held, mut at_end)| async move {
            let chunk = stream.next().await;
            if chunk.is_none() {
                if let Some(at_end) = at_end.take() {
                    at_end(&mut held);
                }
            }
            chunk.map(|c| (c, (stream, held, at_end)))
        },
    );
    HttpResponse::from_parts(parts, axum::body::Body::from_stream(body))
}

/// A request's access-log line, written when the request is done with: with its status, or 499
/// when its client left first.
struct AccessLine {
    request: String,
    started: Instant,
    status: Option<u16>,
}

impl Drop for AccessLine {
    fn drop(&mut self) {
        crate::note!(
            "{} {} {} ms",
            self.request,
            self.status.unwrap_or(CLIENT_CLOSED),
            self.started.elapsed().as_millis()
        );
    }
}

/// Every request is answered within the deadline (`--timeout-secs`), a client that sends its
/// body slowly or never included (reading the body is part of the request). A body announced
/// larger than `--max-body-mb` is refused before it is read; a chat request without the API key
/// is refused before its body is read; and a body is charged to `--max-body-memory-mb` as its
/// bytes arrive ([`charged_body`]): the request whose bytes would pass it, with the bodies in
/// flight, gets 503 — bytes announced and never sent hold nothing.
async fn within_deadline(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> HttpResponse {
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|n| n > state.opts.max_body_bytes as u64) {
        return closing(ApiError::too_large(state.opts.max_body_bytes));
    }
    let mut request = request;
    // Held until the answer: the body's bytes stay in memory while it is worked on.
    let charge = Arc::new(BodyCharge::default());
    if request.method() == axum::http::Method::POST && request.uri().path() == CHAT_PATH {
        if let Err(e) = state.authorize(request.headers()) {
            return closing(e);
        }
        request = charged_body(request, &state.body_memory, &charge);
    }
    let body_read = BodyRead::default();
    request.extensions_mut().insert(body_read.clone());
    let answered = tokio::time::timeout(state.opts.timeout, next.run(request));
    let response = tokio::select! {
        answered = answered => match answered {
            Ok(response) => response,
            Err(_) if !body_read.0.load(Ordering::SeqCst) => {
                ApiError::body_timeout(state.opts.timeout.as_secs_f64()).into_response()
            }
            Err(_) => ApiError::timeout(state.opts.timeout.as_secs_f64()).into_response(),
        },
        () = drained_before_its_body(&state, &body_read) => {
            ApiError::unavailable("the server is shutting down", 5).into_response()
        }
    };
    if charge.full.load(Ordering::SeqCst) {
        // The rest of the body was never read: the connection cannot carry another request.
        return closing(ApiError::unavailable(
            format!(
                "the server is busy: the requests in flight fill its body memory ({} MiB); \
                 retry shortly",
                state.opts.max_body_memory_bytes >> 20
            ),
            1,
        ));
    }
    response
}

/// A refusal sent before the request's body was read (or all of it): the connection cannot carry
/// another request after it, and says so (`Connection: close`), so that a client's pool does not reuse it.
fn closing(e: ApiError) -> HttpResponse {
    let mut response = e.into_response();
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    response
}

/// Resolves when the server begins to drain while the request's body has not arrived: it has
/// cost nothing yet, so it is refused rather than waited for (a stalled upload would hold the
/// shutdown for the whole deadline). Never resolves for a request being answered.
async fn drained_before_its_body(state: &AppState, body_read: &BodyRead) {
    let notified = state.drain_started.notified();
    tokio::pin!(notified);
    // Registered before the flag is read: a drain in between still wakes it.
    notified.as_mut().enable();
    if !state.draining.load(Ordering::SeqCst) {
        notified.await;
    }
    if body_read.0.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
}

/// What a request's body holds of `--max-body-memory-mb`.
#[derive(Default)]
struct BodyCharge {
    /// The permits (one per KiB) of the bytes that have arrived.
    held: std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
    /// Set when a chunk found the budget full (the body then ends with an error).
    full: AtomicBool,
}

/// `request` with its body charged to `budget` as its bytes arrive, in `charge`.
fn charged_body(
    request: Request,
    budget: &Arc<tokio::sync::Semaphore>,
    charge: &Arc<BodyCharge>,
) -> Request {
    use futures_util::StreamExt as _;
    let (budget, charge) = (budget.clone(), charge.clone());
    let mut bytes = 0u64;
    request.map(|body| {
        let chunks = body.into_data_stream().map(move |chunk| {
            let chunk = chunk?;
            let charged = bytes.div_ceil(1024);
            bytes += chunk.len() as u64;
            let more = u32::try_from(bytes.div_ceil(1024) - charged).unwrap_or(u32::MAX);
            if more > 0 {
                let Ok(permit) = budget.clone().try_acquire_many_owned(more) else {
                    charge.full.store(true, Ordering::SeqCst);
                    return Err(axum::Error::new("the body memory of the server is full"));
                };
                let mut held = charge
                    .held
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match &mut *held {
                    Some(h) => h.merge(permit),
                    None => *held = Some(permit),
                }
            }
            Ok(chunk)
        });
        axum::body::Body::from_stream(chunks)
    })
}

/// Set by the chat handler once the request body has arrived, so that a deadline passed while
/// the client was still sending it is answered 408, not 504.
#[derive(Clone, Default)]
struct BodyRead(Arc<AtomicBool>);

async fn refuse_when_draining(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> HttpResponse {
    if state.draining.load(Ordering::SeqCst) {
        return ApiError::unavailable("the server is shutting down", 5).into_response();
    }
    next.run(request).await
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn health(State(state): State<Arc<AppState>>) -> HttpResponse {
    match state.loaded.get() {
        Some(vqa) => Json(serde_json::json!({
            "status": "ok",
            "model": state.opts.model_name,
            "particles": vqa.particles(),
            // What the base computes in (`f32`, `bf16, q8_0` …), as runs record it.
            "compute": vqa.model().info.compute_label(),
        }))
        .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "loading", "model": state.opts.model_name})),
        )
            .into_response(),
    }
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> HttpResponse {
    let m = &state.metrics;
    m.queue_depth.set(state.queue.waiting() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> HttpResponse {
    if let Err(e) = state.authorize(&headers) {
        return e.into_response();
    }
    Json(serde_json::json!({
        "object": "list",
        "data": [{
            "id": state.opts.model_name,
            "object": "model",
            "created": state.started,
            "owned_by": "bella-vqa",
        }]
    }))
    .into_response()
}

/// `GET /v1/models/{id}`: the served model, or 404.
async fn model(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> HttpResponse {
    if let Err(e) = state.authorize(&headers) {
        return e.into_response();
    }
    if id != state.opts.model_name {
        return ApiError::model_not_found(&id, &state.opts.model_name).into_response();
    }
    Json(serde_json::json!({
        "id": state.opts.model_name,
        "object": "model",
        "created": state.started,
        "owned_by": "bella-vqa",
    }))
    .into_response()
}

async fn chat(
    State(state): State<Arc<AppState>>,
    body_read: Option<Extension<BodyRead>>,
    peer: Option<Extension<worker::Peer>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> HttpResponse {
    if let Some(Extension(flag)) = body_read {
        flag.0.store(true, Ordering::SeqCst);
    }
    let peer = peer.map(|Extension(p)| p);
    match answer_chat(&state, &headers, body, peer, Instant::now()).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn answer_chat(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    peer: Option<worker::Peer>,
    arrived: Instant,
) -> Result<HttpResponse, ApiError> {
    // Authorized by within_deadline, before the body was read.
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(state.opts.max_body_bytes)
        } else if client_left(&e) {
            ApiError::client_closed("before sending the whole request body")
        } else {
            ApiError::invalid(None, format!("cannot read the request body: {e}"))
        }
    })?;
    // A compressed body would read as malformed JSON: said as what it is.
    if let Some(encoding) = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .map(str::trim)
        .find(|e| !e.eq_ignore_ascii_case("identity"))
    {
        return Err(ApiError::compressed(encoding));
    }
    let request = parse_request(&body)?;
    if let Some(asked) = &request.model {
        if asked != &state.opts.model_name {
            return Err(ApiError::model_not_found(asked, &state.opts.model_name));
        }
    }
    let ask = request.into_ask(state.opts.max_new_tokens_limit)?;
    let vqa = state.vqa()?.clone();

    // Decoding the image and tokenising the question are compute: off the async threads.
    let mut options = AskOptions {
        max_new_tokens: ask.max_new_tokens.unwrap_or(
            AskOptions::default()
                .max_new_tokens
                .min(state.opts.max_new_tokens_limit),
        ),
        sampling: match ask.sampling {
            Some((temperature, top_p, seed)) => Sampling::Sample {
                temperature,
                top_p,
                seed,
            },
            None => Sampling::Greedy,
        },
        threshold: ask.threshold,
    };
    // A remote image is fetched on a thread of its own: a slow or silent host must not hold
    // the threads that decode everyone's images.
    let fetched = if state.opts.allow_remote_images && is_remote(&ask.image_url) {
        Some(fetch_apart(state, &ask.image_url, &ask.image_param).await?)
    } else {
        None
    };
    // First what the image will cost, from its header (nothing decoded yet): the memory bound
    // is taken before any of it is spent.
    let (bytes, size, max_new_tokens, needed) = {
        let (opts, url, param, question) = (
            state.opts.clone(),
            ask.image_url.clone(),
            ask.image_param.clone(),
            ask.question.clone(),
        );
        let vqa = vqa.clone();
        let max_new = options.max_new_tokens;
        tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
            let max_new = check_question(&vqa, &question, max_new, opts.max_question_tokens)?;
            let bytes = match fetched {
                Some(bytes) => bytes,
                None => read_image_bytes(&url, &param, &opts)?,
            };
            let (w, h) = image_size(&bytes, &param, opts.max_image_pixels).map_err(|e| {
                let message = format!("{e:#}");
                match e.downcast_ref::<crate::error::ImageTooLarge>() {
                    Some(_) => ApiError {
                        param: Some(param.clone()),
                        ..ApiError::image_too_large(message)
                    },
                    None => ApiError::invalid(Some(&param), message),
                }
            })?;
            let processor = vqa
                .model()
                .image_processor()
                .map_err(|e| ApiError::internal(format!("{e:#}")))?;
            // Decoding holds the decoded pixels (in their own depth) and a copy of them;
            // preprocessing holds their 8-bit RGB copy (3 bytes a pixel), the processor's own (3)
            // and its steps' peak. One past the limit can never fit: 413.
            let pixels = u64::from(w) * u64::from(h);
            let decoding = decoding_bytes(&bytes, &param)
                .map_err(|e| ApiError::invalid(Some(&param), format!("{e:#}")))?;
            let needed = processor
                .working_bytes(w as usize, h as usize)
                .map_err(|e| ApiError {
                    param: Some(param.clone()),
                    ..ApiError::image_too_large(format!("{e:#}"))
                })?
                .saturating_add(pixels * 6)
                .max(decoding);
            Ok((bytes, (w, h), max_new, needed))
        })
        .await
        .map_err(|_| ApiError::internal("internal error while reading the image"))??
    };
    options.max_new_tokens = max_new_tokens;
    let kib = needed.div_ceil(1024).max(1);
    if kib > state.opts.max_image_memory_bytes / 1024 {
        return Err(ApiError {
            param: Some(ask.image_param.clone()),
            ..ApiError::image_too_large(format!(
                "the {}×{} image needs {kib} KiB while it is decoded and prepared, more than the \
                 server's image memory of {} KiB (--max-image-memory-mb {}): send a smaller \
                 image",
                size.0,
                size.1,
                state.opts.max_image_memory_bytes / 1024,
                state.opts.max_image_memory_bytes >> 20
            ))
        });
    }
    let take = || {
        let k = u32::try_from(kib).ok()?;
        state.image_memory.clone().try_acquire_many_owned(k).ok()
    };
    // Questions whose askers left while they waited give their shares back first.
    let image_memory = take()
        .or_else(|| {
            state.queue.drop_abandoned();
            take()
        })
        .ok_or_else(|| {
            ApiError::unavailable(
                format!(
                    "the server is busy: the images of the questions in flight fill its image \
                     memory ({} MiB); retry shortly, or send a smaller image",
                    state.opts.max_image_memory_bytes >> 20
                ),
                1,
            )
        })?;
    // Then the decode, within its share. Kept as the processor's 8-bit RGB (exactly what it
    // would make of it first): a 16-bit RGBA upload holds 8 bytes a pixel decoded, this 3.
    let image = {
        let (vqa, param, max_pixels) = (
            vqa.clone(),
            ask.image_param.clone(),
            state.opts.max_image_pixels,
        );
        tokio::task::spawn_blocking(move || -> Result<DynamicImage, ApiError> {
            let image = decode_image(&bytes, &param, max_pixels)
                .map_err(|e| ApiError::invalid(Some(&param), format!("{e:#}")))?;
            vqa.model()
                .image_processor()
                .and_then(|p| p.into_rgb8(image))
                .map(DynamicImage::ImageRgb8)
                .map_err(|e| ApiError::internal(format!("{e:#}")))
        })
        .await
        .map_err(|_| ApiError::internal("internal error while reading the image"))??
    };

    let (reply, answer) = oneshot::channel();
    let job = Job {
        image,
        image_memory,
        question: ask.question.clone(),
        options,
        reply,
        deadline: arrived + state.opts.timeout,
        peer,
    };
    state.queue.push(job).map_err(|why| match why {
        worker::Refused::Full => ApiError::unavailable(
            format!(
                "the server is busy: {} questions are waiting (--queue); retry shortly",
                state.opts.queue
            ),
            1,
        ),
        worker::Refused::Closed => ApiError::unavailable("the server is shutting down", 5),
    })?;
    let timeout = state.opts.timeout;
    let wait = wait_for(answer, arrived, timeout);
    let reply = Reply::new(&state.opts.model_name, &ask);
    if ask.stream {
        return Ok(stream(
            reply,
            vqa,
            ask,
            max_new_tokens,
            wait,
            state.metrics.clone(),
            arrived,
        ));
    }
    let response = wait.await?;
    let rendered = Rendered::new(&vqa, &ask, max_new_tokens, &response);
    Ok(reply.completion(&rendered, &response))
}

/// `Retry-After` of a request the GPU had no memory for.
const OUT_OF_MEMORY_RETRY_SECS: u64 = 5;

/// The worker's answer, or the error the client gets: 504 once the deadline has passed, 503 when
/// the GPU ran out of memory, else 500 with the first line of a failure (the whole chain goes to
/// the server's log).
async fn wait_for(
    answer: oneshot::Receiver<Result<Response>>,
    arrived: Instant,
    timeout: Duration,
) -> Result<Response, ApiError> {
    let remaining = timeout.saturating_sub(arrived.elapsed());
    match tokio::time::timeout(remaining, answer).await {
        Err(_) => Err(ApiError::timeout(timeout.as_secs_f64())),
        // The worker drops questions whose deadline passed before it reached them.
        Ok(Err(_)) if arrived.elapsed() >= timeout => Err(ApiError::timeout(timeout.as_secs_f64())),
        Ok(Err(_)) => Err(ApiError::internal("the worker dropped the question")),
        // Stopped because the client closed the connection while hyper was not reading it.
        Ok(Ok(Err(e))) if e.is::<crate::cancel::Cancelled>() => {
            Err(ApiError::client_closed("before its answer"))
        }
        Ok(Ok(Err(e))) => {
            let text = format!("{e:#}");
            crate::note!("error answering a request: {text}");
            if let Some(hint) = crate::models::compute::out_of_memory_hint(&e) {
                // Memory other requests held may be free on a retry; the operator has the fix.
                crate::note!("{hint}");
                return Err(ApiError::unavailable(
                    "the GPU ran out of memory answering this request: retry later (the \
                     server's log says what its operator can change)",
                    OUT_OF_MEMORY_RETRY_SECS,
                ));
            }
            let first = text.lines().next().unwrap_or("").to_string();
            Err(ApiError::internal(format!(
                "{first} (the server's log has the details)"
            )))
        }
        Ok(Ok(Ok(r))) => Ok(r),
    }
}

/// The request body as a [`ChatRequest`]: one JSON object and nothing after it.
fn parse_request(body: &[u8]) -> Result<ChatRequest, ApiError> {
    // Some clients write a UTF-8 byte-order mark first.
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_none() {
        return Err(ApiError::invalid(
            None,
            "the request body is empty: send a JSON object {\"model\": …, \"messages\": […]}",
        ));
    }
    if first.is_some_and(|&b| b != b'{') {
        return Err(ApiError::invalid(
            None,
            "the request body must be a JSON object: {\"model\": …, \"messages\": […]}",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let request: ChatRequest = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        // A syntax error is the body's, not a field's.
        let path = e.path().to_string();
        let syntax = matches!(
            e.inner().classify(),
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof
        );
        let param = (path != "." && !syntax).then_some(path);
        ApiError::invalid(
            param.as_deref(),
            format!("malformed request: {}", describe_json_error(&e)),
        )
    })?;
    de.end().map_err(|_| {
        ApiError::invalid(
            None,
            "invalid JSON: more data after the request object (one JSON object per request)",
        )
    })?;
    Ok(request)
}

/// Serde's message, without the path (the error's `param` holds it) and, for a field's error,
/// without the position in the body.
fn describe_json_error(e: &serde_path_to_error::Error<serde_json::Error>) -> String {
    let inner = e.inner();
    match inner.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            format!("invalid JSON: {inner}")
        }
        _ => {
            let text = inner.to_string();
            let suffix = format!(" at line {} column {}", inner.line(), inner.column());
            let text = text.strip_suffix(&suffix).unwrap_or(&text);
            match e.path().to_string().as_str() {
                "." => text.to_string(),
                path => format!("{path}: {text}"),
            }
        }
    }
}

/// Refuses questions longer than the server's limit or than the model's positions allow, and
/// returns the answer's token limit: `max_new_tokens`, or less where the prompt leaves less
/// room in the model (`max_tokens` is an upper bound).
fn check_question(
    vqa: &BellaVqa,
    question: &str,
    max_new_tokens: usize,
    limit: usize,
) -> Result<usize, ApiError> {
    let param = Some("messages");
    // OpenAI's code for input too long, which front ends look for to trim a conversation.
    let too_long = |message: String| ApiError {
        code: Some("context_length_exceeded"),
        ..ApiError::invalid(param, message)
    };
    // Text past the bytes any question may hold is too long as well.
    if question.len() > crate::models::prompt::MAX_USER_TEXT_BYTES {
        return Err(too_long(format!(
            "the question is {} bytes long; at most {} bytes are accepted: shorten it",
            question.len(),
            crate::models::prompt::MAX_USER_TEXT_BYTES
        )));
    }
    let tokens = vqa
        .text_tokens(question)
        .map_err(|e| ApiError::invalid(param, format!("{e:#}")))?;
    if tokens > limit {
        return Err(too_long(format!(
            "the question is {tokens} tokens long; the limit is {limit} (--max-question-tokens)"
        )));
    }
    // The question tokenized above: what fails now is a prompt longer than the model's positions.
    match vqa
        .answer_room(question)
        .map_err(|e| too_long(format!("{e:#}")))?
    {
        Some(0) => Err(too_long(format!(
            "the question ({tokens} tokens) with the image and chat template fills the model's \
             positions and leaves no room for an answer: shorten the question"
        ))),
        Some(room) => Ok(max_new_tokens.min(room)),
        None => Ok(max_new_tokens),
    }
}

/// Whether `url` is an `http(s)://` URL (schemes are case-insensitive, RFC 3986 §3.1).
fn is_remote(url: &str) -> bool {
    ["http://", "https://"].iter().any(|scheme| {
        url.get(..scheme.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(scheme))
    })
}

/// Most remote images fetched at once (`--allow-remote-images`), each on its own thread.
const REMOTE_FETCHES: usize = 4;

/// [`fetch_remote`] on a thread of its own, which holds one of [`REMOTE_FETCHES`] permits until
/// the fetch ends (its own deadline) even if the client has left; none free: 503.
async fn fetch_apart(state: &AppState, url: &str, param: &str) -> Result<Vec<u8>, ApiError> {
    let permit = state
        .remote_fetches
        .clone()
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::unavailable(
                "the server is fetching as many remote images as it may at once; retry shortly, \
                 or send the image as a data URL",
                1,
            )
        })?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (url_owned, max_bytes) = (url.to_string(), state.opts.max_body_bytes);
    std::thread::Builder::new()
        .name("fetch-image".into())
        .spawn(move || {
            let _permit = permit;
            let _ = tx.send(fetch_remote(&url_owned, max_bytes));
        })
        .map_err(|e| {
            ApiError::internal(format!("cannot start a thread to fetch the image: {e}"))
        })?;
    rx.await
        .map_err(|_| ApiError::internal("the image fetch stopped unexpectedly"))?
        .map_err(|e| ApiError::invalid(Some(param), format!("{e:#}")))
}

/// The bytes of a `data:` URL or, when allowed, of an `http(s)://` one. Never reads local files.
fn read_image_bytes(url: &str, param: &str, opts: &ServeOptions) -> Result<Vec<u8>, ApiError> {
    let param = Some(param);
    // URL schemes are case-insensitive (RFC 3986 §3.1).
    let scheme = |s: &str| {
        url.get(..s.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(s))
    };
    let bytes = if scheme("data:") {
        let rest = &url["data:".len()..];
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| ApiError::invalid(param, "a data URL needs a comma before its data"))?;
        let mut meta_parts = meta.split(';');
        let media = meta_parts.next().unwrap_or("").to_ascii_lowercase();
        // No type, or "some bytes": the bytes say what they are, as for any image type.
        if !media.is_empty() && !media.starts_with("image/") && media != "application/octet-stream"
        {
            return Err(ApiError::invalid(
                param,
                format!(
                    "the data URL holds {media:?}, not an image (send image/png, image/jpeg, image/webp, image/gif, image/bmp or image/tiff)"
                ),
            ));
        }
        if !meta_parts.any(|p| p.eq_ignore_ascii_case("base64")) {
            return Err(ApiError::invalid(
                param,
                "only base64 data URLs are accepted (data:image/png;base64,…)",
            ));
        }
        decode_base64(data).map_err(|e| {
            ApiError::invalid(
                param,
                format!("the data URL is not valid base64 (standard or URL-safe alphabet, padded or not): {e}"),
            )
        })?
    } else if is_remote(url) {
        if !opts.allow_remote_images {
            return Err(ApiError::invalid(
                param,
                "remote image URLs are off: send the image as a data URL (data:image/png;base64,…) or start the server with --allow-remote-images",
            ));
        }
        fetch_remote(url, opts.max_body_bytes)
            .map_err(|e| ApiError::invalid(param, format!("{e:#}")))?
    } else {
        return Err(ApiError::invalid(
            param,
            "the image must be a data URL (data:image/png;base64,…), or http(s) with \
             --allow-remote-images; other schemes and local paths are never read",
        ));
    };
    Ok(bytes)
}

/// Base64 as clients write it: the standard or the URL-safe alphabet, with or without padding,
/// line breaks and spaces ignored.
fn decode_base64(data: &str) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::alphabet::{STANDARD, URL_SAFE};
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let config =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let alphabet = if compact.contains(['-', '_']) {
        &URL_SAFE
    } else {
        &STANDARD
    };
    GeneralPurpose::new(alphabet, config).decode(compact.as_bytes())
}

/// Fetches a public image (`--allow-remote-images`): addresses on this machine or a private
/// network are refused, the transfer has a deadline and a size limit.
fn fetch_remote(url: &str, max_bytes: usize) -> Result<Vec<u8>> {
    let uri: Uri = url
        .parse()
        .with_context(|| format!("{url} is not a valid URL"))?;
    let host = uri.host().context("the image URL has no host")?;
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let host_for_lookup = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(host_for_lookup, port))
        .with_context(|| format!("cannot resolve {host}"))?
        .collect();
    if addrs.is_empty() || addrs.iter().any(|a| !is_public(a.ip())) {
        anyhow::bail!("{host} is not a public address: images are fetched from the internet only");
    }
    fetch_from(url, addrs, max_bytes)
}

/// GET `url` from one of `addrs` (never from what its host's name resolves to now).
fn fetch_from(url: &str, addrs: Vec<SocketAddr>, max_bytes: usize) -> Result<Vec<u8>> {
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(15)))
        .max_redirects(0)
        .build();
    // The connection goes to the addresses just checked: looking the name up again could give
    // another (a private one, from a name whose answers change: DNS rebinding).
    let agent = ureq::Agent::with_parts(
        config,
        ureq::unversioned::transport::DefaultConnector::default(),
        CheckedAddresses(addrs),
    );
    let mut response = agent
        .get(url)
        .call()
        .with_context(|| format!("cannot fetch the image {url}"))?;
    response
        .body_mut()
        .with_config()
        .limit(max_bytes as u64)
        .read_to_vec()
        .with_context(|| format!("cannot read the image {url} (larger than --max-body-mb?)"))
}

/// A resolver that answers with addresses resolved and checked before ([`fetch_remote`]).
#[derive(Debug)]
struct CheckedAddresses(Vec<SocketAddr>);

impl ureq::unversioned::resolver::Resolver for CheckedAddresses {
    fn resolve(
        &self,
        _uri: &Uri,
        _config: &ureq::config::Config,
        _timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        if self.0.is_empty() {
            return Err(ureq::Error::HostNotFound);
        }
        let mut resolved = self.empty();
        for addr in &self.0 {
            if resolved.try_push(*addr).is_err() {
                break; // as many as ureq keeps
            }
        }
        Ok(resolved)
    }
}

fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_multicast()
                // 100.64.0.0/10, carrier-grade NAT
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64))
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public(IpAddr::V4(v4)),
            None => {
                let first = v6.segments()[0];
                !(v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || (first & 0xfe00) == 0xfc00 // unique local
                    || (first & 0xffc0) == 0xfe80) // link local
            }
        },
    }
}

/// The message content: the rendered response, plus each particle's answer when asked.
fn content(ask: &Ask, r: &Response) -> String {
    let mut text = r.response.clone();
    if ask.show_particles {
        for (i, p) in r.particles.iter().enumerate() {
            text.push_str(&format!(
                "\nparticle {i}: {:?} (log-likelihood {:.3})",
                p.answer, p.log_likelihood
            ));
        }
    }
    text
}

/// What every response of one request shares: its id, time and model name.
struct Reply {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

/// The answer as the response reports it. `usage.completion_tokens` counts the tokens of the
/// answer the particles generated (at most `max_new_tokens`), not the abstention wording around
/// it; `bella.generated_tokens` counts every particle's.
struct Rendered {
    text: String,
    usage: Usage,
    finish_reason: &'static str,
}

impl Rendered {
    fn new(vqa: &BellaVqa, ask: &Ask, max_new_tokens: usize, r: &Response) -> Self {
        let completion_tokens = vqa.text_tokens(&r.answer).unwrap_or(0).min(max_new_tokens);
        // "length" when the answer's particles all stopped at max_tokens.
        let answer = crate::data::normalize::normalize_answer(&r.answer);
        let truncated = r
            .particles
            .iter()
            .filter(|p| p.normalized == answer)
            .all(|p| p.truncated);
        let whole = content(ask, r);
        let text = openai::cut_at_stop(&whole, &ask.stop);
        // A stop sequence that cut the text ended it, as in OpenAI's API.
        let stopped = text.len() < whole.len();
        Self {
            text,
            usage: Usage {
                prompt_tokens: r.prompt_tokens,
                completion_tokens,
                total_tokens: r.prompt_tokens + completion_tokens,
            },
            finish_reason: if truncated && !stopped {
                "length"
            } else {
                "stop"
            },
        }
    }
}

impl Reply {
    fn new(model: &str, ask: &Ask) -> Self {
        Self {
            id: format!("chatcmpl-{:032x}", rand::random::<u128>()),
            created: unix_now(),
            model: model.to_string(),
            include_usage: ask.include_usage,
        }
    }

    fn completion(&self, a: &Rendered, r: &Response) -> HttpResponse {
        Json(Completion {
            id: &self.id,
            object: "chat.completion",
            created: self.created,
            model: &self.model,
            choices: vec![Choice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: &a.text,
                },
                finish_reason: a.finish_reason,
                logprobs: None,
            }],
            usage: a.usage,
            bella: r,
        })
        .into_response()
    }

    fn chunk(
        &self,
        choice: Option<ChunkChoice>,
        usage: Option<Usage>,
        r: Option<&Response>,
    ) -> Event {
        let c = Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: choice.into_iter().collect(),
            usage: self.include_usage.then_some(usage),
            bella: r,
        };
        Event::default().data(serde_json::to_string(&c).unwrap_or_default())
    }

    fn delta(&self, delta: Delta, finish: Option<&'static str>, r: Option<&Response>) -> Event {
        let choice = ChunkChoice {
            index: 0,
            delta,
            finish_reason: finish,
            logprobs: None,
        };
        self.chunk(Some(choice), None, r)
    }

    /// The stream's first chunk, sent before the answer is known.
    fn role(&self) -> Event {
        let delta = Delta {
            role: Some("assistant"),
            content: Some(""),
        };
        self.delta(delta, None, None)
    }

    /// The chunks after the first: the text a word at a time, the finish with the `bella`
    /// object, the usage (when asked for) and `[DONE]`.
    fn answer_chunks(&self, a: &Rendered, r: &Response) -> Vec<Event> {
        let mut events: Vec<Event> = a
            .text
            .split_inclusive(' ')
            .map(|piece| {
                let delta = Delta {
                    role: None,
                    content: Some(piece),
                };
                self.delta(delta, None, None)
            })
            .collect();
        events.push(self.delta(Delta::default(), Some(a.finish_reason), Some(r)));
        if self.include_usage {
            events.push(self.chunk(None, Some(a.usage), None));
        }
        events.push(Event::default().data("[DONE]"));
        events
    }
}

/// Marks a streamed response: its status and latency are counted when the stream ends (the
/// headers leave before the answer is known), and this holds the status of its answer: 200, or
/// the error's, sent as an error event (504 once its deadline passed).
#[derive(Clone)]
struct Streamed(Arc<std::sync::atomic::AtomicU16>);

impl Streamed {
    fn status(&self) -> u16 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Counts a request whose client left before its answer (dropped while it waited) as 499,
/// nginx's "client closed request", so that /metrics accounts for every request.
struct LeftEarly(Option<Arc<Metrics>>);

impl LeftEarly {
    /// The answer (or its error) was counted: nothing to count on drop.
    fn answered(mut self) {
        self.0 = None;
    }
}

impl Drop for LeftEarly {
    fn drop(&mut self) {
        if let Some(metrics) = self.0.take() {
            metrics.count(CLIENT_CLOSED);
        }
    }
}

/// The status /metrics counts a request under when its client left before the answer.
const CLIENT_CLOSED: u16 = 499;

/// Whether a body could not be read because its client closed the connection before sending all
/// of it (not a bad request: counted as 499). hyper reports it as an I/O error, `UnexpectedEof`
/// (a reset connection as such).
fn client_left(rejection: &BytesRejection) -> bool {
    use std::io::ErrorKind;
    let mut source = std::error::Error::source(rejection);
    while let Some(e) = source {
        if e.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                ErrorKind::UnexpectedEof
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
            )
        }) {
            return true;
        }
        source = e.source();
    }
    false
}

/// How often a stream waiting for its answer sends an SSE comment, so that proxies and clients
/// with a read timeout (nginx: 60 s) keep the connection while a large model answers.
const STREAM_KEEP_ALIVE: Duration = Duration::from_secs(15);

/// A streamed answer: the headers and the first chunk (the assistant's role) leave at once, SSE
/// comments keep the connection while the particles answer (every particle must have answered
/// before the decision, so the text comes all at once), then the answer's chunks; a failure
/// after the first chunk is sent as an OpenAI error event (`data: {"error": {…}}`), which the
/// OpenAI SDKs raise.
fn stream(
    reply: Reply,
    vqa: Arc<BellaVqa>,
    ask: Ask,
    max_new_tokens: usize,
    wait: impl Future<Output = Result<Response, ApiError>> + Send + 'static,
    metrics: Arc<Metrics>,
    arrived: Instant,
) -> HttpResponse {
    use futures_util::StreamExt as _;
    let first = reply.role();
    // Made out here: a client gone before the answer is first awaited is counted too.
    let count = LeftEarly(Some(metrics.clone()));
    let streamed = Streamed(Arc::new(StatusCode::OK.as_u16().into()));
    let outcome = streamed.0.clone();
    let rest = futures_util::stream::once(async move {
        let (status, events) = match wait.await {
            Ok(r) => {
                let rendered = Rendered::new(&vqa, &ask, max_new_tokens, &r);
                (StatusCode::OK, reply.answer_chunks(&rendered, &r))
            }
            Err(e) => (e.status, vec![Event::default().data(e.body().to_string())]),
        };
        metrics.answered(status.as_u16(), arrived);
        outcome.store(status.as_u16(), Ordering::SeqCst);
        count.answered();
        futures_util::stream::iter(events)
    })
    .flatten();
    let events = futures_util::stream::iter([first])
        .chain(rest)
        .map(Ok::<_, std::convert::Infallible>);
    let keep_alive = axum::response::sse::KeepAlive::new().interval(STREAM_KEEP_ALIVE);
    let mut response = Sse::new(events).keep_alive(keep_alive).into_response();
    // nginx buffers a proxied response unless told not to: the first chunk and the keep-alive
    // comments must pass at once.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response.extensions_mut().insert(streamed);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt as _;
    use serde_json::{json, Value};

    /// A remote image is fetched from the addresses that were checked, its host's name not
    /// looked up again (here a name that resolves nowhere).
    #[test]
    fn a_remote_image_is_fetched_from_the_checked_addresses() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = [0u8; 1024];
            let n = stream.read(&mut request).unwrap();
            let head = String::from_utf8_lossy(&request[..n]).into_owned();
            stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nimage",
                )
                .unwrap();
            head
        });
        let url = format!("http://rebinding.invalid:{}/cat.png", addr.port());
        let bytes = fetch_from(&url, vec![addr], 1 << 20).unwrap();
        assert_eq!(bytes, b"image");
        let head = server.join().unwrap();
        assert!(head.starts_with("GET /cat.png"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("host: rebinding.invalid"),
            "{head}"
        );
    }

    #[test]
    fn a_timeout_past_a_week_is_refused_before_serving() {
        // u64::MAX seconds overflowed the deadlines: a panic, or every connection closed.
        for secs in [u64::MAX, MAX_TIMEOUT.as_secs() + 1] {
            let opts = ServeOptions {
                timeout: Duration::from_secs(secs),
                ..ServeOptions::default()
            };
            let e = opts.check().unwrap_err().to_string();
            assert!(e.contains("--timeout-secs must be at most"), "{e}");
        }
        let week = ServeOptions {
            timeout: MAX_TIMEOUT,
            ..ServeOptions::default()
        };
        assert!(week.check().is_ok());
    }

    /// The JSON of each `data:` line of the SSE bytes `text`.
    fn data(text: &str) -> Vec<Value> {
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap_or(Value::String(d.into())))
            .collect()
    }

    #[test]
    fn a_question_past_the_byte_limit_is_context_length_exceeded() {
        let vqa = BellaVqa::load(
            &crate::ModelSource::Dir(crate::demo::path(crate::demo::LLAVA).unwrap()),
            None,
            &crate::LoadOptions::default(),
        )
        .unwrap();
        // Front ends look for the code to trim a conversation; it had none past 64 KiB.
        let question = "a".repeat(crate::models::prompt::MAX_USER_TEXT_BYTES + 1);
        let e = check_question(&vqa, &question, 16, usize::MAX).unwrap_err();
        assert_eq!(e.code, Some("context_length_exceeded"), "{}", e.message);
    }

    #[tokio::test]
    async fn a_gpu_out_of_memory_is_503_with_retry_after_and_other_failures_500() {
        let fail = |message: &'static str| async move {
            let (tx, rx) = oneshot::channel::<Result<Response>>();
            tx.send(Err(anyhow::anyhow!(message).context("answering")))
                .ok()
                .unwrap();
            wait_for(rx, Instant::now(), Duration::from_secs(60))
                .await
                .unwrap_err()
        };
        let oom = fail(r#"DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of memory")"#).await;
        assert_eq!(oom.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(oom.retry_after, Some(OUT_OF_MEMORY_RETRY_SECS));
        let other = fail("a tensor of the wrong shape").await;
        assert_eq!(other.status, StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[tokio::test]
    async fn a_stream_starts_before_the_answer_and_ends_with_it_or_its_error() {
        let vqa = Arc::new(
            BellaVqa::load(
                &crate::ModelSource::Dir(crate::demo::path(crate::demo::LLAVA).unwrap()),
                Some(&crate::demo::path(crate::demo::PARTICLES).unwrap()),
                &crate::LoadOptions::default(),
            )
            .unwrap(),
        );
        let image = crate::load_image(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("eval/demo/red-circle.png"),
        )
        .unwrap();
        let answered = vqa.ask(&image, "What color is the circle?").unwrap();
        let request = json!({"stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": [{"type": "text", "text": "What color?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]});
        let expected_text = answered.answer.clone();
        // A stream of `request` whose answer is whatever the returned sender sends.
        let start = || {
            let ask = serde_json::from_value::<ChatRequest>(request.clone())
                .unwrap()
                .into_ask(64)
                .unwrap();
            let (tx, rx) = oneshot::channel::<Result<Response, ApiError>>();
            let metrics = Arc::new(Metrics::new());
            let wait = async move { rx.await.unwrap_or_else(|_| Err(ApiError::internal("gone"))) };
            let reply = Reply::new("m", &ask);
            let response = stream(
                reply,
                vqa.clone(),
                ask,
                16,
                wait,
                metrics.clone(),
                Instant::now(),
            );
            (tx, metrics, response)
        };
        // A client that leaves after the first chunk is counted as 499 ("client closed").
        {
            let (_tx, metrics, response) = start();
            let mut body = response.into_body().into_data_stream();
            body.next().await.unwrap().unwrap();
            drop(body);
            let counts = metrics.render();
            assert!(counts.contains("status=\"499\"} 1"), "{counts}");
        }
        for outcome in [Ok(answered), Err(ApiError::timeout(3.0))] {
            let (tx, metrics, response) = start();
            assert!(response.extensions().get::<Streamed>().is_some());
            assert_eq!(response.headers()["x-accel-buffering"], "no");
            let mut body = response.into_body().into_data_stream();
            // The first chunk comes while the answer is still unknown (nothing was sent yet).
            let first = tokio::time::timeout(Duration::from_secs(60), body.next())
                .await
                .expect("the first chunk does not wait for the answer")
                .unwrap()
                .unwrap();
            let first = data(std::str::from_utf8(&first).unwrap());
            assert_eq!(first.len(), 1, "{first:?}");
            assert_eq!(first[0]["choices"][0]["delta"]["role"], "assistant");
            assert!(first[0]["usage"].is_null(), "{first:?}");
            let failed = outcome.is_err();
            tx.send(outcome).map_err(|_| ()).unwrap();
            let mut rest = String::new();
            while let Some(bytes) = body.next().await {
                rest.push_str(std::str::from_utf8(&bytes.unwrap()).unwrap());
            }
            let events = data(&rest);
            let counts = metrics.render();
            assert!(!counts.contains("499"), "{counts}");
            if failed {
                // One OpenAI error object, then the stream ends.
                assert_eq!(events.len(), 1, "{rest}");
                assert_eq!(events[0]["error"]["code"], "timeout", "{rest}");
                assert!(events[0]["error"]["message"].is_string(), "{rest}");
                assert!(counts.contains("status=\"504\"} 1"), "{counts}");
            } else {
                assert_eq!(events.last().unwrap(), "[DONE]", "{rest}");
                let text: String = events
                    .iter()
                    .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
                    .collect();
                assert!(text.contains(&expected_text), "{text} / {expected_text}");
                let usage = &events[events.len() - 2]["usage"];
                assert!(usage["completion_tokens"].as_u64().is_some(), "{rest}");
                assert!(counts.contains("status=\"200\"} 1"), "{counts}");
                assert!(counts.contains("chat_latency_seconds_count 1"), "{counts}");
            }
        }
    }
}
