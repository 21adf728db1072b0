//! Random faults on top of the fault-injecting proxy (`proxy.rs`, which this file does not
//! change): the fault kinds the soak test counts, two faults built from `Fault::Respond` (a
//! redirect loop and a manifest swapped for another version's), and the reading of the proxy
//! log: which planned faults really took effect, and how long the client waited after each `429`
//! with `Retry-After`.
//!
//! Every canned response carries an `X-Soak-Fault: <id>` header, so a fault that spans several
//! exchanges (a redirect loop is one 307 per hop) is counted once.

use super::data::digest_of;
use super::proxy::{End, Exchange, Fault};
use std::collections::BTreeMap;
use std::time::Duration;

/// Header that names the planned fault a canned response belongs to.
pub const FAULT_ID_HEADER: &str = "X-Soak-Fault";

/// The kinds of fault the soak test injects and counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Connection reset (RST) at a random body byte.
    Reset,
    /// Body cut (clean FIN) at a random byte, the headers announcing the full length.
    Truncated,
    /// A clean but short body under a lying, shorter `Content-Length`.
    LyingLength,
    /// One body byte XORed (blob or manifest): same length, wrong digest.
    Flipped,
    /// 500, 502 or 503.
    Status5xx,
    /// 429 with `Retry-After: 1` or `2`.
    TooManyRequests,
    /// No byte for longer than the client's timeouts (before the head or inside the body).
    Stall,
    /// The body in small pieces with pauses (each shorter than the stall timeout).
    Trickle,
    /// 307 to the very same URL, for several hops.
    RedirectLoop,
    /// A manifest GET by digest answered with another version's document.
    ManifestChanged,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Reset,
        Kind::Truncated,
        Kind::LyingLength,
        Kind::Flipped,
        Kind::Status5xx,
        Kind::TooManyRequests,
        Kind::Stall,
        Kind::Trickle,
        Kind::RedirectLoop,
        Kind::ManifestChanged,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Reset => "reset",
            Kind::Truncated => "truncated",
            Kind::LyingLength => "lying-length",
            Kind::Flipped => "flipped",
            Kind::Status5xx => "5xx",
            Kind::TooManyRequests => "429",
            Kind::Stall => "stall",
            Kind::Trickle => "trickle",
            Kind::RedirectLoop => "redirect-loop",
            Kind::ManifestChanged => "manifest-changed",
        }
    }

    /// Faults that need a response body (not for HEAD).
    pub fn needs_body(self) -> bool {
        matches!(
            self,
            Kind::Reset | Kind::Truncated | Kind::LyingLength | Kind::Flipped | Kind::Trickle
        )
    }
}

fn id_header(id: u64) -> (String, String) {
    (FAULT_ID_HEADER.to_string(), id.to_string())
}

/// An error status with a small JSON body (as a registry sends).
pub fn status(code: u16, id: u64) -> Fault {
    Fault::Respond {
        status: code,
        headers: vec![
            ("Content-Type".into(), "application/json".into()),
            id_header(id),
        ],
        body: format!(
            "{{\"errors\":[{{\"code\":\"SOAK_FAULT\",\"message\":\"injected {code} #{id}\"}}]}}"
        )
        .into_bytes(),
    }
}

/// `429 Too Many Requests` with `Retry-After: secs`.
pub fn too_many_requests(secs: u64, id: u64) -> Fault {
    match status(429, id) {
        Fault::Respond {
            status,
            mut headers,
            body,
        } => {
            headers.push(("Retry-After".into(), secs.to_string()));
            Fault::Respond {
                status,
                headers,
                body,
            }
        }
        _ => unreachable!(),
    }
}

/// `307 Temporary Redirect` to `path` itself: one hop of a redirect loop (add one rule per hop).
pub fn redirect_to_self(path: &str, id: u64) -> Fault {
    Fault::Respond {
        status: 307,
        headers: vec![("Location".into(), path.to_string()), id_header(id)],
        body: Vec::new(),
    }
}

/// `200` with `body` (another version's manifest or index) and the headers a registry would send
/// for it, in answer to a GET by a digest that `body` does not hash to.
pub fn swapped_manifest(body: &[u8], media_type: &str, id: u64) -> Fault {
    Fault::Respond {
        status: 200,
        headers: vec![
            ("Content-Type".into(), media_type.to_string()),
            ("Docker-Content-Digest".into(), digest_of(body)),
            id_header(id),
        ],
        body: body.to_vec(),
    }
}

/// The `X-Soak-Fault` id of a canned response.
pub fn fault_id(f: &Fault) -> Option<u64> {
    match f {
        Fault::Respond { headers, .. } => headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(FAULT_ID_HEADER))
            .and_then(|(_, v)| v.parse().ok()),
        _ => None,
    }
}

/// The `Retry-After` seconds of a canned response.
pub fn retry_after(f: &Fault) -> Option<u64> {
    match f {
        Fault::Respond { headers, .. } => headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
            .and_then(|(_, v)| v.trim().parse().ok()),
        _ => None,
    }
}

/// Whether the fault of exchange `e` really took effect, and as what. `full_len` is the length of
/// the whole document or blob at that path (for a `Range: bytes=N-` request the body is the
/// part from N on); without it, body faults are not counted.
pub fn effect(e: &Exchange, full_len: Option<u64>) -> Option<Kind> {
    let fault = e.fault.as_ref()?;
    let ok = e.status.is_some_and(|s| (200..300).contains(&s));
    let head = e.method == "HEAD";
    // Body bytes the response would have had without the fault.
    let rest = full_len.map(|l| l.saturating_sub(e.range_start().unwrap_or(0)));
    let before_end = |n: u64| rest.is_some_and(|r| n < r);
    match fault {
        Fault::ResetAfter(n) => {
            (ok && !head && e.end == End::Faulted && e.body_bytes == *n && before_end(*n))
                .then_some(Kind::Reset)
        }
        Fault::CutAfter(n) => {
            (ok && !head && e.end == End::Faulted && e.body_bytes == *n && before_end(*n))
                .then_some(Kind::Truncated)
        }
        Fault::ShortBody(n) => {
            (ok && !head && e.content_length == Some(*n) && e.body_bytes == *n && before_end(*n))
                .then_some(Kind::LyingLength)
        }
        Fault::FlipBits { at, .. } => (ok && !head && e.body_bytes > *at).then_some(Kind::Flipped),
        Fault::Stall { after, .. } => (ok
            && !head
            && e.body_bytes == *after
            && before_end(*after)
            && matches!(e.end, End::ClientGone | End::Faulted))
        .then_some(Kind::Stall),
        Fault::Delay(d) => (e.end == End::ClientGone || e.elapsed >= *d).then_some(Kind::Stall),
        Fault::Trickle { .. } => (ok && !head && e.body_bytes > 0).then_some(Kind::Trickle),
        Fault::Respond { status, .. } => {
            if e.status != Some(*status) || e.end != End::Complete {
                return None;
            }
            match status {
                307 => Some(Kind::RedirectLoop),
                429 => Some(Kind::TooManyRequests),
                500..=599 => Some(Kind::Status5xx),
                200 => Some(Kind::ManifestChanged),
                _ => None,
            }
        }
        Fault::Drop => None,
    }
}

/// The faults that took effect in `log`, by kind: a canned response counts once per fault id (a
/// redirect loop of many hops is one fault), every other fault once per exchange.
pub fn tally(log: &[Exchange], len_of: impl Fn(&str) -> Option<u64>) -> BTreeMap<Kind, u64> {
    let mut out = BTreeMap::new();
    let mut seen_ids = std::collections::BTreeSet::new();
    for e in log {
        let Some(kind) = effect(e, len_of(&e.path)) else {
            continue;
        };
        if let Some(id) = e.fault.as_ref().and_then(fault_id) {
            if !seen_ids.insert(id) {
                continue;
            }
        }
        *out.entry(kind).or_insert(0) += 1;
    }
    out
}

/// One `429` with `Retry-After` and the client's next request for the same method and path.
#[derive(Debug, Clone)]
pub struct RetryGap {
    pub path: String,
    pub asked: Duration,
    pub waited: Duration,
}

impl RetryGap {
    pub fn honoured(&self) -> bool {
        self.waited >= self.asked
    }
}

/// For every injected `429` with `Retry-After` in `log` that the client retried (a later request
/// with the same method and path in `log`), the time between the two requests.
pub fn retry_after_gaps(log: &[Exchange]) -> Vec<RetryGap> {
    let mut out = Vec::new();
    for (i, e) in log.iter().enumerate() {
        if e.status != Some(429) {
            continue;
        }
        let Some(secs) = e.fault.as_ref().and_then(retry_after) else {
            continue;
        };
        let next = log[i + 1..]
            .iter()
            .find(|f| f.method == e.method && f.path == e.path);
        if let Some(next) = next {
            out.push(RetryGap {
                path: e.path.clone(),
                asked: Duration::from_secs(secs),
                waited: next.started_after(e),
            });
        }
    }
    out
}
