//! Resumed blob downloads, through a fault-injecting proxy (`tests/common/proxy.rs`) between
//! bootsync and a real registry: connections cut at chosen body offsets, stalls, resets, lying
//! lengths, rate limits and flipped bits.
//!
//! bootsync resumes a broken blob download with `Range: bytes=N-` from the byte reached; the
//! sha256 covers the whole blob. Run with `cargo test --test resume`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic: a panic is a failure

// The harness re-exports items that only other test binaries use.
#[allow(unused_imports)]
mod common;

use common::http;
use common::image::BuiltImage;
use common::proxy::{blob_path, End, Exchange, Fault, Proxy, Rule};
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const REPO: &str = "talos/resume";
const TAG: &str = "stable";
/// The top layer holds both files (incompressible, like real boot files): a few MB of blob.
const KERNEL: usize = 1_500_000;
const INITRAMFS: usize = 2_500_000;

struct Boot {
    kernel: Vec<u8>,
    initramfs: Vec<u8>,
}

fn boot(seed: u64) -> Boot {
    Boot {
        kernel: fake_kernel("arm64", seed * 2, KERNEL),
        initramfs: fake_initramfs(seed * 2 + 1, INITRAMFS),
    }
}

/// A base layer with nothing wanted, and the boot files on top.
fn image(c: Compression, seed: u64, b: &Boot) -> Image {
    Image::oci("arm64")
        .label(&format!("v{seed}"))
        .layer(
            Layer::new(c)
                .file(
                    "etc/os-release",
                    format!("ID=talos\nVERSION_ID=v1.{seed}\n"),
                )
                .file("usr/lib/libfiller.so", bytes(7_000 + seed, 200_000)),
        )
        .layer(
            Layer::new(c)
                .file("assets/talos/arm64/vmlinuz", b.kernel.clone())
                .file("assets/talos/arm64/initramfs.xz", b.initramfs.clone()),
        )
}

/// A registry, the proxy in front of it, and a bootsync config that goes through the proxy.
struct Setup {
    proxy: Proxy,
    reg: Registry,
    work: Work,
    dest: PathBuf,
    reference: String,
    config: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        Setup::with_stall_timeout(None)
    }

    fn with_stall_timeout(stall: Option<&str>) -> Setup {
        let reg = Registry::start();
        let proxy = Proxy::start(&reg.host());
        let reference = format!("{}/{REPO}:{TAG}", proxy.host());
        let work = Work::new();
        let dest = work.dest("talos");
        let mut cfg = Config::new().registry(&proxy.host()).target(
            TargetCfg::new("talos-arm64", &reference, &dest)
                .platform("linux/arm64")
                .file("assets/talos/arm64/vmlinuz", "vmlinuz-arm64")
                .file("assets/talos/arm64/initramfs.xz", "initramfs-arm64.xz"),
        );
        if let Some(s) = stall {
            cfg.stall_timeout = Some(s.to_string());
        }
        let config = work.config(&cfg);
        Setup {
            proxy,
            reg,
            work,
            dest,
            reference,
            config,
        }
    }

    /// Pushes an image straight to the registry (not through the proxy) at the tag.
    fn push(&self, c: Compression, seed: u64) -> (BuiltImage, Boot) {
        let b = boot(seed);
        let built = self.reg.push_image(REPO, &image(c, seed, &b), Some(TAG));
        (built, b)
    }

    fn sync(&self) -> Outcome {
        let out = self.work.sync_once(&self.config);
        assert!(
            self.proxy.wait_idle(Duration::from_secs(10)),
            "proxy still busy:\n{}",
            self.proxy.dump()
        );
        out
    }

    /// `img` is current and its files are byte-equal to what was pushed.
    #[track_caller]
    fn assert_current(&self, img: &BuiltImage, b: &Boot) {
        assert_current(
            &self.dest,
            &Published {
                target: "talos-arm64",
                reference: &self.reference,
                platform: "linux/arm64",
                digest: &img.digest,
                tag_digest: &img.digest,
                files: &[
                    Want {
                        name: "vmlinuz-arm64",
                        source: "assets/talos/arm64/vmlinuz",
                        data: &b.kernel,
                    },
                    Want {
                        name: "initramfs-arm64.xz",
                        source: "assets/talos/arm64/initramfs.xz",
                        data: &b.initramfs,
                    },
                ],
            },
        );
    }

    fn blob_rule(&self, digest: &str) -> Rule {
        Rule::get(&blob_path(REPO, digest))
    }

    fn blob_gets(&self, digest: &str) -> Vec<Exchange> {
        self.proxy.blob_gets(REPO, digest)
    }

    /// The base layer holds nothing wanted: it must never be fetched.
    #[track_caller]
    fn assert_base_not_fetched(&self, img: &BuiltImage) {
        assert!(
            self.blob_gets(&img.layers[0].digest).is_empty(),
            "base layer fetched:\n{}",
            self.proxy.dump()
        );
    }
}

fn total_body(gets: &[Exchange]) -> u64 {
    gets.iter().map(|e| e.body_bytes).sum()
}

// ---------------------------------------------------------------------------------------------
// A connection cut once, at several offsets, gzip and zstd
// ---------------------------------------------------------------------------------------------

/// Cuts the first GET of the top layer after `cut(blob size)` body bytes (clean close, the
/// headers announcing the full length); bootsync must resume from exactly there.
fn cut_once_case(c: Compression, seed: u64, cut: fn(u64) -> u64) {
    let s = Setup::new();
    let (img, b) = s.push(c, seed);
    let top = &img.layers[1];
    let size = top.blob.len() as u64;
    assert!(size > 3_000_000, "top layer is only {size} bytes");
    let at = cut(size);
    s.proxy
        .add(s.blob_rule(&top.digest).nth(1).fault(Fault::CutAfter(at)));

    s.sync().assert_success();
    s.assert_current(&img, &b);

    let log = s.proxy.dump();
    let gets = s.blob_gets(&top.digest);
    assert_eq!(gets.len(), 2, "one cut, one resumed request:\n{log}");
    let (first, second) = (&gets[0], &gets[1]);
    assert_eq!(first.range, None, "first request asks for a range:\n{log}");
    assert_eq!(first.status, Some(200), "{log}");
    assert_eq!(first.end, End::Faulted, "{log}");
    assert_eq!(
        first.body_bytes, at,
        "bytes forwarded before the cut:\n{log}"
    );
    assert_eq!(
        second.range.as_deref(),
        Some(format!("bytes={}-", first.body_bytes).as_str()),
        "resumed request does not start at the byte reached:\n{log}"
    );
    assert_eq!(second.status, Some(206), "{log}");
    assert_eq!(second.end, End::Complete, "{log}");
    assert_eq!(second.body_bytes, size - at, "{log}");
    assert_eq!(
        total_body(&gets),
        size,
        "blob bytes forwarded in total (something fetched twice?):\n{log}"
    );
    s.assert_base_not_fetched(&img);
}

#[test]
fn gzip_cut_after_first_byte_is_resumed() {
    cut_once_case(Compression::Gzip, 1, |_| 1);
}

#[test]
fn gzip_cut_mid_blob_is_resumed() {
    cut_once_case(Compression::Gzip, 2, |size| size / 2);
}

#[test]
fn gzip_cut_one_byte_before_the_end_is_resumed() {
    cut_once_case(Compression::Gzip, 3, |size| size - 1);
}

#[test]
fn zstd_cut_after_first_byte_is_resumed() {
    cut_once_case(Compression::Zstd, 4, |_| 1);
}

#[test]
fn zstd_cut_mid_blob_is_resumed() {
    cut_once_case(Compression::Zstd, 5, |size| size / 2);
}

#[test]
fn zstd_cut_one_byte_before_the_end_is_resumed() {
    cut_once_case(Compression::Zstd, 6, |size| size - 1);
}

// ---------------------------------------------------------------------------------------------
// Repeated cuts
// ---------------------------------------------------------------------------------------------

/// Every response is cut after a quarter of the blob: each attempt makes progress, so the
/// download goes on (progress earns fresh attempts) and every range starts where the last ended.
#[test]
fn every_response_cut_but_progressing_completes() {
    let s = Setup::new();
    let (img, b) = s.push(Compression::Zstd, 10);
    let top = &img.layers[1];
    let size = top.blob.len() as u64;
    let piece = size / 4 + 1;
    s.proxy.add(
        s.blob_rule(&top.digest)
            .every()
            .fault(Fault::CutAfter(piece)),
    );

    s.sync().assert_success();
    s.assert_current(&img, &b);

    let log = s.proxy.dump();
    let gets = s.blob_gets(&top.digest);
    assert_eq!(gets.len(), 4, "{log}");
    let mut reached = 0;
    for (i, g) in gets.iter().enumerate() {
        let want_range = (i > 0).then(|| format!("bytes={reached}-"));
        assert_eq!(g.range, want_range, "request {i}:\n{log}");
        assert_eq!(
            g.body_bytes,
            piece.min(size - reached),
            "request {i}:\n{log}"
        );
        reached += g.body_bytes;
    }
    assert_eq!(reached, size, "{log}");
}

/// The connection always breaks at the same blob byte (the first response after half the blob,
/// every resumed one before its first body byte): no progress, so bootsync gives up after its
/// attempts with an error naming the blob, and the previous version keeps serving.
#[test]
fn blob_cut_every_time_fails_and_previous_version_keeps_serving() {
    let s = Setup::new();
    let (v1, b1) = s.push(Compression::Gzip, 20);
    s.sync().assert_success();
    s.assert_current(&v1, &b1);

    let (v2, _) = s.push(Compression::Gzip, 21);
    let top = &v2.layers[1];
    let size = top.blob.len() as u64;
    let mid = size / 2;
    s.proxy
        .add(s.blob_rule(&top.digest).nth(1).fault(Fault::CutAfter(mid)));
    s.proxy
        .add(s.blob_rule(&top.digest).after(1).fault(Fault::CutAfter(0)));

    let started = Instant::now();
    let out = s.sync();
    let elapsed = started.elapsed();
    out.assert_code(1)
        .assert_stderr_has(&["talos-arm64", &top.digest, &format!("byte {mid}")]);

    let log = s.proxy.dump();
    let gets = s.blob_gets(&top.digest);
    // 1 attempt that reached byte `mid`, then attempts without progress up to BLOB_ATTEMPTS (5)
    // in total.
    assert_eq!(gets.len(), 5, "blob GETs ({elapsed:?}):\n{log}");
    assert_eq!(gets[0].range, None, "{log}");
    assert_eq!(gets[0].body_bytes, mid, "{log}");
    for g in &gets[1..] {
        assert_eq!(g.range_start(), Some(mid), "{log}");
        assert_eq!(g.status, Some(206), "{log}");
        assert_eq!(g.body_bytes, 0, "{log}");
    }
    // The previous version is untouched and nothing was left behind.
    s.assert_current(&v1, &b1);
    assert_eq!(versions(&s.dest), [v1.hex().to_string()].into());
}

// ---------------------------------------------------------------------------------------------
// Other faults
// ---------------------------------------------------------------------------------------------

/// No byte for longer than `stall_timeout = "2s"`: bootsync gives up on the connection and
/// resumes from the byte reached.
#[test]
fn stalled_download_is_resumed() {
    let s = Setup::with_stall_timeout(Some("2s"));
    let (img, b) = s.push(Compression::Zstd, 30);
    let top = &img.layers[1];
    let size = top.blob.len() as u64;
    let at = size / 3;
    let stall = Duration::from_secs(20);
    s.proxy
        .add(s.blob_rule(&top.digest).nth(1).fault(Fault::Stall {
            after: at,
            duration: stall,
            then_close: false,
        }));

    let started = Instant::now();
    s.sync().assert_success();
    let elapsed = started.elapsed();
    s.assert_current(&img, &b);

    let log = s.proxy.dump();
    let gets = s.blob_gets(&top.digest);
    assert_eq!(gets.len(), 2, "{log}");
    assert_eq!(gets[0].body_bytes, at, "{log}");
    // bootsync hung up during the stall (the proxy noticed before the stall ended).
    assert_eq!(gets[0].end, End::ClientGone, "{log}");
    assert!(
        gets[0].elapsed < stall,
        "the stalled connection was not dropped: {log}"
    );
    assert_eq!(
        gets[1].range.as_deref(),
        Some(format!("bytes={at}-").as_str()),
        "{log}"
    );
    assert_eq!(total_body(&gets), size, "{log}");
    assert!(
        elapsed >= Duration::from_secs(2) && elapsed < stall,
        "sync took {elapsed:?}"
    );
}

/// A response whose `Content-Length` lies (shorter than the blob) ends cleanly but early: the
/// byte count against the descriptor catches it and the rest is fetched with a range.
#[test]
fn short_response_with_lying_content_length_is_resumed() {
    let s = Setup::new();
    let (img, b) = s.push(Compression::Gzip, 40);
    let top = &img.layers[1];
    let size = top.blob.len() as u64;
    let at = size / 2 + 12_345;
    s.proxy
        .add(s.blob_rule(&top.digest).nth(1).fault(Fault::ShortBody(at)));

    s.sync().assert_success();
    s.assert_current(&img, &b);

    let log = s.proxy.dump();
    let gets = s.blob_gets(&top.digest);
    assert_eq!(gets.len(), 2, "{log}");
    assert_eq!(gets[0].content_length, Some(at), "{log}");
    assert_eq!(gets[0].end, End::Complete, "{log}");
    assert_eq!(gets[1].range_start(), Some(at), "{log}");
    assert_eq!(total_body(&gets), size, "{log}");
}

/// A server that ignores `Range` on the resumed request sends the whole blob again (200): the
/// bytes already received are skipped, and the result is still exact.
#[test]
fn resume_from_a_server_ignoring_range_skips_what_it_has() {
    let s = Setup::new();
    let (img, b) = s.push(Compression::Gzip, 45);
    let top = &img.layers[1];
    let size = top.blob.len() as u64;
    let at = size / 3;
    s.proxy
        .add(s.blob_rule(&top.digest).nth(1).fault(Fault::CutAfter(at)));
    s.proxy.add(
        s.blob_rule(&top.digest)
            .nth(2)
            .strip_request_header("Range"),
    );

    s.sync().assert_success();
    s.assert_current(&img, &b);

    let log = s.proxy.dump();
    let gets = s.blob_gets(&top.digest);
    assert_eq!(gets.len(), 2, "{log}");
    assert_eq!(gets[1].range_start(), Some(at), "{log}");
    assert_eq!(gets[1].stripped_headers, ["Range"], "{log}");
    assert_eq!(gets[1].status, Some(200), "{log}");
    assert_eq!(gets[1].body_bytes, size, "{log}");
}

/// A reset (RST) mid-blob: the client may lose the last bytes in flight, so it resumes from at
/// most the bytes forwarded, and the result is still exact.
#[test]
fn reset_connection_is_resumed() {
    let s = Setup::new();
    let (img, b) = s.push(Compression::Zstd, 50);
    let top = &img.layers[1];
    let size = top.blob.len() as u64;
    s.proxy.add(
        s.blob_rule(&top.digest)
            .nth(1)
            .fault(Fault::ResetAfter(size / 2)),
    );

    s.sync().assert_success();
    s.assert_current(&img, &b);

    let log = s.proxy.dump();
    let gets = s.blob_gets(&top.digest);
    assert_eq!(gets.len(), 2, "{log}");
    let resumed_at = gets[1].range_start().unwrap_or(0);
    assert!(resumed_at <= gets[0].body_bytes, "{log}");
    assert_eq!(gets[1].body_bytes, size - resumed_at, "{log}");
}

/// 429 with `Retry-After: 1` on the first blob GET: waited out, then fetched whole.
#[test]
fn rate_limited_blob_request_waits_retry_after() {
    let s = Setup::new();
    let (img, b) = s.push(Compression::Gzip, 60);
    let top = &img.layers[1];
    s.proxy.add(
        s.blob_rule(&top.digest)
            .nth(1)
            .fault(Fault::too_many_requests(1)),
    );

    s.sync().assert_success();
    s.assert_current(&img, &b);

    let log = s.proxy.dump();
    let gets = s.blob_gets(&top.digest);
    assert_eq!(gets.len(), 2, "{log}");
    assert_eq!(gets[0].status, Some(429), "{log}");
    assert_eq!(gets[1].status, Some(200), "{log}");
    assert_eq!(gets[1].range, None, "{log}");
    let gap = gets[1].started_after(&gets[0]);
    assert!(
        gap >= Duration::from_millis(950),
        "Retry-After: 1 not honoured (retried after {gap:?}):\n{log}"
    );
}

/// 503 on the first HEAD of the tag is retried.
#[test]
fn unavailable_head_is_retried() {
    let s = Setup::new();
    let (img, b) = s.push(Compression::Zstd, 70);
    s.proxy.add(
        Rule::head(&format!("/v2/{REPO}/manifests/{TAG}"))
            .nth(1)
            .fault(Fault::unavailable()),
    );
    s.sync().assert_success();
    s.assert_current(&img, &b);
    let heads: Vec<Exchange> = s
        .proxy
        .log()
        .into_iter()
        .filter(|e| e.method == "HEAD")
        .collect();
    assert_eq!(heads.len(), 2, "{}", s.proxy.dump());
    assert_eq!(heads[0].status, Some(503));
    assert_eq!(heads[1].status, Some(200));
}

/// One flipped bit in the blob body: the digest check refuses it, nothing is published, and the
/// error names the blob.
#[test]
fn flipped_bit_is_refused_by_digest() {
    let s = Setup::new();
    let (img, _) = s.push(Compression::Gzip, 80);
    let top = &img.layers[1];
    let size = top.blob.len() as u64;
    s.proxy
        .add(s.blob_rule(&top.digest).every().fault(Fault::FlipBits {
            at: size / 2,
            mask: 0x10,
        }));
    s.sync()
        .assert_code(1)
        .assert_stderr_has(&[&top.digest, "digest"]);
    assert_nothing_published(&s.dest);
    let gets = s.blob_gets(&top.digest);
    assert_eq!(gets.len(), 1, "{}", s.proxy.dump());
    assert_eq!(gets[0].body_bytes, size);
}

// ---------------------------------------------------------------------------------------------
// The proxy itself
// ---------------------------------------------------------------------------------------------

/// Pass-through, ranges and body faults, checked with a plain HTTP client (no bootsync).
#[test]
fn proxy_forwards_and_damages_registry_responses() {
    let reg = Registry::start();
    let proxy = Proxy::start(&reg.host());
    let blob = bytes(99, 300_000);
    let digest = reg.push_blob(REPO, &blob);
    let url = format!("http://{}{}", proxy.host(), blob_path(REPO, &digest));
    let get = |headers: &[(&str, &str)]| {
        http::request("GET", &url, headers, &[], Duration::from_secs(10))
    };

    // Unchanged.
    let r = get(&[]).unwrap();
    assert_eq!((r.status, r.body == blob), (200, true));
    // Ranges pass through.
    let r = get(&[("Range", "bytes=1000-")]).unwrap();
    assert_eq!(r.status, 206);
    assert!(r.body == blob[1000..]);

    // Each rule counts the requests it sees from when it was added: nth(1) is the next one.
    let rule = || Rule::get(&blob_path(REPO, &digest));
    // Cut: the client sees a truncated body.
    proxy.add(rule().nth(1).fault(Fault::CutAfter(5_000)));
    assert!(get(&[]).is_err(), "a cut response read as complete");
    // Flipped bit: same length, one byte differs.
    proxy.add(rule().nth(1).fault(Fault::FlipBits { at: 7, mask: 0xff }));
    let r = get(&[]).unwrap();
    assert_eq!(r.body.len(), blob.len());
    assert_eq!(r.body[7], blob[7] ^ 0xff);
    assert!(r.body[8..] == blob[8..] && r.body[..7] == blob[..7]);
    // Lying length: a clean, short body.
    proxy.add(rule().nth(1).fault(Fault::ShortBody(100)));
    let r = get(&[]).unwrap();
    assert_eq!((r.status, r.body.len()), (200, 100));
    assert!(r.body == blob[..100]);
    // Canned status.
    proxy.add(rule().nth(1).fault(Fault::too_many_requests(7)));
    let r = get(&[]).unwrap();
    assert_eq!((r.status, r.header("Retry-After")), (429, Some("7")));
    // Trickle: 300 kB in 100 kB pieces with 150 ms pauses.
    proxy.add(rule().nth(1).fault(Fault::Trickle {
        chunk: 100_000,
        pause: Duration::from_millis(150),
    }));
    let t = Instant::now();
    let r = get(&[]).unwrap();
    assert!(r.body == blob);
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    // Drop: no response at all.
    proxy.add(rule().nth(1).fault(Fault::Drop));
    assert!(get(&[]).is_err());
    // Delay before forwarding.
    proxy.add(
        rule()
            .nth(1)
            .fault(Fault::Delay(Duration::from_millis(300))),
    );
    let t = Instant::now();
    assert_eq!(get(&[]).unwrap().status, 200);
    assert!(t.elapsed() >= Duration::from_millis(300));

    assert!(proxy.wait_idle(Duration::from_secs(5)));
    let log = proxy.log();
    let dump = proxy.dump();
    assert_eq!(log.len(), 9, "{dump}");
    assert_eq!(log[1].range.as_deref(), Some("bytes=1000-"), "{dump}");
    assert_eq!(log[1].range_start(), Some(1000));
    assert_eq!(log[1].body_bytes, blob.len() as u64 - 1000, "{dump}");
    assert_eq!(
        (log[2].body_bytes, &log[2].end),
        (5_000, &End::Faulted),
        "{dump}"
    );
    assert_eq!(log[4].content_length, Some(100), "{dump}");
    assert_eq!(
        (log[7].status, &log[7].end),
        (None, &End::Faulted),
        "{dump}"
    );
    assert!(log.iter().all(|e| e.method == "GET"));
}

/// Chunked responses are decoded, damaged at body offsets and re-chunked; keep-alive works.
#[test]
fn proxy_handles_chunked_responses_and_keep_alive() {
    // A tiny upstream that answers every request with the same chunked body, then closes.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        for _ in 0..3 {
            let (mut s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            while r.read_line(&mut line).unwrap() > 0 && line != "\r\n" {
                line.clear();
            }
            s.write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                  5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: 1\r\n\r\n",
            )
            .unwrap();
        }
    });
    let proxy = Proxy::start(&upstream);
    proxy.add(Rule::get("/flip").fault(Fault::FlipBits { at: 6, mask: 0x20 }));
    proxy.add(Rule::get("/short").fault(Fault::ShortBody(4)));

    // Three requests on one keep-alive connection.
    let mut conn = std::net::TcpStream::connect(proxy.host()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut bodies = Vec::new();
    for path in ["/plain", "/flip", "/short"] {
        write!(conn, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut chunked = false;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked")
            {
                chunked = true;
            }
            if line == "\r\n" {
                break;
            }
        }
        assert!(chunked, "{path}: response not chunked");
        let mut body = Vec::new();
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut data = vec![0u8; n + 2];
            std::io::Read::read_exact(&mut reader, &mut data).unwrap();
            if n == 0 {
                break;
            }
            body.extend_from_slice(&data[..n]);
        }
        bodies.push(String::from_utf8(body).unwrap());
    }
    assert_eq!(bodies, ["hello world", "hello World", "hell"]);
    drop(conn);
    server.join().unwrap();
    assert!(proxy.wait_idle(Duration::from_secs(5)));
    let log = proxy.log();
    assert_eq!(log.len(), 3, "{}", proxy.dump());
    assert!(
        log.iter().all(|e| e.conn == log[0].conn),
        "{}",
        proxy.dump()
    );
    assert_eq!(
        log.iter().map(|e| e.body_bytes).collect::<Vec<_>>(),
        [11, 11, 4]
    );
}
