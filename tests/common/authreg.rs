//! A CNCF distribution registry with htpasswd (Basic) auth, serving the storage of an open
//! [`Registry`](super::Registry): images are pushed to the open one and pulled from this one.
//!
//! ```ignore
//! let open = Registry::start();
//! open.push_image(REPO, &image, Some("stable"));
//! let auth = AuthRegistry::start(&open.root(), "robot", "s3cret");
//! auth.set_password("robot", "n3w");   // distribution re-reads the htpasswd file on change
//! ```

use super::http;
use super::registry::{free_port, tail, DEFAULT_REGISTRY_BIN};
use base64::Engine as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A bcrypt (`$2b$`) hash of `password`, the only kind distribution's htpasswd accepts, made by
/// the system `crypt(3)` through perl (libxcrypt supports bcrypt).
pub fn bcrypt(password: &str) -> String {
    let out = Command::new("perl")
        .arg("-e")
        .arg("print crypt($ARGV[0], q{$2b$05$abcdefghijklmnopqrstuv})")
        .arg(password)
        .output()
        .unwrap_or_else(|e| panic!("perl (for a bcrypt hash) cannot run: {e}"));
    let hash = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && hash.starts_with("$2b$05$") && hash.len() == 60,
        "perl's crypt() did not make a bcrypt hash (got {hash:?}); this libc lacks bcrypt"
    );
    hash
}

/// `Basic <base64(user:password)>`
pub fn basic_header(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

pub struct AuthRegistry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    log_path: PathBuf,
}

impl AuthRegistry {
    /// Serves `root` (another registry's storage) on a free port, for `user:password` only.
    pub fn start(root: &Path, user: &str, password: &str) -> AuthRegistry {
        let bin = std::env::var("BOOTSYNC_TEST_REGISTRY_BIN")
            .unwrap_or_else(|_| DEFAULT_REGISTRY_BIN.to_string());
        let dir = tempfile::Builder::new()
            .prefix("bootsync-authreg-")
            .tempdir()
            .expect("temp dir for the auth registry");
        let htpasswd = dir.path().join("htpasswd");
        fs::write(&htpasswd, format!("{user}:{}\n", bcrypt(password))).unwrap();
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let config = dir.path().join("config.yml");
            fs::write(
                &config,
                format!(
                    "version: 0.1\n\
                     log: {{level: info}}\n\
                     storage:\n  filesystem: {{rootdirectory: {root}}}\n\
                     http: {{addr: 127.0.0.1:{port}, secret: bootsync-test-only}}\n\
                     auth:\n  htpasswd: {{realm: test, path: {htpasswd}}}\n",
                    root = root.display(),
                    htpasswd = htpasswd.display()
                ),
            )
            .unwrap();
            let log_path = dir.path().join(format!("registry-{port}.log"));
            let log = fs::File::create(&log_path).unwrap();
            let mut child = Command::new(&bin)
                .arg("serve")
                .arg(&config)
                .env_remove("REGISTRY_HTTP_ADDR")
                .env_remove("REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start registry binary {bin:?}: {e}"));
            let url = format!("http://127.0.0.1:{port}/v2/");
            let deadline = Instant::now() + Duration::from_secs(20);
            let up = loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break false;
                }
                if let Ok(r) = http::request("GET", &url, &[], &[], Duration::from_secs(2)) {
                    if r.status == 401 {
                        break true;
                    }
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "auth registry did not answer 401 on {url}; log:\n{}",
                        tail(&log_path, 30)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            if up {
                let reg = AuthRegistry {
                    child,
                    port,
                    dir,
                    log_path,
                };
                reg.wait_login(user, password);
                return reg;
            }
            last = tail(&log_path, 30);
            if !last.contains("address already in use") {
                panic!("auth registry exited early; log:\n{last}");
            }
        }
        panic!("auth registry could not bind a port; log:\n{last}");
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log_path, lines)
    }

    /// Replaces the htpasswd file (distribution notices the new modification time) and waits
    /// until the new password is accepted.
    pub fn set_password(&self, user: &str, password: &str) {
        let path = self.dir.path().join("htpasswd");
        let tmp = self.dir.path().join("htpasswd.tmp");
        fs::write(&tmp, format!("{user}:{}\n", bcrypt(password))).unwrap();
        fs::rename(&tmp, &path).unwrap();
        self.wait_login(user, password);
    }

    /// The status of `GET /v2/` with these credentials.
    pub fn login_status(&self, user: &str, password: &str) -> u16 {
        let auth = basic_header(user, password);
        http::request(
            "GET",
            &format!("http://{}/v2/", self.host()),
            &[("Authorization", &auth)],
            &[],
            Duration::from_secs(5),
        )
        .map(|r| r.status)
        .unwrap_or(0)
    }

    fn wait_login(&self, user: &str, password: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.login_status(user, password) != 200 {
            assert!(
                Instant::now() < deadline,
                "the auth registry does not accept the new password; log:\n{}",
                self.log_tail(20)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for AuthRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
