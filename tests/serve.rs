//! `bella-vqa serve` over loopback: answers (plain and streamed) agree with `ask`, every error
//! class has its status and OpenAI error body, concurrent requests are all answered, the queue
//! and deadline limits hold, /health follows the loading, and SIGTERM drains gracefully.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use base64::Engine as _;
use bella_vqa::serve::{serve, ServeOptions};
use bella_vqa::{BellaVqa, LoadOptions, ModelSource};
use serde_json::{json, Value};

/// A server on an ephemeral loopback port, stopped (gracefully) on drop.
struct Server {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    fn start(
        opts: ServeOptions,
        load: impl FnOnce() -> anyhow::Result<BellaVqa> + Send + 'static,
    ) -> Self {
        let (addr_tx, addr_rx) = std_mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                addr_tx.send(listener.local_addr()?)?;
                serve(listener, opts, load, async {
                    let _ = stopped.await;
                })
                .await
            })
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the server binds");
        Self {
            url: format!("http://{addr}"),
            stop: Some(stop),
            done: Some(done),
        }
    }

    fn demo(opts: ServeOptions) -> Self {
        Self::start(opts, || {
            BellaVqa::load(
                &ModelSource::Dir(bella_vqa::demo::path(bella_vqa::demo::LLAVA)?),
                Some(&bella_vqa::demo::path(bella_vqa::demo::PARTICLES)?),
                &LoadOptions::default(),
            )
        })
    }

    /// Stops and returns what `serve` returned.
    fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.done.take() {
            Some(done) => done.join().expect("server thread"),
            None => Ok(()),
        }
    }

    fn wait_ready(&self) {
        for _ in 0..600 {
            if get(&format!("{}/health", self.url)).0 == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the server did not become ready");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// `bella-vqa serve --port 0` with `args`, as a child process whose model has loaded (a request
/// while loading gets 503 and its connection closed): it, the lines of its stderr after the one
/// that says where it listens, and that URL.
fn serve_process(
    args: &[&str],
) -> (
    std::process::Child,
    std::io::Lines<BufReader<std::process::ChildStderr>>,
    String,
) {
    serve_process_with(&[], args)
}

/// [`serve_process`] with variables `env` in its environment.
fn serve_process_with(
    env: &[(&str, &str)],
    args: &[&str],
) -> (
    std::process::Child,
    std::io::Lines<BufReader<std::process::ChildStderr>>,
    String,
) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
        .args(["serve", "--port", "0"])
        .args(args)
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("serve starts");
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let url = loop {
        let line = lines.next().expect("a line").expect("stderr");
        if let Some(addr) = line.strip_prefix("listening on ") {
            break addr.to_string();
        }
    };
    let ready = Server {
        url: url.clone(),
        stop: None,
        done: None,
    };
    ready.wait_ready();
    (child, lines, url)
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// A raw connection to the server at `addr` (`host:port`) that waits at most 10 s for a reply.
fn connect(addr: &str) -> std::net::TcpStream {
    let stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// A chat request whose body of `length` bytes is announced; the caller sends what it will of it.
fn announce_body(addr: &str, length: usize) -> std::net::TcpStream {
    use std::io::Write;
    let mut stream = connect(addr);
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
    .unwrap();
    stream
}

/// A chat request with `body` sent whole on a raw connection (`Connection: close`); the caller
/// reads the answer, or leaves.
fn send_chat(addr: &str, body: &str) -> std::net::TcpStream {
    use std::io::Write;
    let mut stream = connect(addr);
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    stream
}

/// Stops a [`serve_process`] with SIGTERM (it must exit cleanly) and returns the statuses its
/// access log wrote for chat requests, in order.
fn chat_statuses_at_exit(
    mut child: std::process::Child,
    lines: std::io::Lines<BufReader<std::process::ChildStderr>>,
) -> Vec<String> {
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(child.wait().expect("exit").success(), "{rest:?}");
    rest.iter()
        .filter_map(|l| l.strip_prefix("POST /v1/chat/completions "))
        .map(|l| l.split(' ').next().unwrap_or("").to_string())
        .collect()
}

fn get(url: &str) -> (u16, String) {
    let mut r = agent().get(url).call().expect("GET");
    let status = r.status().as_u16();
    (status, r.body_mut().read_to_string().expect("body"))
}

/// POSTs `body` (with an optional bearer key): status, Retry-After, body text.
fn post(url: &str, body: &str, key: Option<&str>) -> (u16, Option<String>, String) {
    let mut req = agent()
        .post(&format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", &format!("Bearer {k}"));
    }
    let mut r = req.send(body).expect("POST");
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let text = r
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .expect("body");
    (status, retry, text)
}

fn demo_image(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("eval/demo")
        .join(name)
}

fn data_url(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("image");
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn request(image_url: &str, question: &str) -> Value {
    json!({
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": question},
            {"type": "image_url", "image_url": {"url": image_url}}
        ]}]
    })
}

/// Asserts an OpenAI error body and returns its `error` object.
#[track_caller]
fn error_of(status: u16, expected: u16, text: &str) -> Value {
    assert_eq!(status, expected, "{text}");
    let v: Value = serde_json::from_str(text).expect("an error body is JSON");
    let e = v["error"].clone();
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    e
}

fn ask_json(image: &Path, question: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_bella-vqa"))
        .args(["ask", "--json", "--image"])
        .arg(image)
        .arg(question)
        .output()
        .expect("ask runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ask --json prints JSON")
}

/// The `data:` lines of a server-sent event stream.
fn sse_data(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.trim().to_string())
        .collect()
}

#[test]
fn demo_answers_like_ask_plain_and_streamed() {
    let server = Server::demo(ServeOptions {
        model_name: "bella-vqa-demo".into(),
        ..ServeOptions::default()
    });
    server.wait_ready();
    let (status, health) = get(&format!("{}/health", server.url));
    assert_eq!(status, 200);
    let health: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(health["particles"], 4);
    assert_eq!(health["compute"], "f32");
    let (status, models) = get(&format!("{}/v1/models", server.url));
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], "bella-vqa-demo");
    // The model by id (client.models.retrieve), created when the server started.
    let (status, one) = get(&format!("{}/v1/models/bella-vqa-demo", server.url));
    assert_eq!(status, 200, "{one}");
    let one: Value = serde_json::from_str(&one).unwrap();
    assert_eq!(one["id"], "bella-vqa-demo");
    assert_eq!(one["created"], models["data"][0]["created"]);
    let (status, text) = get(&format!("{}/v1/models/gpt-4o", server.url));
    assert_eq!(error_of(status, 404, &text)["code"], "model_not_found");

    for (image, question) in [
        ("red-circle.png", "What color is the circle?"),
        ("photo-cat.png", "What color is the circle?"),
    ] {
        let path = demo_image(image);
        let cli = ask_json(&path, question);
        let mut body = request(&data_url(&path), question);
        body["model"] = "bella-vqa-demo".into();
        let (status, _, text) = post(&server.url, &body.to_string(), None);
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(v["model"], "bella-vqa-demo");
        let bella = &v["bella"];
        // The same answer, abstention, particles and numbers as `ask --json`.
        for key in [
            "answer",
            "abstained",
            "threshold",
            "calibrated",
            "selector",
            "response",
        ] {
            assert_eq!(bella[key], cli[key], "{image}: {key}");
        }
        for key in ["confidence", "vote_share"] {
            let (a, b) = (bella[key].as_f64().unwrap(), cli[key].as_f64().unwrap());
            assert!((a - b).abs() < 1e-9, "{image}: {key} {a} vs {b}");
        }
        for key in ["total", "aleatoric", "epistemic"] {
            let a = bella["uncertainty"][key].as_f64().unwrap();
            let b = cli["uncertainty"][key].as_f64().unwrap();
            assert!((a - b).abs() < 1e-9, "{image}: {key}");
        }
        assert_eq!(bella["particles"], cli["particles"]);
        // The demo's image check: the photograph is unfamiliar, the shapes image is not.
        assert_eq!(bella["image_check"], cli["image_check"], "{image}");
        assert_eq!(
            bella["image_check"]["familiar"],
            image == "red-circle.png",
            "{image}"
        );
        assert_eq!(v["choices"][0]["message"]["content"], cli["response"]);
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let usage = &v["usage"];
        assert_eq!(usage["prompt_tokens"], cli["prompt_tokens"]);
        // The tokens of the answer the particles generated, within max_tokens (16 by default),
        // not of the abstention wording around it.
        let completion = usage["completion_tokens"].as_u64().unwrap();
        assert!((1..=16).contains(&completion), "{usage}");
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        );

        // Streamed: the same text in pieces, the bella object in the last content chunk.
        body["stream"] = true.into();
        body["stream_options"] = json!({"include_usage": true});
        let (status, _, text) = post(&server.url, &body.to_string(), None);
        assert_eq!(status, 200, "{text}");
        let data = sse_data(&text);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).expect("chunk JSON"))
            .collect();
        assert!(chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk"));
        // With include_usage, every chunk but the last carries "usage": null (as OpenAI's do).
        assert!(chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c.get("usage") == Some(&Value::Null)));
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let streamed: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(streamed, cli["response"].as_str().unwrap());
        let last = chunks
            .iter()
            .rfind(|c| c["choices"][0]["finish_reason"].is_string())
            .expect("a finishing chunk");
        assert_eq!(last["bella"]["answer"], cli["answer"]);
        assert_eq!(last["bella"]["abstained"], cli["abstained"]);
        let usage_chunk = chunks.last().unwrap();
        assert_eq!(usage_chunk["choices"].as_array().unwrap().len(), 0);
        assert_eq!(usage_chunk["usage"]["prompt_tokens"], cli["prompt_tokens"]);
    }

    // A request may override the threshold and ask for the particles in the text.
    let mut body = request(
        &data_url(&demo_image("red-circle.png")),
        "What color is the circle?",
    );
    body["bella"] = json!({"threshold": 1.0, "show_particles": true});
    let (status, _, text) = post(&server.url, &body.to_string(), None);
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["bella"]["abstained"], true);
    assert_eq!(v["bella"]["threshold"], 1.0);
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(content.starts_with("I'm not sure"), "{content}");
    assert_eq!(content.matches("particle ").count(), 4, "{content}");

    // Prometheus metrics saw the requests.
    let (status, metrics) = get(&format!("{}/metrics", server.url));
    assert_eq!(status, 200);
    assert!(
        metrics.contains("bella_chat_requests_total{status=\"200\"} 5"),
        "{metrics}"
    );
    assert!(metrics.contains("bella_particles 4"), "{metrics}");
    assert!(metrics.contains("bella_abstentions_total"), "{metrics}");
    server.stop().expect("clean stop");
}

/// The tiny fixture with its crafted-free base model: every error class with its status.
#[test]
fn every_error_class_has_its_status_and_body() {
    let fixture = common::fixture("llava-tiny-hub");
    let server = Server::start(
        ServeOptions {
            model_name: "tiny".into(),
            api_key: Some("sesame".into()),
            max_body_bytes: 64 * 1024,
            max_image_pixels: 40 * 40,
            max_question_tokens: 40,
            ..ServeOptions::default()
        },
        move || BellaVqa::load(&ModelSource::Dir(fixture), None, &LoadOptions::default()),
    );
    server.wait_ready();
    let url = &server.url;
    let key = Some("sesame");
    let square = data_url(&common::fixture("images/square.png"));
    let good = request(&square, "What color is the circle?");

    // 200 with the key; the tiny model answers something.
    let (status, _, text) = post(url, &good.to_string(), key);
    assert_eq!(status, 200, "{text}");

    // 401: no key, a wrong key; /v1/models too; /health stays open.
    let (s, _, t) = post(url, &good.to_string(), None);
    assert_eq!(error_of(s, 401, &t)["code"], "invalid_api_key");
    let (s, _, t) = post(url, &good.to_string(), Some("wrong"));
    error_of(s, 401, &t);
    // The scheme is case-insensitive.
    let mut r = agent()
        .post(&format!("{url}/v1/chat/completions"))
        .header("authorization", "bearer sesame")
        .send(good.to_string())
        .expect("POST");
    assert_eq!(
        r.status().as_u16(),
        200,
        "{:?}",
        r.body_mut().read_to_string()
    );
    assert_eq!(get(&format!("{url}/v1/models")).0, 401);
    assert_eq!(get(&format!("{url}/health")).0, 200);
    // Without the key, refused before its body is read: a body announced and not sent.
    {
        use std::io::{Read, Write};
        let mut stream = announce_body(url.trim_start_matches("http://"), 60000);
        stream.write_all(b"{").unwrap();
        let mut reply = [0u8; 1024];
        let n = stream.read(&mut reply).expect("an answer at once");
        let reply = String::from_utf8_lossy(&reply[..n]).to_ascii_lowercase();
        assert!(reply.starts_with("http/1.1 401"), "{reply}");
        // Its body unread, the connection ends, and says so to pooling clients.
        assert!(reply.contains("\r\nconnection: close\r\n"), "{reply}");
    }

    // 404: an unknown model, an unknown route.
    let mut unknown = good.clone();
    unknown["model"] = "gpt-4o".into();
    let (s, _, t) = post(url, &unknown.to_string(), key);
    let e = error_of(s, 404, &t);
    assert_eq!(e["param"], "model");
    assert!(e["message"].as_str().unwrap().contains("tiny"), "{e}");
    let (s, t) = get(&format!("{url}/v2/nothing"));
    error_of(s, 404, &t);

    // 413: a body over --max-body-mb (counted in /metrics like every chat response).
    let big = request(
        &format!("data:image/png;base64,{}", "A".repeat(100_000)),
        "q?",
    );
    let (s, _, t) = post(url, &big.to_string(), key);
    error_of(s, 413, &t);
    let (_, metrics) = get(&format!("{url}/metrics"));
    assert!(
        metrics.contains("bella_chat_requests_total{status=\"413\"} 1"),
        "{metrics}"
    );
    // A client that leaves in the middle of its body did not send a bad request: 499, not 400.
    {
        use std::io::Write;
        let addr = url.trim_start_matches("http://");
        let mut stream = connect(addr);
        write!(
            stream,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer sesame\r\n\
             Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"model\":"
        )
        .unwrap();
        stream.flush().unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }
    let counted = |status: &str| {
        let (_, metrics) = get(&format!("{url}/metrics"));
        metrics.contains(&format!(
            "bella_chat_requests_total{{status=\"{status}\"}} 1"
        ))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !counted("499") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(counted("499") && !counted("400"), "the client that left");

    // What clients send besides the plainest form is read: an upper-case scheme, URL-safe or
    // unpadded base64, WebP and GIF images, a max_tokens larger than the server gives.
    let square_bytes = std::fs::read(common::fixture("images/square.png")).unwrap();
    let square_image = image::load_from_memory(&square_bytes).unwrap();
    let encoded = |format: image::ImageFormat| {
        let mut out = std::io::Cursor::new(Vec::new());
        square_image.to_rgb8().write_to(&mut out, format).unwrap();
        out.into_inner()
    };
    let url_safe = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&square_bytes);
    for (label, image_url, max_tokens) in [
        (
            "upper case",
            format!(
                "DATA:IMAGE/PNG;BASE64,{}",
                base64::engine::general_purpose::STANDARD.encode(&square_bytes)
            ),
            8,
        ),
        ("url-safe", format!("data:image/png;base64,{url_safe}"), 8),
        (
            "webp",
            format!(
                "data:image/webp;base64,{}",
                base64::engine::general_purpose::STANDARD.encode(encoded(image::ImageFormat::WebP))
            ),
            8,
        ),
        (
            "gif",
            format!(
                "data:image/gif;base64,{}",
                base64::engine::general_purpose::STANDARD.encode(encoded(image::ImageFormat::Gif))
            ),
            8,
        ),
        ("max_tokens 4096", square.clone(), 4096),
    ] {
        let mut body = request(&image_url, "What color is the circle?");
        body["max_tokens"] = max_tokens.into();
        let (s, _, t) = post(url, &body.to_string(), key);
        assert_eq!(s, 200, "{label}: {t}");
    }
    // A byte-order mark before the body is read past.
    let (s, _, t) = post(url, &format!("\u{feff}{good}"), key);
    assert_eq!(s, 200, "{t}");
    // An empty body (or blanks) is named as such, not as JSON cut short.
    for empty in ["", " \n"] {
        let (s, _, t) = post(url, empty, key);
        let e = error_of(s, 400, &t);
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("request body is empty"),
            "{t}"
        );
    }
    // A content part with a key twice is refused, as a request with a top-level key twice is
    // (the last one was taken: a filter in front could read one text or URL, the model another).
    for part in [
        r#"{"type": "text", "text": "What shape is it?", "text": "What color is the circle?"}"#
            .to_string(),
        format!(
            r#"{{"type": "image_url", "image_url": {{"url": "{square}", "url": "{square}"}}}}"#
        ),
        r#"{"type": "text", "type": "text", "text": "What color?"}"#.to_string(),
    ] {
        let body = format!(
            r#"{{"model": "m", "messages": [{{"role": "user", "content": [{part},
                {{"type": "image_url", "image_url": {{"url": "{square}"}}}}]}}]}}"#
        );
        let (s, _, t) = post(url, &body, key);
        let e = error_of(s, 400, &t);
        assert!(
            e["message"].as_str().unwrap().contains("duplicate field"),
            "{part}: {t}"
        );
    }
    // A request body followed by more data is refused.
    let (s, _, t) = post(url, &format!("{good} {good}"), key);
    assert!(
        error_of(s, 400, &t)["message"]
            .as_str()
            .unwrap()
            .contains("more data after the request object"),
        "{t}"
    );

    // 400s, each naming what is wrong.
    let cases: Vec<(Value, &str, &str)> = vec![
        (json!("not an object"), "", "must be a JSON object"),
        (json!([1, 2]), "", "must be a JSON object"),
        (
            json!({"messages": [{"role": "user", "content": 5}]}),
            "messages[0].content",
            "a string or a list of content parts",
        ),
        (json!({"messages": "hi"}), "messages", "invalid type"),
        (json!({"messages": [], "frobnicate": 1}), "", "frobnicate"),
        (
            request("data:image/png;base64,!!!", "What?"),
            "messages[0].content[1].image_url.url",
            "base64",
        ),
        (
            request(
                &format!(
                    "data:image/png;base64,{}",
                    base64::engine::general_purpose::STANDARD.encode(b"not an image at all")
                ),
                "What?",
            ),
            "messages[0].content[1].image_url.url",
            "supported format",
        ),
        (
            request("http://127.0.0.1/cat.png", "What?"),
            "messages[0].content[1].image_url.url",
            "--allow-remote-images",
        ),
        (
            request("/etc/passwd", "What?"),
            "messages[0].content[1].image_url.url",
            "local paths are never read",
        ),
        (
            request(&square, &"circle ".repeat(200)),
            "messages",
            "--max-question-tokens",
        ),
        (
            json!({"messages": [{"role": "user", "content": "What color?"}]}),
            "messages[0].content",
            "no image",
        ),
        (
            request(&square, "\u{200B}\u{FEFF} "),
            "messages[0].content",
            "invisible characters",
        ),
        (
            request(&square, "\u{180E}\u{1b}"),
            "messages[0].content",
            "invisible characters",
        ),
        (
            {
                let mut v = good.clone();
                v["n"] = 2.into();
                v
            },
            "n",
            "not supported",
        ),
        (
            {
                let mut v = good.clone();
                v["max_tokens"] = 0.into();
                v
            },
            "max_tokens",
            "at least 1",
        ),
        (
            // Not passed over because the other limit is given too.
            {
                let mut v = good.clone();
                v["max_tokens"] = 0.into();
                v["max_completion_tokens"] = 3.into();
                v
            },
            "max_tokens",
            "at least 1",
        ),
        (
            {
                let mut v = good.clone();
                v["top_logprobs"] = 2.into();
                v
            },
            "top_logprobs",
            "`bella` object",
        ),
        (
            {
                let mut v = good.clone();
                v["stop"] = json!(["a", "b", "c", "d", "e"]);
                v
            },
            "stop",
            "at most 4",
        ),
        (
            {
                let mut v = good.clone();
                v["temperature"] = 1e308.into();
                v
            },
            "temperature",
            "between 0 and 2, not 1e308",
        ),
        (
            {
                let mut v = good.clone();
                v["seed"] = serde_json::from_str::<Value>("1180591620717411303424").unwrap();
                v
            },
            "seed",
            "whole number from 0 to 18446744073709551615",
        ),
    ];
    // Too long an input has OpenAI's code, which front ends look for to trim the history.
    let (s, _, t) = post(
        url,
        &request(&square, &"circle ".repeat(200)).to_string(),
        key,
    );
    assert_eq!(error_of(s, 400, &t)["code"], "context_length_exceeded");
    // An image URL that is none (50 KB of "A"): the error does not quote all of it back.
    let mut bare = good.clone();
    bare["messages"][0]["content"][1]["image_url"] = "A".repeat(50_000).into();
    let (s, _, t) = post(url, &bare.to_string(), key);
    error_of(s, 400, &t);
    assert!(t.len() < 2_000, "{} bytes", t.len());
    for (body, param, needle) in cases {
        let (s, _, t) = post(url, &body.to_string(), key);
        let e = error_of(s, 400, &t);
        if !param.is_empty() {
            assert_eq!(e["param"], param, "{t}");
        }
        assert!(
            e["message"].as_str().unwrap().contains(needle),
            "{needle}: {t}"
        );
        assert_eq!(e["type"], "invalid_request_error", "{t}");
    }
    // Malformed JSON.
    let (s, _, t) = post(url, "{\"messages\": [", key);
    let e = error_of(s, 400, &t);
    assert!(
        e["message"].as_str().unwrap().contains("invalid JSON"),
        "{t}"
    );

    // A compressed body: 415, said as such (it read as malformed JSON).
    let mut r = agent()
        .post(&format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("content-encoding", "identity")
        .header("content-encoding", "gzip")
        .header("authorization", "Bearer sesame")
        .send(&[0x1f_u8, 0x8b, 8, 0, 0, 0, 0, 0][..])
        .expect("POST");
    let status = r.status().as_u16();
    let t = r.body_mut().read_to_string().unwrap();
    let e = error_of(status, 415, &t);
    assert_eq!(e["code"], "unsupported_content_encoding");
    assert!(e["message"].as_str().unwrap().contains("gzip"), "{t}");

    // An image over --max-image-pixels (64×48 against 40×40): 413, as for an image over the
    // image memory.
    let photo = request(
        &data_url(&common::fixture("images/photo.png")),
        "What is it?",
    );
    let (s, _, t) = post(url, &photo.to_string(), key);
    let e = error_of(s, 413, &t);
    assert!(e["message"].as_str().unwrap().contains("too large"), "{t}");
    assert_eq!(e["code"], "image_too_large");

    server.stop().expect("clean stop");
}

#[test]
fn concurrent_requests_are_all_answered_in_batches() {
    let server = Server::demo(ServeOptions {
        max_batch: 8,
        ..ServeOptions::default()
    });
    server.wait_ready();
    let images = [
        "red-circle.png",
        "two-blue-squares.png",
        "three-shapes.png",
        "photo-cat.png",
    ];
    let questions = ["What color is the circle?", "How many shapes are there?"];
    let bodies: Vec<String> = images
        .iter()
        .flat_map(|i| questions.iter().map(move |q| (i, q)))
        .map(|(i, q)| request(&data_url(&demo_image(i)), q).to_string())
        .collect();
    // One at a time first, then all 16 at once (twice each).
    let alone: Vec<Value> = bodies
        .iter()
        .map(|b| {
            let (s, _, t) = post(&server.url, b, None);
            assert_eq!(s, 200, "{t}");
            serde_json::from_str(&t).unwrap()
        })
        .collect();
    let threads: Vec<_> = bodies
        .iter()
        .chain(bodies.iter())
        .cloned()
        .map(|b| {
            let url = server.url.clone();
            std::thread::spawn(move || post(&url, &b, None))
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let (s, _, text) = t.join().expect("client thread");
        assert_eq!(s, 200, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let a = &alone[i % bodies.len()];
        assert_eq!(v["bella"]["answer"], a["bella"]["answer"]);
        assert_eq!(v["bella"]["abstained"], a["bella"]["abstained"]);
        let (x, y) = (
            v["bella"]["confidence"].as_f64().unwrap(),
            a["bella"]["confidence"].as_f64().unwrap(),
        );
        assert!((x - y).abs() < 1e-4, "{x} vs {y}");
    }
    // Some of them were answered together.
    let (_, metrics) = get(&format!("{}/metrics", server.url));
    let line = metrics
        .lines()
        .find(|l| l.starts_with("bella_batch_size_bucket{le=\"1.0\"}"))
        .expect("batch size histogram");
    let single: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    let count: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("bella_batch_size_count "))
        .expect("batch count")
        .parse()
        .unwrap();
    assert!(
        single < count,
        "no batch held more than one question:\n{metrics}"
    );
    server.stop().expect("clean stop");
}

#[test]
fn a_full_queue_answers_503_and_a_deadline_504() {
    // A queue of one and a worker that takes one question at a time: a burst overflows it.
    let server = Server::demo(ServeOptions {
        max_batch: 1,
        queue: 1,
        ..ServeOptions::default()
    });
    server.wait_ready();
    let body = request(
        &data_url(&demo_image("photo-cat.png")),
        "What color is the circle?",
    )
    .to_string();
    let threads: Vec<_> = (0..12)
        .map(|_| {
            let (url, body) = (server.url.clone(), body.clone());
            std::thread::spawn(move || post(&url, &body, None))
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let busy: Vec<_> = results.iter().filter(|r| r.0 == 503).collect();
    assert!(results.iter().any(|r| r.0 == 200));
    assert!(!busy.is_empty(), "no request was refused with 503");
    for (s, retry, t) in busy {
        let e = error_of(*s, 503, t);
        assert_eq!(e["code"], "overloaded");
        assert_eq!(retry.as_deref(), Some("1"));
    }
    assert!(results.iter().all(|r| r.0 == 200 || r.0 == 503));
    server.stop().expect("clean stop");

    // A deadline nobody can meet.
    let server = Server::demo(ServeOptions {
        timeout: Duration::from_millis(1),
        ..ServeOptions::default()
    });
    server.wait_ready();
    let (s, _, t) = post(&server.url, &body, None);
    assert_eq!(error_of(s, 504, &t)["code"], "timeout");
    server.stop().expect("clean stop");
}

#[test]
fn big_images_in_flight_are_bounded_and_stalled_or_oversized_bodies_get_their_answer() {
    use std::io::{Read, Write};
    let server = Server::demo(ServeOptions {
        max_image_memory_bytes: 1 << 20,
        timeout: Duration::from_secs(3),
        ..ServeOptions::default()
    });
    server.wait_ready();
    // A red PNG of w × h pixels, asked about.
    let post_image = |w: u32, h: u32| {
        let file = tempfile::Builder::new().suffix(".png").tempfile().unwrap();
        image::RgbImage::from_pixel(w, h, image::Rgb([200, 30, 30]))
            .save(file.path())
            .unwrap();
        post(
            &server.url,
            &request(&data_url(file.path()), "What color is the circle?").to_string(),
            None,
        )
    };
    // 1000 × 1000 pixels are 3 MB as 8-bit RGB, more than all of the 1 MiB bound: no retry
    // can help, so 413, named (not 503 with Retry-After).
    let (s, retry, t) = post_image(1000, 1000);
    let e = error_of(s, 413, &t);
    assert_eq!(e["code"], "image_too_large");
    assert!(
        e["message"].as_str().unwrap().contains("image memory"),
        "{e}"
    );
    assert_eq!(retry, None);
    // A thin image of a few kilobytes whose square would be 3 MB: padded and resized row by
    // row, the square is never held, and it is answered.
    let (s, _, t) = post_image(1000, 4);
    assert_eq!(s, 200, "{t}");
    // 350 × 350 pixels: 0.86 MiB at the 7 bytes a pixel once counted, but the decoded RGB
    // and the processor's copy of it and its steps hold more than the 1 MiB bound.
    let (s, _, t) = post_image(350, 350);
    assert_eq!(error_of(s, 413, &t)["code"], "image_too_large");
    // Decoding is counted in the image's own depth: a 400 × 250 8-bit RGB photograph fits
    // (1.05 MiB at the 11 bytes a pixel once counted for any image); 16-bit RGBA stored a
    // quarter turned holds 16 bytes a pixel while it is turned upright: 260 × 260 of them are
    // 1.03 MiB (0.71 MiB at 11).
    let (s, _, t) = post_image(400, 250);
    assert_eq!(s, 200, "{t}");
    // A PNG given as its bytes, asked about.
    let post_png = |png: &[u8]| {
        let url = format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(png)
        );
        post(
            &server.url,
            &request(&url, "What color is the circle?").to_string(),
            None,
        )
    };
    let (s, _, t) = post_png(&common::png_of(
        image::ExtendedColorType::Rgba16,
        (260, 260),
        6,
    ));
    assert_eq!(error_of(s, 413, &t)["code"], "image_too_large");
    // Decided from the header, before decoding: a PNG whose header says 2000×2000 and whose
    // pixel data is cut off gets its 413, not a decoding error; so does a 30000×10 strip
    // (0.3 Mpixel, 3.3 MB held while decoded).
    for (w, h) in [(2000u32, 2000u32), (30_000, 10)] {
        let mut png = Vec::new();
        image::RgbImage::new(2, 2)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        png[16..20].copy_from_slice(&w.to_be_bytes());
        png[20..24].copy_from_slice(&h.to_be_bytes());
        let crc = common::crc32(&png[12..29]);
        png[29..33].copy_from_slice(&crc.to_be_bytes());
        let (s, _, t) = post_png(&png);
        assert_eq!(error_of(s, 413, &t)["code"], "image_too_large", "{w}×{h}");
    }
    // A BMP whose header says 100000 × 100000 (top-down: a negative height), which the BMP
    // decoder refuses as an error of its own, is too large as well, not "corrupt".
    let mut bmp = Vec::new();
    image::RgbImage::new(2, 2)
        .write_to(&mut std::io::Cursor::new(&mut bmp), image::ImageFormat::Bmp)
        .unwrap();
    bmp[18..22].copy_from_slice(&100_000i32.to_le_bytes());
    bmp[22..26].copy_from_slice(&(-100_000i32).to_le_bytes());
    let url = format!(
        "data:image/bmp;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&bmp)
    );
    let (s, _, t) = post(
        &server.url,
        &request(&url, "What color is the circle?").to_string(),
        None,
    );
    let e = error_of(s, 413, &t);
    assert!(
        e["message"].as_str().unwrap().contains("100000×100000"),
        "{e}"
    );
    // A small image is answered.
    let (s, _, t) = post(
        &server.url,
        &request(
            &data_url(&demo_image("red-circle.png")),
            "What color is the circle?",
        )
        .to_string(),
        None,
    );
    assert_eq!(s, 200, "{t}");
    // A client that announces a body and stops sending gets 408 at the deadline, not silence.
    let addr = server.url.trim_start_matches("http://");
    let head = |text: String, wait: u64| -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(wait)))?;
        stream.write_all(text.as_bytes())?;
        let mut reply = [0u8; 64];
        let n = stream.read(&mut reply)?;
        Ok(String::from_utf8_lossy(&reply[..n]).into_owned())
    };
    let post_head = |length: u64| {
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        )
    };
    let reply = head(post_head(50) + "{\"a\":", 20).expect("an answer before the read timeout");
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    // A body announced larger than the limit is refused at once (413), not waited for.
    let reply = head(post_head(999_999_999_999) + "{}", 2).expect("an answer at once");
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    // Headers that never end: the connection is closed a little after the deadline (3 + 5 s),
    // not held forever (an empty reply: closed without an answer).
    let started = std::time::Instant::now();
    let stalled = format!("POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\n");
    match head(stalled, 30) {
        Ok(reply) => assert!(reply.is_empty(), "{reply}"),
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the stalled connection is still open: {e}"
        ),
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    server.stop().expect("clean stop");
}

#[test]
fn health_follows_loading_and_a_failed_load_stops_the_server() {
    let (go_tx, go_rx) = std_mpsc::channel::<()>();
    let server = Server::start(ServeOptions::default(), move || {
        go_rx.recv()?;
        BellaVqa::load(
            &ModelSource::Dir(common::fixture("llava-tiny-hub")),
            None,
            &LoadOptions::default(),
        )
    });
    let (s, t) = get(&format!("{}/health", server.url));
    assert_eq!(s, 503, "{t}");
    assert!(t.contains("loading"), "{t}");
    let body = request(&data_url(&common::fixture("images/square.png")), "What?").to_string();
    let (s, retry, t) = post(&server.url, &body, None);
    error_of(s, 503, &t);
    assert!(retry.is_some());
    go_tx.send(()).unwrap();
    server.wait_ready();
    assert_eq!(post(&server.url, &body, None).0, 200);
    server.stop().expect("clean stop");

    let server = Server::start(ServeOptions::default(), || {
        anyhow::bail!("no weights in /nowhere")
    });
    let err = server.stop().expect_err("the load error is returned");
    assert!(format!("{err:#}").contains("/nowhere"), "{err:#}");
}

#[cfg(unix)]
#[test]
fn sigterm_finishes_requests_in_flight_and_exits_cleanly() {
    let (mut child, lines, url) = serve_process(&["--max-batch", "1"]);
    // A path of 5 000 characters is logged cut short.
    let long = format!("/{}", "a".repeat(4999));
    assert_eq!(get(&format!("{url}{long}")).0, 404);
    let body = request(
        &data_url(&demo_image("photo-cat.png")),
        "What color is the circle?",
    )
    .to_string();
    // Several requests in flight, then SIGTERM: all of them are answered.
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            std::thread::spawn(move || post(&url, &body, None))
        })
        .collect();
    // And an upload that stalls: it has cost nothing, so it is refused, not waited for.
    let stalled = {
        use std::io::Write;
        let mut stream = announce_body(url.trim_start_matches("http://"), 1000);
        stream.write_all(b"{").unwrap();
        stream
    };
    // And a request whose headers stall: closed after the drain's grace, not waited for until
    // the idle limit (--timeout-secs 120 + 5 s held the stop that long).
    let mut headers_stalled = {
        use std::io::Write;
        let mut stream = connect(url.trim_start_matches("http://"));
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        write!(stream, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n").unwrap();
        stream
    };
    std::thread::sleep(Duration::from_millis(300));
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let signalled = std::time::Instant::now();
    let mut stalled = stalled;
    let mut reply = [0u8; 64];
    let n = std::io::Read::read(&mut stalled, &mut reply).expect("refused within seconds");
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    let statuses: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap().0).collect();
    // Answered, or refused cleanly if one arrived after the signal; never cut off.
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 503),
        "{statuses:?}"
    );
    assert!(statuses.contains(&200), "{statuses:?}");
    let mut nothing = Vec::new();
    let closed = std::io::Read::read_to_end(&mut headers_stalled, &mut nothing);
    assert!(
        closed.is_ok() && nothing.is_empty(),
        "{closed:?} {nothing:?}"
    );
    let status = child.wait().expect("exit");
    assert!(status.success(), "{status}");
    let waited = signalled.elapsed();
    assert!(
        waited < bella_vqa::serve::DRAIN_GRACE + Duration::from_secs(30),
        "the stop took {waited:?}"
    );
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(!rest.iter().any(|l| l.contains("panicked")), "{rest:?}");
    // Each request was logged with its status and time.
    assert!(
        rest.iter()
            .any(|l| l.starts_with("POST /v1/chat/completions 200 ") && l.ends_with(" ms")),
        "{rest:?}"
    );
    let logged = rest
        .iter()
        .find(|l| l.starts_with("GET /aaa"))
        .expect("the long path's line");
    assert!(
        logged.contains(&format!("{}… (5000 bytes) 404 ", &long[..200])) && logged.len() < 300,
        "{logged}"
    );
}

/// `--host` takes a host name as well as an address: `localhost` listens on loopback.
#[cfg(unix)]
#[test]
fn serve_listens_on_a_host_name() {
    let (child, lines, url) = serve_process(&["--host", "localhost"]);
    assert!(
        url.starts_with("http://127.0.0.1:") || url.starts_with("http://[::1]:"),
        "{url}"
    );
    let (status, _, text) = post(
        &url,
        &request(
            &data_url(&demo_image("red-circle.png")),
            "What color is the circle?",
        )
        .to_string(),
        None,
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(chat_statuses_at_exit(child, lines), ["200"]);
}

/// A second signal stops at once, with the shell's status for it (143 after SIGTERM, 130 after
/// Ctrl-C, 129 after SIGHUP), as train and bench do.
#[cfg(unix)]
#[test]
fn a_second_signal_stops_serve_at_once_with_its_status() {
    // SIGHUP (the terminal or SSH session that started it closed) stops it gracefully too.
    for (signal, code) in [("-TERM", 143), ("-INT", 130), ("-HUP", 129)] {
        let (mut child, mut lines, url) = serve_process(&[]);
        // A connection whose first request's headers stall keeps the graceful stop waiting
        // (after an answered request, the connection would count as idle and close at once).
        let _stalled = {
            use std::io::Write;
            let mut stream = connect(url.trim_start_matches("http://"));
            write!(stream, "GET /health HTTP/1.1\r\n").unwrap();
            stream
        };
        std::thread::sleep(Duration::from_millis(300));
        let kill = |what: &str| {
            let killed = Command::new("kill")
                .args([what, &child.id().to_string()])
                .status()
                .expect("kill");
            assert!(killed.success());
        };
        kill(signal);
        // Once the first one is taken in.
        while !lines
            .next()
            .expect("a line")
            .expect("stderr")
            .starts_with("stopping")
        {}
        kill(signal);
        let status = child.wait().expect("exit");
        assert_eq!(status.code(), Some(code), "{signal}: {status}");
    }
}

/// A request whose client leaves before its answer, or in the middle of its stream, is in the
/// access log as 499, as /metrics counts it; a whole stream as 200 once it ends.
#[cfg(unix)]
#[test]
fn the_access_log_writes_a_client_that_left_as_499() {
    use std::io::Read;
    let (child, lines, url) = serve_process(&["--max-batch", "1"]);
    let addr = url.trim_start_matches("http://");
    let image = data_url(&demo_image("photo-cat.png"));
    let send = |stream: bool| {
        let mut body = request(&image, "What color is the circle?");
        body["stream"] = json!(stream);
        send_chat(addr, &body.to_string())
    };
    // Requests ahead in the queue (one a batch): the next ones wait for their answers.
    let ahead: Vec<_> = (0..4)
        .map(|_| {
            let body = request(&image, "What color is the circle?").to_string();
            let url = url.clone();
            std::thread::spawn(move || post(&url, &body, None).0)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // Gone before the answer.
    drop(send(false));
    // Gone after the stream's first chunk.
    let mut first = [0u8; 256];
    let mut conn = send(true);
    let n = conn.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    drop(conn);
    for request in ahead {
        assert_eq!(request.join().unwrap(), 200);
    }
    // A whole stream.
    let mut conn = send(true);
    let mut whole = Vec::new();
    conn.read_to_end(&mut whole).unwrap();
    let whole = String::from_utf8_lossy(&whole);
    assert!(whole.contains("data: [DONE]"), "{whole}");
    drop(conn);
    let mut statuses = chat_statuses_at_exit(child, lines);
    statuses.sort();
    assert_eq!(statuses, [["200"; 5].as_slice(), &["499"; 2]].concat());
}

/// A demo server answering one question at a time, slowly (every layer waits 200 ms: an answer
/// takes seconds, time for its client to go), and a question's body for it.
fn slow_server() -> (
    std::process::Child,
    std::io::Lines<BufReader<std::process::ChildStderr>>,
    String,
    String,
) {
    let (child, lines, url) = serve_process_with(
        &[(bella_vqa::cancel::CHECK_DELAY_ENV, "200")],
        &["--max-batch", "1"],
    );
    let body = request(
        &data_url(&demo_image("red-circle.png")),
        "What color is the circle?",
    )
    .to_string();
    (child, lines, url, body)
}

/// The server's /metrics once they contain `wanted` (or after 30 s, to fail on).
fn metrics_once(url: &str, wanted: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, metrics) = get(&format!("{url}/metrics"));
        if metrics.contains(wanted) || std::time::Instant::now() > deadline {
            return metrics;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_question_whose_client_leaves_stops_computing_and_the_next_is_answered() {
    let (child, lines, url, body) = slow_server();
    let conn = send_chat(url.trim_start_matches("http://"), &body);
    std::thread::sleep(Duration::from_millis(600));
    drop(conn);
    // The worker stops at its next layer and says so in /metrics.
    let cancelled = metrics_once(&url, "bella_cancelled_total 1");
    assert!(cancelled.contains("bella_cancelled_total 1"), "{cancelled}");
    assert!(cancelled.contains("bella_answers_total 0"), "{cancelled}");
    // The model answers the next question as before.
    let (status, _, text) = post(&url, &body, None);
    assert_eq!(status, 200, "{text}");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["choices"][0]["message"]["content"], "red");
    assert_eq!(chat_statuses_at_exit(child, lines), ["499", "200"]);
}

/// A client that sent bytes after its request (a stray CRLF, a pipelined request) and then
/// closed the connection: hyper does not read them while the request is answered, so only the
/// watched socket says the client left; the question stops as any other and is logged 499.
#[test]
fn a_client_that_sent_more_after_its_request_and_left_stops_its_answer_too() {
    use std::io::Write;
    let (child, lines, url, body) = slow_server();
    let addr = url.trim_start_matches("http://");
    let pipelined = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    for (n, more) in ["\r\n", pipelined.as_str()].into_iter().enumerate() {
        let mut conn = send_chat(addr, &body);
        conn.write_all(more.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(600));
        drop(conn);
        let stopped = format!("bella_cancelled_total {}", n + 1);
        let metrics = metrics_once(&url, &stopped);
        assert!(metrics.contains(&stopped), "after {more:?}: {metrics}");
        assert!(metrics.contains("bella_answers_total 0"), "{metrics}");
    }
    assert_eq!(chat_statuses_at_exit(child, lines), ["499", "499"]);
}

/// Such a client that leaves while its question waits behind another is answered 499 too (the
/// worker dropped the question, which read as a server error, 500), and the other is answered.
#[test]
fn a_client_that_sent_more_and_left_while_queued_is_a_499() {
    use std::io::{Read, Write};
    let (child, lines, url, body) = slow_server();
    let addr = url.trim_start_matches("http://");
    let mut answered = send_chat(addr, &body);
    std::thread::sleep(Duration::from_millis(300));
    let mut queued = send_chat(addr, &body);
    queued.write_all(b"\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    drop(queued);
    let mut whole = String::new();
    answered.read_to_string(&mut whole).unwrap();
    assert!(whole.starts_with("HTTP/1.1 200"), "{whole}");
    let (_, metrics) = get(&format!("{url}/metrics"));
    assert!(!metrics.contains("status=\"500\""), "{metrics}");
    let mut statuses = chat_statuses_at_exit(child, lines);
    statuses.sort();
    assert_eq!(statuses, ["200", "499"]);
}

/// A stream whose answer missed its deadline ends with an error event after the headers' 200:
/// the access log writes it as /metrics counts it, 504.
#[test]
fn a_stream_past_its_deadline_is_logged_as_504() {
    use std::io::Read;
    let (child, lines, url) = serve_process_with(
        &[(bella_vqa::cancel::CHECK_DELAY_ENV, "500")],
        &["--timeout-secs", "1"],
    );
    let mut body = request(
        &data_url(&demo_image("red-circle.png")),
        "What color is the circle?",
    );
    body["stream"] = json!(true);
    let mut conn = send_chat(url.trim_start_matches("http://"), &body.to_string());
    let mut whole = Vec::new();
    conn.read_to_end(&mut whole).unwrap();
    let whole = String::from_utf8_lossy(&whole);
    assert!(whole.starts_with("HTTP/1.1 200"), "{whole}");
    assert!(whole.contains("\"timeout\""), "{whole}");
    let (_, metrics) = get(&format!("{url}/metrics"));
    assert!(
        metrics.contains("bella_chat_requests_total{status=\"504\"} 1"),
        "{metrics}"
    );
    assert_eq!(chat_statuses_at_exit(child, lines), ["504"]);
}

/// A question whose client left while it waited gives its share of the image memory back to
/// the next question, which is answered instead of refused as busy.
#[test]
fn a_waiting_question_whose_client_left_frees_its_image_memory() {
    let (child, lines, url) = serve_process_with(
        &[(bella_vqa::cancel::CHECK_DELAY_ENV, "200")],
        &["--max-batch", "1", "--max-image-memory-mb", "1"],
    );
    let addr = url.trim_start_matches("http://");
    // 200×200 pixels: about half of the 1 MiB each while decoded.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.png");
    image::RgbImage::from_pixel(200, 200, image::Rgb([200, 30, 30]))
        .save(&path)
        .unwrap();
    let mut body = request(&data_url(&path), "What color is the circle?");
    body["max_tokens"] = json!(2);
    let body = body.to_string();
    // One answered (its image held until it is done), one waiting whose client then leaves.
    let answered = send_chat(addr, &body);
    std::thread::sleep(Duration::from_millis(300));
    let waiting = send_chat(addr, &body);
    std::thread::sleep(Duration::from_millis(300));
    drop(waiting);
    std::thread::sleep(Duration::from_millis(100));
    let (status, _, text) = post(&url, &body, None);
    assert_eq!(status, 200, "{text}");
    let mut first = String::new();
    BufReader::new(answered).read_line(&mut first).unwrap();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert_eq!(chat_statuses_at_exit(child, lines), ["499", "200", "200"]);
}

#[test]
fn cors_lets_the_named_origins_call_the_api_and_no_other() {
    use std::io::{Read, Write};
    let fixture = common::fixture("llava-tiny-hub");
    let server = Server::start(
        ServeOptions {
            cors_origins: vec!["http://localhost:3000".into()],
            ..ServeOptions::default()
        },
        move || BellaVqa::load(&ModelSource::Dir(fixture), None, &LoadOptions::default()),
    );
    server.wait_ready();
    let addr = server.url.trim_start_matches("http://").to_string();
    let preflight = |origin: &str| -> String {
        let mut stream = connect(&addr);
        write!(
            stream,
            "OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nOrigin: {origin}\r\n\
             Access-Control-Request-Method: POST\r\n\
             Access-Control-Request-Headers: content-type,authorization,x-stainless-lang\r\n\
             Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        let _ = stream.read_to_string(&mut reply);
        reply.to_ascii_lowercase()
    };
    let allowed = preflight("http://localhost:3000");
    assert!(allowed.starts_with("http/1.1 200"), "{allowed}");
    assert!(
        allowed.contains("access-control-allow-origin: http://localhost:3000"),
        "{allowed}"
    );
    // Whatever headers the client sends (the openai JS SDK adds x-stainless-*) are allowed.
    assert!(
        allowed.contains("authorization") && allowed.contains("x-stainless-lang"),
        "{allowed}"
    );
    let other = preflight("http://evil.example");
    assert!(!other.contains("access-control-allow-origin"), "{other}");
    // A response to the page names Retry-After as readable (a 503's wait).
    let addr = server.url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET /health HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://localhost:3000\r\n\
         Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    assert!(
        reply
            .to_ascii_lowercase()
            .contains("access-control-expose-headers: retry-after"),
        "{reply}"
    );
    server.stop().expect("clean stop");
    // An origin no browser sends is refused at start.
    for bad in ["http://localhost:3000/", "localhost:3000", ""] {
        let opts = ServeOptions {
            cors_origins: vec![bad.into()],
            ..ServeOptions::default()
        };
        let err = bella_vqa::serve::run(opts, || anyhow::bail!("not loaded")).unwrap_err();
        assert!(
            format!("{err:#}").contains("--cors-origin"),
            "{bad:?}: {err:#}"
        );
    }
}

#[test]
fn the_answer_limit_holds_without_max_tokens_and_a_hub_style_name_is_served() {
    let fixture = common::fixture("llava-tiny-hub");
    let server = Server::start(
        ServeOptions {
            model_name: "org/tiny".into(),
            max_new_tokens_limit: 2,
            ..ServeOptions::default()
        },
        move || BellaVqa::load(&ModelSource::Dir(fixture), None, &LoadOptions::default()),
    );
    server.wait_ready();
    let square = data_url(&common::fixture("images/square.png"));
    let (s, _, t) = post(
        &server.url,
        &request(&square, "What color is the circle?").to_string(),
        None,
    );
    assert_eq!(s, 200, "{t}");
    let v: Value = serde_json::from_str(&t).unwrap();
    // One particle (the base model), at most 2 tokens though the default is 16.
    assert!(v["bella"]["generated_tokens"].as_u64().unwrap() <= 2, "{v}");
    // Random weights never say they are done: cut at the limit.
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    // A stop sequence that cuts the text ends it: "stop", as OpenAI reports it.
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    let first = content.chars().next().expect("some text").to_string();
    let mut body = request(&square, "What color is the circle?");
    body["stop"] = json!([first]);
    let (s, _, t) = post(&server.url, &body.to_string(), None);
    assert_eq!(s, 200, "{t}");
    let v: Value = serde_json::from_str(&t).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "", "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let (s, t) = get(&format!("{}/v1/models/org/tiny", server.url));
    assert_eq!(s, 200, "{t}");
    assert_eq!(serde_json::from_str::<Value>(&t).unwrap()["id"], "org/tiny");
    server.stop().expect("clean stop");
}

/// The bodies of the requests in flight are bounded in all (`--max-body-memory-mb`): clients
/// that each hold a large body open cannot make the server hold them all; but bytes only
/// announced hold nothing, so silent clients cannot lock the others out.
#[test]
fn bodies_in_flight_are_bounded_in_all() {
    use std::io::{Read, Write};
    let server = Server::demo(ServeOptions {
        max_body_bytes: 1 << 20,
        max_body_memory_bytes: 3 << 20,
        timeout: Duration::from_secs(20),
        ..ServeOptions::default()
    });
    server.wait_ready();
    let addr = server.url.trim_start_matches("http://").to_string();
    // A body of 1 MiB announced, `sent` bytes of it sent (the rest never comes).
    let open = |sent: usize| {
        let mut stream = announce_body(&addr, 1 << 20);
        stream.write_all(&vec![b' '; sent]).unwrap();
        stream
    };
    let image = data_url(&demo_image("red-circle.png"));
    let ask = || {
        post(
            &server.url,
            &request(&image, "What color is the circle?").to_string(),
            None,
        )
    };
    // Ten clients that announce 1 MiB each (10 MiB against a budget of 3) and send nothing.
    let silent: Vec<_> = (0..10).map(|_| open(0)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let (s, _, t) = ask();
    assert_eq!(s, 200, "{t}");
    drop(silent);
    // Three bodies of all but their last byte: the budget is full.
    let held: Vec<_> = (0..3).map(|_| open((1 << 20) - 1)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut fourth = open(4096);
    let mut reply = [0u8; 1024];
    let n = fourth.read(&mut reply).expect("an answer at once");
    let reply = String::from_utf8_lossy(&reply[..n]).to_lowercase();
    assert!(reply.starts_with("http/1.1 503"), "{reply}");
    // The rest of its body is never read: the client's pool must not reuse the connection.
    assert!(reply.contains("\r\nconnection: close\r\n"), "{reply}");
    // Once the held clients leave, a request is answered again (here with an image sent as
    // application/octet-stream, which some clients label any file with).
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let url = data_url(&demo_image("red-circle.png")).replacen(
        "image/png",
        "application/octet-stream",
        1,
    );
    let (s, _, t) = post(
        &server.url,
        &request(&url, "What color is the circle?").to_string(),
        None,
    );
    assert_eq!(s, 200, "{t}");
    server.stop().expect("clean stop");
}
