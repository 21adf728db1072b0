//! A real CNCF distribution registry (`docker-registry serve`) per test.

use super::data::digest_of;
use super::http;
use super::image::{index_json, BuiltImage, Format, Image};
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const DEFAULT_REGISTRY_BIN: &str = "/usr/bin/docker-registry";

pub struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    log_path: PathBuf,
}

/// A free TCP port on 127.0.0.1 (bound once and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .unwrap()
        .port()
}

pub fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e| format!("<cannot read {path:?}: {e}>"));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Registry {
    pub fn start() -> Registry {
        Self::start_with("")
    }

    /// A pull-through cache (distribution's `proxy` mode) of the registry at `upstream_url`
    /// (`http://127.0.0.1:PORT`): read-only, fetching what it lacks from there.
    pub fn start_mirror(upstream_url: &str) -> Registry {
        Self::start_with(&format!("proxy: {{remoteurl: {upstream_url}}}\n"))
    }

    /// Stops the registry (its port then refuses connections).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// A registry with `extra` YAML appended to its config.
    pub fn start_with(extra: &str) -> Registry {
        let bin = std::env::var("BOOTSYNC_TEST_REGISTRY_BIN")
            .unwrap_or_else(|_| DEFAULT_REGISTRY_BIN.to_string());
        if bin.contains('/') && !Path::new(&bin).exists() {
            panic!(
                "registry binary {bin} not found: the end-to-end tests need CNCF distribution \
                 (`apt-get install -y docker-registry`), or set BOOTSYNC_TEST_REGISTRY_BIN"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("bootsync-registry-")
            .tempdir()
            .expect("temp dir for the registry");
        let mut last_err = String::new();
        for _attempt in 0..5 {
            match Self::try_start(&bin, &dir, extra) {
                Ok((child, port, log_path)) => {
                    return Registry {
                        child,
                        port,
                        dir,
                        log_path,
                    }
                }
                // Another process took the free port between probing and binding: try another.
                Err(e) if e.contains("address already in use") => last_err = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("{last_err}");
    }

    fn try_start(
        bin: &str,
        dir: &tempfile::TempDir,
        extra: &str,
    ) -> Result<(Child, u16, PathBuf), String> {
        let port = free_port();
        let root = dir.path().join("data");
        fs::create_dir_all(&root).unwrap();
        let config = dir.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\n\
                 log: {{level: info}}\n\
                 storage:\n  filesystem: {{rootdirectory: {root}}}\n  delete: {{enabled: true}}\n\
                 http: {{addr: 127.0.0.1:{port}, secret: bootsync-test-only}}\n{extra}",
                root = root.display()
            ),
        )
        .unwrap();
        let log_path = dir.path().join(format!("registry-{port}.log"));
        let log = fs::File::create(&log_path).unwrap();
        let mut child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .env_remove("REGISTRY_HTTP_ADDR")
            .env_remove("REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start registry binary {bin:?}: {e}. The end-to-end tests need CNCF \
                     distribution (`apt-get install -y docker-registry`), or set \
                     BOOTSYNC_TEST_REGISTRY_BIN"
                )
            });
        let url = format!("http://127.0.0.1:{port}/v2/");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = tail(&log_path, 30);
                return Err(format!(
                    "registry {bin} exited early ({status}) on port {port}; log tail:\n{log}"
                ));
            }
            if let Ok(r) = http::request("GET", &url, &[], &[], Duration::from_secs(2)) {
                if r.status == 200 {
                    return Ok((child, port, log_path));
                }
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "registry {bin} did not answer 200 on {url} within 20 s; log tail:\n{}",
                    tail(&log_path, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.host(), path)
    }

    /// The storage root (`rootdirectory`).
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path, lines)
    }

    /// Waits until the log stops growing (the registry writes its access line when a handler
    /// returns, which can be a moment after the client saw the last byte).
    fn settle_log(&self) -> String {
        let mut last = fs::read_to_string(&self.log_path).unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            std::thread::sleep(Duration::from_millis(150));
            let now = fs::read_to_string(&self.log_path).unwrap_or_default();
            if now.len() == last.len() || Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }

    /// Access-log request lines (`"GET /v2/... HTTP/1.1"`) for `method` and `path_prefix`.
    pub fn requests(&self, method: &str, path_prefix: &str) -> Vec<String> {
        let needle = format!("\"{method} {path_prefix}");
        self.settle_log()
            .lines()
            .filter(|l| l.contains(&needle))
            .map(|l| l.to_string())
            .collect()
    }

    /// Number of `GET /v2/<repo>/blobs/sha256:...` requests served so far (configs and layers).
    pub fn blob_gets(&self, repo: &str) -> usize {
        self.requests("GET", &format!("/v2/{repo}/blobs/sha256:"))
            .len()
    }

    /// Number of `GET /v2/<repo>/blobs/<digest>` requests served so far.
    pub fn blob_gets_of(&self, repo: &str, digest: &str) -> usize {
        let needle = format!("\"GET /v2/{repo}/blobs/{digest} ");
        self.settle_log()
            .lines()
            .filter(|l| l.contains(&needle))
            .count()
    }

    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.root()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Flips 16 bytes in the middle of the stored blob (same length). Distribution serves it
    /// without re-verifying, so the client must notice the digest mismatch.
    pub fn corrupt_blob(&self, digest: &str) {
        let path = self.blob_path(digest);
        let mut data = fs::read(&path).unwrap_or_else(|e| panic!("read blob {path:?}: {e}"));
        assert!(data.len() >= 64, "blob {digest} too small to corrupt");
        let mid = data.len() / 2;
        for b in &mut data[mid..mid + 16] {
            *b ^= 0xA5;
        }
        fs::write(&path, &data).unwrap();
        assert_ne!(digest_of(&data), digest);
    }

    // ---- pushing ----

    pub fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = digest_of(data);
        let r = http::request(
            "POST",
            &self.url(&format!("/v2/{repo}/blobs/uploads/")),
            &[],
            &[],
            Duration::from_secs(30),
        )
        .expect("POST blob upload");
        assert_eq!(r.status, 202, "start upload: {} {}", r.status, r.text());
        let location = r.header("Location").expect("upload Location").to_string();
        let location = if location.starts_with('/') {
            self.url(&location)
        } else {
            location
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let put_url = format!("{location}{sep}digest={digest}");
        let r = http::request(
            "PUT",
            &put_url,
            &[("Content-Type", "application/octet-stream")],
            data,
            Duration::from_secs(60),
        )
        .expect("PUT blob");
        assert_eq!(
            r.status,
            201,
            "finish upload of {digest}: {} {}",
            r.status,
            r.text()
        );
        digest
    }

    /// PUTs manifest `bytes` at `reference` (a tag or a digest); returns its digest.
    pub fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> String {
        let digest = digest_of(bytes);
        let r = http::request(
            "PUT",
            &self.url(&format!("/v2/{repo}/manifests/{reference}")),
            &[("Content-Type", media_type)],
            bytes,
            Duration::from_secs(30),
        )
        .expect("PUT manifest");
        assert_eq!(
            r.status,
            201,
            "push manifest {repo}:{reference}: {} {}",
            r.status,
            r.text()
        );
        if let Some(d) = r.header("Docker-Content-Digest") {
            assert_eq!(d, digest, "registry computed another manifest digest");
        }
        digest
    }

    /// Pushes layers, config and manifest (by digest, and at `tag` if given).
    pub fn push_image(&self, repo: &str, image: &Image, tag: Option<&str>) -> BuiltImage {
        let built = image.build();
        self.push_built(repo, &built, tag);
        built
    }

    pub fn push_built(&self, repo: &str, built: &BuiltImage, tag: Option<&str>) {
        for l in &built.layers {
            self.push_blob(repo, &l.blob);
        }
        self.push_blob(repo, &built.config);
        self.push_manifest(repo, &built.digest, built.media_type, &built.manifest);
        if let Some(tag) = tag {
            self.push_manifest(repo, tag, built.media_type, &built.manifest);
        }
    }

    /// Pushes every image by digest, then an OCI index / Docker manifest list over them at `tag`.
    /// Returns (index digest, built images in the given order).
    pub fn push_index(
        &self,
        repo: &str,
        format: Format,
        images: &[Image],
        tag: &str,
    ) -> (String, Vec<BuiltImage>) {
        let built: Vec<BuiltImage> = images
            .iter()
            .map(|i| self.push_image(repo, i, None))
            .collect();
        let refs: Vec<&BuiltImage> = built.iter().collect();
        let (bytes, media_type) = index_json(format, &refs);
        let digest = self.push_manifest(repo, tag, media_type, &bytes);
        (digest, built)
    }

    /// Deletes a tag's manifest (by digest) — not needed by most tests.
    pub fn delete_manifest(&self, repo: &str, digest: &str) {
        let r = http::request(
            "DELETE",
            &self.url(&format!("/v2/{repo}/manifests/{digest}")),
            &[],
            &[],
            Duration::from_secs(10),
        )
        .expect("DELETE manifest");
        assert_eq!(r.status, 202, "delete manifest: {} {}", r.status, r.text());
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
