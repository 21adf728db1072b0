//! Image references, as the distribution spec writes them: `registry/repository:tag` or
//! `registry/repository@sha256:...`, with Docker Hub's defaults, held as oci-spec's `Reference`
//! (the type the Docker CLI's grammar is written for in Rust) and parsed once, in the config.
//!
//! The parse is ours, the grammar and normalisation are exactly oci-spec's (a differential test
//! holds them together): oci-spec's `FromStr` compiles its reference regex on first use, and
//! with Unicode `\w{0,127}` for the tag that costs ~50 ms of CPU at every start (90% of
//! `check-config`), ahead of the first request of every `sync --once`. The tag and path
//! classes here are ASCII, as in distribution's Go grammar (`\w` is ASCII in RE2); oci-spec
//! alone also accepts non-ASCII letters in a tag, which no registry does.

pub use oci_spec::distribution::Reference;

/// distribution's NAME_TOTAL_LENGTH_MAX, checked on the repository (as oci-spec does).
const NAME_TOTAL_LENGTH_MAX: usize = 255;
const MAX_TAG: usize = 128;

/// Parses a reference, with an error that quotes it.
pub fn parse_reference(text: &str) -> Result<Reference, String> {
    parse(text).map_err(|e| format!("{text:?}: {e}"))
}

/// oci-spec's `Reference::try_from`, without the regex; the messages are its `ParseError`'s.
fn parse(s: &str) -> Result<Reference, &'static str> {
    const INVALID: &str = "invalid reference format";
    if s.is_empty() {
        return Err("repository name must have at least one component");
    }
    let (rest, digest) = match s.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (s, None),
    };
    // A tag follows the last ':' that comes after the last '/' (before it is a port).
    let (name, tag) = match rest.rfind(':') {
        Some(i) if rest[i..].find('/').is_none() => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if !valid_name(name) || !tag.is_none_or(valid_tag) || !digest.is_none_or(valid_digest) {
        return Err(INVALID);
    }
    let (registry, repository) = split_domain(name);
    if repository.len() > NAME_TOTAL_LENGTH_MAX {
        return Err("repository name must not be more than 255 characters");
    }
    if let Some(d) = digest {
        let (want, hex) = match d.split_once(':') {
            Some(("sha256", hex)) => (64, hex),
            Some(("sha384", hex)) => (96, hex),
            Some(("sha512", hex)) => (128, hex),
            _ => return Err("unsupported digest algorithm"),
        };
        if hex.len() != want {
            return Err("invalid checksum digest length");
        }
    }
    Ok(match (tag, digest) {
        (Some(t), Some(d)) => {
            Reference::with_tag_and_digest(registry, repository, t.into(), d.into())
        }
        (None, Some(d)) => Reference::with_digest(registry, repository, d.into()),
        (t, None) => Reference::with_tag(registry, repository, t.unwrap_or("latest").into()),
    })
}

/// `[domain '/'] path-component ('/' path-component)*`: the first of several components may be
/// a domain (with a port).
fn valid_name(name: &str) -> bool {
    let mut parts = name.split('/');
    let Some(first) = parts.next() else {
        return false;
    };
    let rest: Vec<&str> = parts.collect();
    let first_ok = path_component(first) || (!rest.is_empty() && domain(first));
    first_ok && rest.iter().all(|c| path_component(c))
}

/// `[a-z0-9]+ ((\.|_|__|-+) [a-z0-9]+)*`
fn path_component(c: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let b = c.as_bytes();
    let mut i = 0;
    loop {
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        let sep = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        match &c[sep..i] {
            "." | "_" | "__" => {}
            s if s.bytes().all(|x| x == b'-') => {}
            _ => return false,
        }
    }
}

/// `label ('.' label)* (':' [0-9]+)?`, a label being `[a-zA-Z0-9]` or
/// `[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]`.
fn domain(d: &str) -> bool {
    let (host, port) = match d.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    let label = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b.iter().all(|&x| x.is_ascii_alphanumeric() || x == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
    };
    host.split('.').all(label)
        && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|x| x.is_ascii_digit()))
}

/// `[\w][\w.-]{0,127}`, `\w` = `[A-Za-z0-9_]`.
fn valid_tag(t: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_TAG
        && word(b[0])
        && b.iter().all(|&x| word(x) || x == b'.' || x == b'-')
}

/// `[A-Za-z][A-Za-z0-9]* ([-_+.][A-Za-z][A-Za-z0-9]*)* ':' [0-9a-fA-F]{32,}`
fn valid_digest(d: &str) -> bool {
    let Some((alg, hex)) = d.split_once(':') else {
        return false;
    };
    let component = |c: &str| {
        let b = c.as_bytes();
        !b.is_empty() && b[0].is_ascii_alphabetic() && b.iter().all(u8::is_ascii_alphanumeric)
    };
    alg.split(['-', '_', '+', '.']).all(component)
        && hex.len() >= 32
        && hex.bytes().all(|x| x.is_ascii_hexdigit())
}

/// distribution's `splitDomain` (reference/normalize.go), as oci-spec has it: a first component
/// without '.' or ':' that is not `localhost` is a Docker Hub path; Docker Hub's one-component
/// names are under `library/`.
fn split_domain(name: &str) -> (String, String) {
    let (mut domain, mut remainder) = match name.split_once('/') {
        Some((left, right)) if left.contains(['.', ':']) || left == "localhost" => {
            (left.to_string(), right.to_string())
        }
        _ => ("docker.io".to_string(), name.to_string()),
    };
    if domain == "index.docker.io" {
        domain = "docker.io".into();
    }
    if domain == "docker.io" && !remainder.contains('/') {
        remainder = format!("library/{remainder}");
    }
    (domain, remainder)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What oci-spec's own parser says (the regex).
    fn theirs(s: &str) -> Result<Reference, String> {
        s.parse::<Reference>().map_err(|e| e.to_string())
    }

    fn ours(s: &str) -> Result<Reference, String> {
        parse(s).map_err(str::to_string)
    }

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn the_parse_agrees_with_oci_spec() {
        let long = "a".repeat(256);
        let tag128 = "t".repeat(128);
        let tag129 = "t".repeat(129);
        let mut cases: Vec<String> = [
            "busybox",
            "test.com:tag",
            "test.com:5000",
            "test.com/repo:tag",
            "test:5000/repo",
            "test:5000/repo:tag",
            "localhost/foo",
            "localhost:5000/foo/bar:v1",
            "index.docker.io/busybox",
            "docker.io/library/busybox:1",
            "ghcr.io/urmanac/talos-cozystack-demo:demo-stable",
            "ghcr.io/siderolabs/installer:v1.11.5",
            "127.0.0.1:5000/t/oras:1",
            "[::1]:5000/x",
            "Foo/bar",
            "foo/Bar",
            "UPPER",
            "a__b/c--d/e.f/g_h",
            "a___b",
            "a._b",
            "a-",
            "-a",
            "a..b",
            "a//b",
            "/a",
            "a/",
            ":tag",
            "a:",
            "a:-x",
            "a:_x",
            "a:.x",
            "a:b:c",
            "a@",
            "a@sha256:",
            "a:b@",
            "ex-ample.com/a",
            "-example.com/a",
            "example-.com/a",
            "example.com:/a",
            "example.com:x/a",
            "ex_ample.com/a",
            "a@md5:0123456789abcdef0123456789abcdef",
            "a@sha256:0123456789abcdef0123456789abcdef",
            "a@sha256:0123456789abcdef0123456789abcdeX",
            "a@sha256+b64:0123456789abcdef0123456789abcdef",
            "a@1sha:0123456789abcdef0123456789abcdef",
            "a@SHA256:0123456789abcdef0123456789abcdef",
            "a@sha256:0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef",
            "a@@sha256:x",
            "a b",
            " a",
            "a\n",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        cases.extend([
            format!("x.io/{long}"),
            format!("x.io/{}", "a".repeat(255)),
            format!("a:{tag128}"),
            format!("a:{tag129}"),
            format!("a@sha256:{HEX}"),
            format!("x.io:443/a/b:c@sha256:{HEX}"),
            format!("a@sha384:{HEX}"),
            format!("a@sha384:{HEX}{}", &HEX[..32]),
            format!("a@sha512:{HEX}{HEX}"),
            format!("a@sha512:{HEX}"),
        ]);
        for c in &cases {
            assert_eq!(ours(c), theirs(c), "{c:?}");
        }
    }

    #[test]
    fn random_references_parse_as_oci_spec_parses_them() {
        // Strings over the grammar's alphabet, so most are near misses.
        let alphabet = b"ab09Z.-_:/@";
        let mut rng = fastrand::Rng::with_seed(7);
        let mut valid = 0;
        for _ in 0..20_000 {
            let len = rng.usize(1..16);
            let s: String = (0..len)
                .map(|_| char::from(alphabet[rng.usize(..alphabet.len())]))
                .collect();
            let r = ours(&s);
            valid += usize::from(r.is_ok());
            assert_eq!(r, theirs(&s), "{s:?}");
        }
        assert!(valid > 1000, "only {valid} valid references drawn");
    }

    #[test]
    fn a_non_ascii_tag_is_refused_as_registries_refuse_it() {
        assert!(theirs("a:tägg").is_ok());
        assert!(ours("a:tägg").is_err());
    }
}
