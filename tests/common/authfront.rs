//! A GHCR-style token-auth front for tests: an HTTP server on 127.0.0.1 that stands in front of
//! a real (open) registry and demands a bearer token.
//!
//! ```ignore
//! let front = AuthFront::start(&reg.host(), "tok-5f1c");
//! // bootsync's config: `[[registry]] host = front.host(), insecure = true`,
//! // reference `front.host()/REPO:TAG`.
//! front.expire();                       // every token issued so far stops working
//! let fetches = front.token_requests();  // what the realm endpoint saw
//! ```
//!
//! `/v2/...` requests without a valid `Authorization: Bearer <token>` get a 401 with
//! `WWW-Authenticate: Bearer realm="http://HOST/token",service="bootsync-test",scope=...`; valid
//! ones are forwarded to the registry (one upstream request each, answered with
//! `Connection: close`). `GET /token?scope=...&service=...` issues a new token each time
//! (`<prefix>-<n>`), unless told to refuse or to insist on Basic credentials. With
//! [`AuthFront::start_static`] only one fixed token is accepted and none is ever issued (a
//! `token_file` credential).
//!
//! Every request is logged with its `Authorization` header and the status sent. Everything is
//! bounded: socket timeouts, one request per connection, and dropping the front stops the
//! accept loop and joins every thread.

use super::http;
use base64::Engine as _;
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const SERVICE: &str = "bootsync-test";
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Request bodies larger than this are cut (the tests push small manifests and blobs).
const MAX_BODY: u64 = 64 << 20;

/// Where a request went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `GET /token...`: the realm.
    Token,
    /// `/v2/...`: the registry API.
    Registry,
    Other,
}

/// One request the front answered.
#[derive(Debug, Clone)]
pub struct FrontRequest {
    pub seq: usize,
    pub kind: Kind,
    pub method: String,
    /// Path and query as sent.
    pub path: String,
    /// The request's `Authorization` header.
    pub authorization: Option<String>,
    /// The status sent back (0: none).
    pub status: u16,
    /// The token issued by this request (token endpoint only).
    pub issued: Option<String>,
    pub at: Instant,
}

impl FrontRequest {
    /// The value of query parameter `name` (percent-decoded).
    pub fn query(&self, name: &str) -> Option<String> {
        let (_, q) = self.path.split_once('?')?;
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then(|| percent_decode(v))
        })
    }

    /// The bearer token the request carried.
    pub fn bearer(&self) -> Option<&str> {
        self.authorization.as_deref()?.strip_prefix("Bearer ")
    }
}

impl std::fmt::Display for FrontRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "#{} {:?} {} {} auth={} -> {}{}",
            self.seq,
            self.kind,
            self.method,
            self.path,
            self.authorization.as_deref().unwrap_or("-"),
            self.status,
            self.issued
                .as_deref()
                .map(|t| format!(" issued {t}"))
                .unwrap_or_default()
        )
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct State {
    /// Tokens that open `/v2/`.
    valid: HashSet<String>,
    /// Issue tokens at `/token` (false: a static token only).
    issuing: bool,
    prefix: String,
    issued: usize,
    /// Refuse token requests with this status.
    refuse: Option<u16>,
    /// Token requests must carry this `Authorization: Basic ...` value.
    basic: Option<String>,
}

struct Shared {
    upstream: String,
    realm: String,
    state: Mutex<State>,
    log: Mutex<Vec<FrontRequest>>,
    stop: AtomicBool,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The front; stops on drop.
pub struct AuthFront {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl AuthFront {
    /// A front that issues tokens `<prefix>-1`, `<prefix>-2`, ... at its realm.
    pub fn start(upstream: &str, prefix: &str) -> AuthFront {
        Self::launch(upstream, prefix, true, HashSet::new())
    }

    /// A front that accepts only `token` and issues none (its realm refuses with 403).
    pub fn start_static(upstream: &str, token: &str) -> AuthFront {
        Self::launch(upstream, "none", false, [token.to_string()].into())
    }

    fn launch(upstream: &str, prefix: &str, issuing: bool, valid: HashSet<String>) -> AuthFront {
        let up: SocketAddr = upstream
            .parse()
            .unwrap_or_else(|e| panic!("auth front upstream {upstream:?}: {e}"));
        assert!(
            up.ip().is_loopback(),
            "the auth front only talks to loopback"
        );
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind auth front on 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream: upstream.to_string(),
            realm: format!("http://{addr}/token"),
            state: Mutex::new(State {
                valid,
                issuing,
                prefix: prefix.to_string(),
                issued: 0,
                refuse: None,
                basic: None,
            }),
            log: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            workers: Mutex::new(Vec::new()),
        });
        let accept = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("auth-front-accept".into())
                .spawn(move || accept_loop(listener, shared))
                .expect("spawn auth front accept thread")
        };
        AuthFront {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// `127.0.0.1:PORT` (use it as the registry host in references).
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT/token`
    pub fn realm(&self) -> String {
        self.shared.realm.clone()
    }

    /// Every token issued so far stops opening `/v2/` (it "expired").
    pub fn expire(&self) {
        lock(&self.shared.state).valid.clear();
    }

    /// From now on only `token` opens `/v2/` (a static token rotated).
    pub fn set_static_token(&self, token: &str) {
        let mut st = lock(&self.shared.state);
        st.valid.clear();
        st.valid.insert(token.to_string());
    }

    /// Token requests get `status` (`None`: issue tokens again).
    pub fn refuse_tokens(&self, status: Option<u16>) {
        lock(&self.shared.state).refuse = status;
    }

    /// Token requests must carry Basic credentials `user:password` (401 otherwise).
    pub fn require_basic(&self, user: &str, password: &str) {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        lock(&self.shared.state).basic = Some(format!("Basic {b64}"));
    }

    /// Tokens issued so far, in order.
    pub fn issued(&self) -> Vec<String> {
        self.log().into_iter().filter_map(|r| r.issued).collect()
    }

    pub fn log(&self) -> Vec<FrontRequest> {
        lock(&self.shared.log).clone()
    }

    pub fn clear_log(&self) {
        lock(&self.shared.log).clear();
    }

    pub fn token_requests(&self) -> Vec<FrontRequest> {
        self.log()
            .into_iter()
            .filter(|r| r.kind == Kind::Token)
            .collect()
    }

    pub fn registry_requests(&self) -> Vec<FrontRequest> {
        self.log()
            .into_iter()
            .filter(|r| r.kind == Kind::Registry)
            .collect()
    }

    /// The log, one request per line (for assertion messages).
    pub fn dump(&self) -> String {
        let lines: Vec<String> = self.log().iter().map(|r| r.to_string()).collect();
        lines.join("\n")
    }
}

impl Drop for AuthFront {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let workers = std::mem::take(&mut *lock(&self.shared.workers));
        for w in workers {
            let _ = w.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        let worker_shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name("auth-front-conn".into())
            .spawn(move || {
                let _ = serve(&worker_shared, &stream);
                let _ = stream.shutdown(Shutdown::Both);
            });
        let mut workers = lock(&shared.workers);
        workers.retain(|w| !w.is_finished());
        if let Ok(w) = spawned {
            workers.push(w);
        }
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// HEAD: send this Content-Length and no body.
    head_length: Option<String>,
}

impl Reply {
    fn new(status: u16, headers: Vec<(String, String)>, body: Vec<u8>) -> Reply {
        Reply {
            status,
            headers,
            body,
            head_length: None,
        }
    }
    fn json(status: u16, body: String) -> Reply {
        Reply::new(
            status,
            vec![("Content-Type".into(), "application/json".into())],
            body.into_bytes(),
        )
    }
}

/// One request per connection.
fn serve(shared: &Shared, stream: &TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(());
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(path)) = (parts.next(), parts.next()) else {
        return Ok(());
    };
    let (method, path) = (method.to_ascii_uppercase(), path.to_string());
    let mut headers: Vec<(String, String)> = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            return Ok(());
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    // The request body, forwarded with the request (pushes: manifests and blob uploads).
    let mut body = Vec::new();
    if let Some(n) = header("content-length").and_then(|v| v.parse::<u64>().ok()) {
        (&mut reader).take(n.min(MAX_BODY)).read_to_end(&mut body)?;
    }
    let authorization = header("authorization");
    let at = Instant::now();
    let seq = {
        let mut log = lock(&shared.log);
        let seq = log.len();
        log.push(FrontRequest {
            seq,
            kind: if path.starts_with("/token") {
                Kind::Token
            } else if path.starts_with("/v2/") {
                Kind::Registry
            } else {
                Kind::Other
            },
            method: method.clone(),
            path: path.clone(),
            authorization: authorization.clone(),
            status: 0,
            issued: None,
            at,
        });
        seq
    };

    let (reply, issued) = if path.starts_with("/token") {
        token(shared, &method, authorization.as_deref())
    } else if path.starts_with("/v2/") {
        (
            registry(
                shared,
                &method,
                &path,
                &header,
                authorization.as_deref(),
                &body,
            ),
            None,
        )
    } else {
        (Reply::json(404, "{}".into()), None)
    };
    {
        let mut log = lock(&shared.log);
        log[seq].status = reply.status;
        log[seq].issued = issued;
    }
    let mut head = format!("HTTP/1.1 {} {}\r\n", reply.status, reason(reply.status));
    for (k, v) in &reply.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let length = match (&reply.head_length, method.as_str()) {
        (Some(len), "HEAD") => len.clone(),
        _ => reply.body.len().to_string(),
    };
    head.push_str(&format!("Content-Length: {length}\r\n"));
    head.push_str("Connection: close\r\n\r\n");
    let mut w = stream;
    w.write_all(head.as_bytes())?;
    if method != "HEAD" {
        w.write_all(&reply.body)?;
    }
    w.flush()
}

fn token(shared: &Shared, method: &str, authorization: Option<&str>) -> (Reply, Option<String>) {
    let mut st = lock(&shared.state);
    if method != "GET" {
        return (Reply::json(405, "{}".into()), None);
    }
    if let Some(status) = st.refuse {
        let body = format!(
            "{{\"errors\":[{{\"code\":\"DENIED\",\"message\":\"token request refused by the test front ({status})\"}}]}}"
        );
        return (Reply::json(status, body), None);
    }
    if let Some(want) = &st.basic {
        if authorization != Some(want.as_str()) {
            let mut r = Reply::json(
                401,
                "{\"errors\":[{\"code\":\"UNAUTHORIZED\",\"message\":\"bad credentials\"}]}".into(),
            );
            r.headers
                .push(("WWW-Authenticate".into(), "Basic realm=\"token\"".into()));
            return (r, None);
        }
    }
    if !st.issuing {
        return (
            Reply::json(403, "{\"errors\":[{\"code\":\"DENIED\"}]}".into()),
            None,
        );
    }
    st.issued += 1;
    let token = format!("{}-{}", st.prefix, st.issued);
    st.valid.insert(token.clone());
    let body = format!("{{\"token\":\"{token}\",\"expires_in\":300}}");
    (Reply::json(200, body), Some(token))
}

fn registry(
    shared: &Shared,
    method: &str,
    path: &str,
    header: &dyn Fn(&str) -> Option<String>,
    authorization: Option<&str>,
    body: &[u8],
) -> Reply {
    let allowed = {
        let st = lock(&shared.state);
        authorization
            .and_then(|a| a.strip_prefix("Bearer "))
            .is_some_and(|t| st.valid.contains(t))
    };
    if !allowed {
        let rest = path.trim_start_matches("/v2/");
        let repo = ["/manifests/", "/blobs/", "/tags/", "/referrers/"]
            .iter()
            .find_map(|m| rest.find(m).map(|i| &rest[..i]));
        let mut challenge = format!("Bearer realm=\"{}\",service=\"{SERVICE}\"", shared.realm);
        if let Some(repo) = repo {
            challenge.push_str(&format!(",scope=\"repository:{repo}:pull\""));
        }
        let mut r = Reply::json(
            401,
            "{\"errors\":[{\"code\":\"UNAUTHORIZED\",\"message\":\"authentication required\"}]}"
                .into(),
        );
        r.headers.push(("WWW-Authenticate".into(), challenge));
        return r;
    }
    let mut fwd: Vec<(&str, String)> = Vec::new();
    for name in ["Accept", "Range", "Content-Type"] {
        if let Some(v) = header(name) {
            fwd.push((name, v));
        }
    }
    let fwd_refs: Vec<(&str, &str)> = fwd.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let url = format!("http://{}{}", shared.upstream, path);
    match http::request(method, &url, &fwd_refs, body, IO_TIMEOUT) {
        Ok(resp) => {
            let head_length = resp.header("content-length").map(str::to_string);
            let headers = resp
                .headers
                .into_iter()
                .filter(|(k, _)| {
                    ![
                        "content-length",
                        "transfer-encoding",
                        "connection",
                        "keep-alive",
                    ]
                    .iter()
                    .any(|h| k.eq_ignore_ascii_case(h))
                })
                .collect();
            Reply {
                status: resp.status,
                headers,
                body: resp.body,
                head_length,
            }
        }
        Err(e) => Reply::json(502, format!("{{\"error\":{:?}}}", e.to_string())),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        307 => "Temporary Redirect",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}
