//! A fault-injecting HTTP/1.1 proxy for tests: sits between bootsync and the real registry on
//! 127.0.0.1, logs every exchange and damages chosen responses.
//!
//! ```ignore
//! let proxy = Proxy::start(&reg.host());
//! // The 1st GET of the layer blob is cut (clean FIN) after 1000 body bytes.
//! proxy.add(Rule::get(&blob_path(REPO, &digest)).nth(1).fault(Fault::CutAfter(1000)));
//! // bootsync's config: `[[registry]] host = proxy.host(), insecure = true`, reference
//! // `proxy.host()/REPO:TAG`.
//! let gets = proxy.exchanges_to(&blob_path(REPO, &digest));
//! ```
//!
//! Design: std threads, one per client connection, and a fresh upstream connection per request
//! (sent with `Connection: close`, so the end of every upstream response is unambiguous; the
//! client side stays keep-alive). Requests and responses are parsed just enough to act per
//! request: request line + headers + body (`Content-Length` or chunked), status line + headers +
//! body (`Content-Length`, chunked, or until EOF). Chunked bodies are decoded and re-chunked, so
//! byte offsets in faults and in the log are always offsets into the decoded body.
//!
//! Everything is bounded: client and upstream sockets have read/write timeouts, a connection
//! lives at most [`MAX_CONNECTION_LIFETIME`], stalls and trickles end when the client hangs up or
//! the proxy stops, and dropping the [`Proxy`] shuts every socket down and joins every thread.
//!
//! Limits: a registry that answers blob GETs with a redirect (307 to a storage URL) sends the
//! client elsewhere; the proxy logs the `Location` but cannot damage what is fetched from there
//! (CNCF distribution with filesystem storage serves blobs itself, so the tests are unaffected).

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a client connection may sit idle between requests (above reqwest's 90 s pool idle
/// timeout, so the proxy never closes a connection the client is about to reuse).
const CLIENT_IDLE: Duration = Duration::from_secs(120);
/// Read/write timeout towards the registry and for writes to the client.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// Hard cap on the life of one client connection.
pub const MAX_CONNECTION_LIFETIME: Duration = Duration::from_secs(600);
/// Request and response heads larger than this are refused.
const MAX_HEAD: usize = 64 << 10;
const BUF: usize = 64 << 10;

/// What to do to one exchange. Byte offsets count body bytes (decoded, for chunked bodies) from
/// the start of this response, not of the blob: for a `Range: bytes=N-` request the first body
/// byte is blob byte N.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Forward the first `n` body bytes, then close the connection cleanly (FIN). The headers
    /// still announce the full length, so the client sees a truncated body ("truncate with a
    /// correct Content-Length"). `n` >= body length: no cut.
    CutAfter(u64),
    /// Forward `n` body bytes, then reset the connection (RST via `SO_LINGER` 0). The client may
    /// lose some of the last bytes written before the reset.
    ResetAfter(u64),
    /// Announce `Content-Length: n` (a lie: shorter than the real body), forward `n` bytes and
    /// keep the connection open: the client sees a clean but short response. Chunked bodies end
    /// with the last chunk after `n` bytes.
    ShortBody(u64),
    /// Forward `after` body bytes, then send nothing for `duration` (ending early when the client
    /// hangs up), then go on with the body, or close the connection if `then_close`.
    Stall {
        after: u64,
        duration: Duration,
        then_close: bool,
    },
    /// Forward the body in pieces of `chunk` bytes with `pause` after each.
    Trickle { chunk: usize, pause: Duration },
    /// Wait `duration` before forwarding the request (a slow first byte).
    Delay(Duration),
    /// Answer with this status, headers and body without asking the registry
    /// (`Content-Length` is added).
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    /// XOR the body byte at offset `at` with `mask` (same length, so only a digest can tell).
    FlipBits { at: u64, mask: u8 },
    /// Close the connection right after reading the request: no response at all.
    Drop,
}

impl Fault {
    /// A canned error status with a small JSON body.
    pub fn status(status: u16) -> Fault {
        Fault::Respond {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: format!(
                "{{\"errors\":[{{\"code\":\"PROXY_FAULT\",\"message\":\"injected {status}\"}}]}}"
            )
            .into_bytes(),
        }
    }

    /// `429 Too Many Requests` with `Retry-After: secs` (GHCR's rate limit answer).
    pub fn too_many_requests(retry_after_secs: u64) -> Fault {
        match Fault::status(429) {
            Fault::Respond {
                status,
                mut headers,
                body,
            } => {
                headers.push(("Retry-After".into(), retry_after_secs.to_string()));
                Fault::Respond {
                    status,
                    headers,
                    body,
                }
            }
            _ => unreachable!(),
        }
    }

    /// `503 Service Unavailable`.
    pub fn unavailable() -> Fault {
        Fault::status(503)
    }
}

/// Which of the requests matching a rule's method and path get its fault (counted per rule,
/// 1-based, from when the rule was added, in the order the proxy read the requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Every,
    /// Only the n-th.
    Nth(usize),
    /// The first n.
    First(usize),
    /// Every one after the first n.
    After(usize),
}

impl When {
    fn applies(self, count: usize) -> bool {
        match self {
            When::Every => true,
            When::Nth(n) => count == n,
            When::First(n) => count <= n,
            When::After(n) => count > n,
        }
    }
}

/// A fault for the requests that match a method and a path substring (and request headers the
/// proxy drops before forwarding them).
#[derive(Debug, Clone)]
pub struct Rule {
    pub method: Option<String>,
    pub path_contains: String,
    pub when: When,
    pub fault: Option<Fault>,
    /// Request headers not forwarded to the registry (e.g. `Range`, to play a server that
    /// ignores ranges and answers 200 with the whole body).
    pub strip_request_headers: Vec<String>,
    /// Only requests that carry this header match (e.g. `Authorization`).
    pub with_header: Option<String>,
    /// Requests that matched `method` and `path_contains` so far.
    matched: usize,
}

impl Rule {
    /// Requests of any method whose path contains `path_contains` (`""`: every request).
    pub fn any(path_contains: &str) -> Rule {
        Rule {
            method: None,
            path_contains: path_contains.to_string(),
            when: When::Every,
            fault: None,
            strip_request_headers: Vec::new(),
            with_header: None,
            matched: 0,
        }
    }
    pub fn request(method: &str, path_contains: &str) -> Rule {
        Rule {
            method: Some(method.to_ascii_uppercase()),
            ..Rule::any(path_contains)
        }
    }
    pub fn get(path_contains: &str) -> Rule {
        Rule::request("GET", path_contains)
    }
    pub fn head(path_contains: &str) -> Rule {
        Rule::request("HEAD", path_contains)
    }
    pub fn when(mut self, when: When) -> Rule {
        self.when = when;
        self
    }
    pub fn nth(self, n: usize) -> Rule {
        assert!(n >= 1, "requests are counted from 1");
        self.when(When::Nth(n))
    }
    pub fn first(self, n: usize) -> Rule {
        self.when(When::First(n))
    }
    pub fn after(self, n: usize) -> Rule {
        self.when(When::After(n))
    }
    pub fn every(self) -> Rule {
        self.when(When::Every)
    }
    pub fn fault(mut self, fault: Fault) -> Rule {
        self.fault = Some(fault);
        self
    }
    /// Drops request header `name` before forwarding (combines with a fault).
    pub fn strip_request_header(mut self, name: &str) -> Rule {
        self.strip_request_headers.push(name.to_string());
        self
    }
    /// Matches only requests that carry header `name`.
    pub fn with_header(mut self, name: &str) -> Rule {
        self.with_header = Some(name.to_string());
        self
    }
    fn matches(&self, method: &str, path: &str, headers: &[(String, String)]) -> bool {
        self.method.as_deref().is_none_or(|m| m == method)
            && path.contains(&self.path_contains)
            && self
                .with_header
                .as_ref()
                .is_none_or(|h| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(h)))
    }
}

/// The path of blob `digest` in `repo`: `/v2/<repo>/blobs/<digest>`.
pub fn blob_path(repo: &str, digest: &str) -> String {
    format!("/v2/{repo}/blobs/{digest}")
}

/// How an exchange ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Still being handled.
    InFlight,
    /// The whole response was forwarded.
    Complete,
    /// Closed by a fault (cut, reset, drop, stall with `then_close`).
    Faulted,
    /// The client went away (write failed, or it hung up during a stall).
    ClientGone,
    /// The registry could not be reached or broke off (reason).
    Upstream(String),
    /// The proxy was stopped.
    Stopped,
}

/// One request and what the proxy did with it.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// Order in which the proxy read the requests (0-based).
    pub seq: usize,
    /// Client connection number (0-based): requests on one keep-alive connection share it.
    pub conn: usize,
    pub method: String,
    /// Path and query as sent.
    pub path: String,
    /// Request headers as sent by the client.
    pub headers: Vec<(String, String)>,
    /// The request's `Range` header.
    pub range: Option<String>,
    /// The status sent to the client (`None`: no response head was sent).
    pub status: Option<u16>,
    /// The `Content-Length` announced to the client (after any rewrite).
    pub content_length: Option<u64>,
    /// The response's `Location` header (redirects).
    pub location: Option<String>,
    /// Response body bytes written to the client (decoded, for chunked bodies).
    pub body_bytes: u64,
    /// The fault applied, if any.
    pub fault: Option<Fault>,
    /// Request headers the proxy did not forward (see [`Rule::strip_request_header`]).
    pub stripped_headers: Vec<String>,
    pub end: End,
    /// From reading the request head to the end of the exchange (so far).
    pub elapsed: Duration,
    started: Instant,
}

impl Exchange {
    /// `N` of a `Range: bytes=N-` (or `bytes=N-M`) request header.
    pub fn range_start(&self) -> Option<u64> {
        self.range
            .as_deref()?
            .trim()
            .strip_prefix("bytes=")?
            .split('-')
            .next()?
            .trim()
            .parse()
            .ok()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// When the proxy read the request head.
    pub fn started_at(&self) -> Instant {
        self.started
    }

    /// Time from the start of `earlier` to the start of this exchange.
    pub fn started_after(&self, earlier: &Exchange) -> Duration {
        self.started.saturating_duration_since(earlier.started)
    }
}

impl fmt::Display for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "#{} conn {} {} {} range={} -> status={} length={} body={} end={:?} fault={} ({:?})",
            self.seq,
            self.conn,
            self.method,
            self.path,
            self.range.as_deref().unwrap_or("-"),
            self.status.map(|s| s.to_string()).unwrap_or("-".into()),
            self.content_length
                .map(|s| s.to_string())
                .unwrap_or("-".into()),
            self.body_bytes,
            self.end,
            self.fault
                .as_ref()
                .map(|f| format!("{f:?}"))
                .unwrap_or("-".into()),
            self.elapsed
        )
    }
}

struct Shared {
    upstream: SocketAddr,
    rules: Mutex<Vec<Rule>>,
    log: Mutex<Vec<Exchange>>,
    stop: AtomicBool,
    next_conn: AtomicUsize,
    next_socket: AtomicUsize,
    /// Live sockets (client and upstream), shut down when the proxy stops.
    sockets: Mutex<HashMap<usize, TcpStream>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// A link speed every response body shares (bytes per second, and when the link is free).
    link: Mutex<Option<(f64, Instant)>>,
}

/// Bytes a rate-capped body sends per slot.
const LINK_PIECE: u64 = 64 * 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Reserves the link for `n` bytes; returns when their slot ends (`None`: no cap).
    fn link_slot(&self, n: u64) -> Option<Instant> {
        let mut link = lock(&self.link);
        let (rate, free) = link.as_mut()?;
        let start = (*free).max(Instant::now());
        let end = start + Duration::from_secs_f64(n as f64 / *rate);
        *free = end;
        Some(end)
    }

    fn update(&self, seq: usize, f: impl FnOnce(&mut Exchange)) {
        let mut log = lock(&self.log);
        let e = &mut log[seq];
        f(e);
        e.elapsed = e.started.elapsed();
    }

    /// Counts the request against every rule that matches it; the first rule whose `when`
    /// applies (and that has a fault or headers to strip) says what to do.
    fn choose(
        &self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
    ) -> (Option<Fault>, Vec<String>) {
        let mut chosen = None;
        for rule in lock(&self.rules).iter_mut() {
            if rule.matches(method, path, headers) {
                rule.matched += 1;
                let acts = rule.fault.is_some() || !rule.strip_request_headers.is_empty();
                if chosen.is_none() && acts && rule.when.applies(rule.matched) {
                    chosen = Some((rule.fault.clone(), rule.strip_request_headers.clone()));
                }
            }
        }
        chosen.unwrap_or_default()
    }

    /// Keeps a handle of `s` for shutting it down when the proxy stops; `unregister` the
    /// returned id when done with the socket (the handle keeps the descriptor open).
    fn register(&self, s: &TcpStream) -> Option<usize> {
        let c = s.try_clone().ok()?;
        let id = self.next_socket.fetch_add(1, Ordering::SeqCst);
        lock(&self.sockets).insert(id, c);
        Some(id)
    }

    fn unregister(&self, id: Option<usize>) {
        if let Some(id) = id {
            lock(&self.sockets).remove(&id);
        }
    }
}

/// The proxy; stops (closing every connection and joining every thread) on drop.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream` (`127.0.0.1:PORT`).
    pub fn start(upstream: &str) -> Proxy {
        let upstream: SocketAddr = upstream
            .parse()
            .unwrap_or_else(|e| panic!("proxy upstream {upstream:?}: {e}"));
        assert!(
            upstream.ip().is_loopback(),
            "the proxy only talks to loopback"
        );
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy on 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream,
            rules: Mutex::new(Vec::new()),
            log: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            next_conn: AtomicUsize::new(0),
            next_socket: AtomicUsize::new(0),
            sockets: Mutex::new(HashMap::new()),
            workers: Mutex::new(Vec::new()),
            link: Mutex::new(None),
        });
        let accept = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("proxy-accept".into())
                .spawn(move || accept_loop(listener, shared))
                .expect("spawn proxy accept thread")
        };
        Proxy {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    /// `127.0.0.1:PORT` of the proxy (use it as the registry host in references).
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Caps every response body, all connections together, at `bytes_per_sec` (a link of that
    /// speed; `None` lifts the cap). Headers are not counted.
    pub fn set_rate(&self, bytes_per_sec: Option<f64>) {
        *lock(&self.shared.link) = bytes_per_sec.map(|r| (r, Instant::now()));
    }

    /// Adds a rule (rules are tried in the order added).
    pub fn add(&self, rule: Rule) {
        lock(&self.shared.rules).push(rule);
    }

    /// Removes every rule (and their counters).
    pub fn clear_rules(&self) {
        lock(&self.shared.rules).clear();
    }

    /// Forgets the log (sequence numbers restart at 0).
    pub fn clear_log(&self) {
        lock(&self.shared.log).clear();
    }

    /// Every exchange so far, in the order the requests were read.
    pub fn log(&self) -> Vec<Exchange> {
        lock(&self.shared.log).clone()
    }

    /// Exchanges whose path contains `path_contains`, of any method.
    pub fn exchanges_to(&self, path_contains: &str) -> Vec<Exchange> {
        self.log()
            .into_iter()
            .filter(|e| e.path.contains(path_contains))
            .collect()
    }

    /// GETs of `/v2/<repo>/blobs/<digest>`.
    pub fn blob_gets(&self, repo: &str, digest: &str) -> Vec<Exchange> {
        let path = blob_path(repo, digest);
        self.log()
            .into_iter()
            .filter(|e| e.method == "GET" && e.path == path)
            .collect()
    }

    /// Waits (at most `limit`) until no exchange is in flight; returns whether that happened.
    pub fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if lock(&self.shared.log)
                .iter()
                .all(|e| e.end != End::InFlight)
            {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The log, one exchange per line (for assertion messages).
    pub fn dump(&self) -> String {
        let lines: Vec<String> = self.log().iter().map(|e| e.to_string()).collect();
        lines.join("\n")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept().
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for s in lock(&self.shared.sockets).values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        let workers = std::mem::take(&mut *lock(&self.shared.workers));
        for w in workers {
            let _ = w.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stopped() {
            break;
        }
        let Ok(stream) = stream else { continue };
        let conn = shared.next_conn.fetch_add(1, Ordering::SeqCst);
        let id = shared.register(&stream);
        let worker_shared = shared.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("proxy-conn-{conn}"))
            .spawn(move || {
                serve_connection(&worker_shared, conn, stream);
                // The last descriptor of the client socket: closing it sends the FIN (or the
                // RST, after `set_linger_zero`).
                worker_shared.unregister(id);
            });
        let mut workers = lock(&shared.workers);
        workers.retain(|w| !w.is_finished());
        if let Ok(w) = spawned {
            workers.push(w);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// A first line (request or status line) and the headers.
type Head = (String, Vec<(String, String)>);

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.to_ascii_lowercase().contains("chunked")
    })
}

fn content_length(headers: &[(String, String)]) -> Option<u64> {
    header(headers, "content-length").and_then(|v| v.trim().parse().ok())
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// A request or response head: the first line and the headers. `None` on a clean EOF before any
/// byte of it.
fn read_head(r: &mut impl BufRead) -> io::Result<Option<Head>> {
    let mut first = String::new();
    let mut total = 0;
    let mut headers = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = r
            .by_ref()
            .take(MAX_HEAD as u64)
            .read_until(b'\n', &mut line)?;
        total += n;
        if n == 0 {
            if first.is_empty() && headers.is_empty() {
                return Ok(None);
            }
            return Err(bad("connection closed inside a head"));
        }
        if total > MAX_HEAD {
            return Err(bad("head too large"));
        }
        let line = String::from_utf8(line).map_err(|_| bad("non-UTF-8 head"))?;
        let line = line.trim_end_matches(['\r', '\n']);
        if first.is_empty() {
            // Empty lines before a request line are allowed (RFC 9112 2.2).
            if !line.is_empty() {
                first = line.to_string();
            }
            continue;
        }
        if line.is_empty() {
            return Ok(Some((first, headers)));
        }
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("bad header line {line:?}")))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
}

fn write_head(w: &mut impl Write, first: &str, headers: &[(String, String)]) -> io::Result<()> {
    let mut head = String::with_capacity(256);
    head.push_str(first);
    head.push_str("\r\n");
    for (k, v) in headers {
        head.push_str(k);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())
}

/// Reads a body of `len` bytes.
struct Limited<'a, R> {
    inner: &'a mut R,
    left: u64,
}

impl<R: Read> Read for Limited<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("body ended {} bytes early", self.left),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Decodes a chunked body (trailers are read and dropped).
struct Dechunk<'a, R> {
    inner: &'a mut R,
    /// Data bytes left in the current chunk; `None` before the next size line.
    left: Option<u64>,
    done: bool,
}

impl<R: BufRead> Dechunk<'_, R> {
    fn line(&mut self) -> io::Result<String> {
        let mut line = Vec::new();
        let n = self
            .inner
            .by_ref()
            .take(4096)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "chunked body ended early",
            ));
        }
        String::from_utf8(line).map_err(|_| bad("non-UTF-8 chunk line"))
    }
}

impl<R: BufRead> Read for Dechunk<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.done {
                return Ok(0);
            }
            match self.left {
                None => {
                    let line = self.line()?;
                    let size = line.trim().split(';').next().unwrap_or("").trim();
                    let size = u64::from_str_radix(size, 16)
                        .map_err(|_| bad(format!("bad chunk size line {line:?}")))?;
                    if size == 0 {
                        // Trailers up to the empty line.
                        while !self.line()?.trim().is_empty() {}
                        self.done = true;
                    } else {
                        self.left = Some(size);
                    }
                }
                Some(0) => {
                    let crlf = self.line()?;
                    if !crlf.trim().is_empty() {
                        return Err(bad("missing CRLF after chunk data"));
                    }
                    self.left = None;
                }
                Some(left) => {
                    let want = buf.len().min(left.min(usize::MAX as u64) as usize);
                    let n = self.inner.read(&mut buf[..want])?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "chunked body ended inside a chunk",
                        ));
                    }
                    self.left = Some(left - n as u64);
                    return Ok(n);
                }
            }
        }
    }
}

/// How a body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilEof,
}

fn body_reader<'a, R: BufRead>(r: &'a mut R, framing: Framing) -> Box<dyn Read + 'a> {
    match framing {
        Framing::None => Box::new(io::empty()),
        Framing::Length(n) => Box::new(Limited { inner: r, left: n }),
        Framing::Chunked => Box::new(Dechunk {
            inner: r,
            left: None,
            done: false,
        }),
        Framing::UntilEof => Box::new(r),
    }
}

/// Writes body data with the given framing towards the client.
fn write_body_piece(w: &mut impl Write, chunked: bool, data: &[u8]) -> io::Result<()> {
    if chunked {
        if data.is_empty() {
            return Ok(());
        }
        write!(w, "{:x}\r\n", data.len())?;
        w.write_all(data)?;
        w.write_all(b"\r\n")
    } else {
        w.write_all(data)
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        206 => "Partial Content",
        307 => "Temporary Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Injected",
    }
}

// ---------------------------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------------------------

/// Sends RST instead of FIN when the last descriptor of the socket is closed.
fn set_linger_zero(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket descriptor and a correctly sized `linger` value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Whether the peer has closed (or reset) the connection, without consuming data or changing
/// the socket's blocking mode.
fn peer_gone(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: a valid socket descriptor and a 1-byte buffer.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            b.as_mut_ptr() as *mut libc::c_void,
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n == 0 {
        return true;
    }
    if n < 0 {
        let e = io::Error::last_os_error();
        return !matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        );
    }
    false
}

/// Sleeps up to `d` in small steps; false when the client hung up or the proxy stopped.
fn pause(shared: &Shared, client: &TcpStream, d: Duration) -> bool {
    let deadline = Instant::now() + d;
    loop {
        if shared.stopped() || peer_gone(client) {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
    }
}

/// What happens to the connection after an exchange.
enum After {
    KeepAlive,
    Close,
    Reset,
}

fn serve_connection(shared: &Shared, conn: usize, client: TcpStream) {
    let born = Instant::now();
    let _ = client.set_nodelay(true);
    let _ = client.set_read_timeout(Some(CLIENT_IDLE));
    let _ = client.set_write_timeout(Some(IO_TIMEOUT));
    let Ok(read_half) = client.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(BUF, read_half);
    loop {
        if shared.stopped() || born.elapsed() > MAX_CONNECTION_LIFETIME {
            break;
        }
        let (line, headers) = match read_head(&mut reader) {
            Ok(Some(h)) => h,
            _ => break,
        };
        let mut parts = line.split_whitespace();
        let (Some(method), Some(path), Some(version)) = (parts.next(), parts.next(), parts.next())
        else {
            break;
        };
        let (method, path, version) = (
            method.to_ascii_uppercase(),
            path.to_string(),
            version.to_string(),
        );
        let (fault, strip) = shared.choose(&method, &path, &headers);
        let seq = {
            let mut log = lock(&shared.log);
            let seq = log.len();
            log.push(Exchange {
                seq,
                conn,
                method: method.clone(),
                path: path.clone(),
                range: header(&headers, "range").map(str::to_string),
                headers: headers.clone(),
                status: None,
                content_length: None,
                location: None,
                body_bytes: 0,
                fault: fault.clone(),
                stripped_headers: strip.clone(),
                end: End::InFlight,
                elapsed: Duration::ZERO,
                started: Instant::now(),
            });
            seq
        };
        let client_close = version == "HTTP/1.0"
            || header(&headers, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let request = Request {
            method: &method,
            line: &line,
            headers: &headers,
            client_close,
            strip: &strip,
        };
        let (end, after) = exchange(shared, seq, &request, &mut reader, &client, fault);
        shared.update(seq, |e| e.end = end);
        match after {
            After::KeepAlive => continue,
            After::Close => {
                let _ = client.shutdown(Shutdown::Both);
                break;
            }
            After::Reset => {
                set_linger_zero(&client);
                break;
            }
        }
    }
}

struct Request<'a> {
    method: &'a str,
    line: &'a str,
    headers: &'a [(String, String)],
    client_close: bool,
    /// Headers not to forward.
    strip: &'a [String],
}

fn request_framing(headers: &[(String, String)]) -> Framing {
    if is_chunked(headers) {
        Framing::Chunked
    } else {
        match content_length(headers) {
            Some(0) | None => Framing::None,
            Some(n) => Framing::Length(n),
        }
    }
}

fn exchange(
    shared: &Shared,
    seq: usize,
    req: &Request,
    reader: &mut BufReader<TcpStream>,
    client: &TcpStream,
    fault: Option<Fault>,
) -> (End, After) {
    let keep = if req.client_close {
        After::Close
    } else {
        After::KeepAlive
    };
    let req_framing = request_framing(req.headers);
    match &fault {
        Some(Fault::Drop) => return (End::Faulted, After::Close),
        Some(Fault::Respond {
            status,
            headers,
            body,
        }) => {
            // Consume the request body so the connection stays usable.
            if io::copy(&mut body_reader(reader, req_framing), &mut io::sink()).is_err() {
                return (End::ClientGone, After::Close);
            }
            let mut h = headers.clone();
            h.push(("Content-Length".into(), body.len().to_string()));
            if req.client_close {
                h.push(("Connection".into(), "close".into()));
            }
            let first = format!("HTTP/1.1 {status} {}", reason(*status));
            let mut w = client;
            let sent = write_head(&mut w, &first, &h).is_ok()
                && (req.method == "HEAD" || w.write_all(body).is_ok())
                && w.flush().is_ok();
            shared.update(seq, |e| {
                e.status = Some(*status);
                e.content_length = Some(body.len() as u64);
                e.body_bytes = if req.method == "HEAD" {
                    0
                } else {
                    body.len() as u64
                };
            });
            return if sent {
                (End::Complete, keep)
            } else {
                (End::ClientGone, After::Close)
            };
        }
        Some(Fault::Delay(d)) if !pause(shared, client, *d) => {
            return (End::ClientGone, After::Close);
        }
        _ => {}
    }

    // A fresh upstream connection per request, closed by the registry after its response.
    let upstream = match TcpStream::connect_timeout(&shared.upstream, IO_TIMEOUT) {
        Ok(s) => s,
        Err(e) => return (End::Upstream(format!("connect: {e}")), After::Close),
    };
    let id = shared.register(&upstream);
    let _ = upstream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = upstream.set_write_timeout(Some(IO_TIMEOUT));
    let _ = upstream.set_nodelay(true);
    let result = forward(
        shared,
        seq,
        req,
        req_framing,
        reader,
        client,
        &upstream,
        fault,
    );
    let _ = upstream.shutdown(Shutdown::Both);
    shared.unregister(id);
    match result {
        Ok(Forwarded::Complete { close }) => (
            End::Complete,
            if close || req.client_close {
                After::Close
            } else {
                After::KeepAlive
            },
        ),
        Ok(Forwarded::Faulted(after)) => (End::Faulted, after),
        Ok(Forwarded::ClientGone) => (End::ClientGone, After::Close),
        Ok(Forwarded::Stopped) => (End::Stopped, After::Close),
        Err(e) => (End::Upstream(e.to_string()), After::Close),
    }
}

enum Forwarded {
    /// `close`: the client connection must close (body delimited by EOF).
    Complete {
        close: bool,
    },
    Faulted(After),
    ClientGone,
    Stopped,
}

/// What a fault does to the body, as offsets into it.
#[derive(Default)]
struct BodyPlan {
    /// Stop after this many bytes, then end the connection this way.
    limit: Option<(u64, Option<After>)>,
    stall: Option<(u64, Duration, bool)>,
    trickle: Option<(usize, Duration)>,
    flip: Option<(u64, u8)>,
}

impl BodyPlan {
    fn of(fault: &Option<Fault>) -> BodyPlan {
        let mut p = BodyPlan::default();
        match fault {
            Some(Fault::CutAfter(n)) => p.limit = Some((*n, Some(After::Close))),
            Some(Fault::ResetAfter(n)) => p.limit = Some((*n, Some(After::Reset))),
            // `None`: end the body normally (the announced length was rewritten).
            Some(Fault::ShortBody(n)) => p.limit = Some((*n, None)),
            Some(Fault::Stall {
                after,
                duration,
                then_close,
            }) => p.stall = Some((*after, *duration, *then_close)),
            Some(Fault::Trickle { chunk, pause }) => p.trickle = Some(((*chunk).max(1), *pause)),
            Some(Fault::FlipBits { at, mask }) => p.flip = Some((*at, *mask)),
            _ => {}
        }
        p
    }
}

#[allow(clippy::too_many_arguments)]
fn forward(
    shared: &Shared,
    seq: usize,
    req: &Request,
    req_framing: Framing,
    reader: &mut BufReader<TcpStream>,
    client: &TcpStream,
    upstream: &TcpStream,
    fault: Option<Fault>,
) -> io::Result<Forwarded> {
    // Request: the same head with `Connection: close`, then the body re-framed as it came.
    let mut up_w = io::BufWriter::with_capacity(BUF, upstream);
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .filter(|(k, _)| {
            !k.eq_ignore_ascii_case("connection")
                && !k.eq_ignore_ascii_case("keep-alive")
                && !req.strip.iter().any(|s| k.eq_ignore_ascii_case(s))
        })
        .cloned()
        .collect();
    headers.push(("Connection".into(), "close".into()));
    write_head(&mut up_w, req.line, &headers)?;
    {
        let mut body = body_reader(reader, req_framing);
        let chunked = req_framing == Framing::Chunked;
        let mut buf = vec![0u8; BUF];
        loop {
            let n = match body.read(&mut buf) {
                Ok(n) => n,
                // The client broke off its own request.
                Err(_) => return Ok(Forwarded::ClientGone),
            };
            if n == 0 {
                break;
            }
            write_body_piece(&mut up_w, chunked, &buf[..n])?;
        }
        if chunked {
            up_w.write_all(b"0\r\n\r\n")?;
        }
    }
    up_w.flush()?;
    drop(up_w);

    // Response head (1xx interim responses are passed through).
    let mut up_r = BufReader::with_capacity(BUF, upstream);
    let (status_line, resp_headers, status) = loop {
        let (line, h) =
            read_head(&mut up_r)?.ok_or_else(|| bad("registry closed without answering"))?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
        if (100..200).contains(&status) && status != 101 {
            let mut w = client;
            if write_head(&mut w, &line, &h).is_err() {
                return Ok(Forwarded::ClientGone);
            }
            continue;
        }
        break (line, h, status);
    };
    let framing = if req.method == "HEAD" || status == 204 || status == 304 {
        Framing::None
    } else if is_chunked(&resp_headers) {
        Framing::Chunked
    } else if let Some(n) = content_length(&resp_headers) {
        Framing::Length(n)
    } else {
        Framing::UntilEof
    };
    let plan = BodyPlan::of(&fault);
    let until_eof = framing == Framing::UntilEof;

    // Response head to the client: drop hop-by-hop connection headers, apply a lying length.
    let mut out: Vec<(String, String)> = resp_headers
        .iter()
        .filter(|(k, _)| {
            !k.eq_ignore_ascii_case("connection") && !k.eq_ignore_ascii_case("keep-alive")
        })
        .cloned()
        .collect();
    if let (Some(Fault::ShortBody(n)), Framing::Length(real)) = (&fault, framing) {
        if *n < real {
            for (k, v) in out.iter_mut() {
                if k.eq_ignore_ascii_case("content-length") {
                    *v = n.to_string();
                }
            }
        }
    }
    if req.client_close || until_eof {
        out.push(("Connection".into(), "close".into()));
    }
    let announced = if framing == Framing::Chunked {
        None
    } else {
        content_length(&out)
    };
    shared.update(seq, |e| {
        e.status = Some(status);
        e.content_length = announced;
        e.location = header(&resp_headers, "location").map(str::to_string);
    });
    // Unbuffered towards the client, so `body_bytes` counts what reached the socket.
    let mut cw = client;
    if write_head(&mut cw, &status_line, &out).is_err() {
        return Ok(Forwarded::ClientGone);
    }

    // Body, with the fault applied at its offsets.
    let chunked = framing == Framing::Chunked;
    let mut body = body_reader(&mut up_r, framing);
    let mut buf = vec![0u8; BUF];
    let mut sent: u64 = 0;
    let mut stalled = false;
    loop {
        if shared.stopped() {
            return Ok(Forwarded::Stopped);
        }
        let mut want = buf.len() as u64;
        if let Some((limit, how)) = &plan.limit {
            if sent >= *limit {
                return Ok(match how {
                    Some(After::Reset) => Forwarded::Faulted(After::Reset),
                    Some(_) => Forwarded::Faulted(After::Close),
                    None => {
                        // A clean (short) end: finish the framing and keep the connection.
                        if chunked && cw.write_all(b"0\r\n\r\n").is_err() {
                            return Ok(Forwarded::ClientGone);
                        }
                        Forwarded::Complete { close: until_eof }
                    }
                });
            }
            want = want.min(limit - sent);
        }
        if let Some((at, duration, then_close)) = plan.stall {
            if !stalled && sent == at {
                stalled = true;
                if !pause(shared, client, duration) {
                    return Ok(if shared.stopped() {
                        Forwarded::Stopped
                    } else {
                        Forwarded::ClientGone
                    });
                }
                if then_close {
                    return Ok(Forwarded::Faulted(After::Close));
                }
            } else if !stalled && sent < at {
                want = want.min(at - sent);
            }
        }
        if let Some((chunk, _)) = plan.trickle {
            want = want.min(chunk as u64);
        }
        if lock(&shared.link).is_some() {
            want = want.min(LINK_PIECE);
        }
        let n = body.read(&mut buf[..want as usize])?;
        if let Some(end) = shared.link_slot(n as u64) {
            // The bytes are on the wire until their slot ends.
            let now = Instant::now();
            if end > now {
                std::thread::sleep(end - now);
            }
        }
        if n == 0 {
            if chunked && cw.write_all(b"0\r\n\r\n").is_err() {
                return Ok(Forwarded::ClientGone);
            }
            return Ok(Forwarded::Complete { close: until_eof });
        }
        if let Some((at, mask)) = plan.flip {
            if at >= sent && at < sent + n as u64 {
                buf[(at - sent) as usize] ^= mask;
            }
        }
        if write_body_piece(&mut cw, chunked, &buf[..n]).is_err() {
            return Ok(Forwarded::ClientGone);
        }
        sent += n as u64;
        shared.update(seq, |e| e.body_bytes = sent);
        if let Some((_, p)) = plan.trickle {
            if !pause(shared, client, p) {
                return Ok(Forwarded::ClientGone);
            }
        }
    }
}
