//! nginx as a stand-in for matchbox's asset server: `/assets/` served from a directory,
//! following symlinks, opening the path on every request (no open-file cache).
//!
//! Needs Debian's `nginx` (`/usr/sbin/nginx`, or `BOOTSYNC_TEST_NGINX_BIN`). A missing binary
//! fails the test with what to install; it is never skipped.

use super::http;
use super::registry::{free_port, tail};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const DEFAULT_NGINX_BIN: &str = "/usr/sbin/nginx";

/// The nginx binary, or a panic that says how to get it.
pub fn require() -> PathBuf {
    let candidates: Vec<PathBuf> = match std::env::var_os("BOOTSYNC_TEST_NGINX_BIN") {
        Some(p) => vec![PathBuf::from(p)],
        None => {
            let path = std::env::var_os("PATH").unwrap_or_default();
            std::env::split_paths(&path)
                .map(|d| d.join("nginx"))
                .chain([PathBuf::from(DEFAULT_NGINX_BIN)])
                .collect()
        }
    };
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "nginx not found (looked in PATH and {DEFAULT_NGINX_BIN}): the serving tests \
                 need it as a stand-in for matchbox's asset server. Install Debian's nginx \
                 (`apt-get install -y nginx`) or set BOOTSYNC_TEST_NGINX_BIN; this test is \
                 not skipped"
            )
        })
}

/// One nginx master (foreground, `daemon off`) with its own config, pid file and logs in a
/// temp dir; stopped on drop.
pub struct Nginx {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Serves `assets_root` at `http://127.0.0.1:PORT/assets/`. When running as root, workers
    /// run as `nobody:nogroup`, so `assets_root` and its parents must be world-readable.
    pub fn start(assets_root: &Path) -> Nginx {
        let bin = require();
        let dir = tempfile::Builder::new()
            .prefix("bootsync-nginx-")
            .tempdir()
            .expect("temp dir for nginx");
        let mut last = String::new();
        for _ in 0..5 {
            match Self::try_start(&bin, &dir, assets_root) {
                Ok((child, port)) => return Nginx { child, port, dir },
                Err(e) if e.contains("Address already in use") => last = e,
                Err(e) => panic!("{e}"),
            }
        }
        panic!("{last}");
    }

    fn try_start(bin: &Path, dir: &tempfile::TempDir, root: &Path) -> Result<(Child, u16), String> {
        let port = free_port();
        let d = dir.path();
        let error_log = d.join(format!("error-{port}.log"));
        // SAFETY: geteuid has no preconditions.
        let as_root = unsafe { libc::geteuid() } == 0;
        let user = if as_root {
            "user nobody nogroup;\n"
        } else {
            ""
        };
        let conf = format!(
            "{user}daemon off;\n\
             master_process on;\n\
             worker_processes 2;\n\
             pid {pid};\n\
             error_log {err} warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
               access_log off;\n\
               default_type application/octet-stream;\n\
               client_body_temp_path {d}/client_body;\n\
               proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n\
               uwsgi_temp_path {d}/uwsgi;\n\
               scgi_temp_path {d}/scgi;\n\
               keepalive_timeout 0;\n\
               server {{\n\
                 listen 127.0.0.1:{port};\n\
                 location /assets/ {{\n\
                   alias {root}/;\n\
                   disable_symlinks off;\n\
                 }}\n\
               }}\n\
             }}\n",
            pid = d.join("nginx.pid").display(),
            err = error_log.display(),
            d = d.display(),
            root = root.display(),
        );
        let conf_path = d.join("nginx.conf");
        fs::write(&conf_path, conf).unwrap();
        let out_path = d.join(format!("stderr-{port}.log"));
        let out = fs::File::create(&out_path).unwrap();
        let mut child = Command::new(bin)
            .arg("-p")
            .arg(d)
            .arg("-e")
            .arg(&error_log)
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {bin:?}: {e}"));
        let url = format!("http://127.0.0.1:{port}/");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "nginx exited early ({status}) on port {port}; stderr:\n{}\nerror log:\n{}",
                    tail(&out_path, 20),
                    tail(&error_log, 20)
                ));
            }
            if http::request("GET", &url, &[], &[], Duration::from_secs(2)).is_ok() {
                return Ok((child, port));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "nginx did not answer on {url} within 15 s; error log:\n{}",
                    tail(&error_log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn error_log_tail(&self) -> String {
        let logs: Vec<PathBuf> = fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("error-"))
            })
            .collect();
        logs.iter()
            .map(|p| tail(p, 20))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: fast shutdown; the master stops its workers first (a SIGKILLed master would
        // leave them running).
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
