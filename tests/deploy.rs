//! Deployment files: the systemd units (`systemd-analyze verify`, the `security` rating),
//! `deploy/install.sh` into a scratch root (idempotent, keeps an edited config), and
//! `deploy/cloud-init.yaml` (header, written files, runcmd references, embedded config and script).
//!
//! Needs `systemd-analyze` (Debian package `systemd`; it works without systemd running as PID 1)
//! and `/bin/kill` (package `procps`, named by `ExecReload=`). Missing tools fail the tests with
//! the package to install; they are never skipped. The install tests run as root (CI does), since
//! `systemd-tmpfiles` gives the scratch root's directories to the `bootsync` user.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic: a panic is a failure

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_bootsync");
const UNITS: [&str; 2] = ["bootsync.service", "bootsync-once.service"];
/// Where the units in the repository expect the binary.
const UNIT_BIN: &str = "/usr/local/bin/bootsync";
const MAX_EXPOSURE: f64 = 1.5;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `systemd-analyze`, or a failure that says what to install.
fn systemd_analyze() -> PathBuf {
    find_tool("systemd-analyze").unwrap_or_else(|| {
        panic!(
            "systemd-analyze not found: install the `systemd` package \
             (apt-get install -y systemd; .ci/run does) - these tests are not skipped"
        )
    })
}

fn text(out: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed\n{}", text(&out));
    out
}

/// Runs `systemd-analyze verify` on unit files; fails on a non-zero exit or any message about
/// them (unknown keys and bad values are only warnings with exit code 0).
fn verify_units(files: &[PathBuf]) {
    assert!(
        Path::new("/bin/kill").is_file(),
        "/bin/kill (ExecReload= of bootsync.service) is missing: install the `procps` package \
         (apt-get install -y procps; .ci/run does)"
    );
    let out = run(Command::new(systemd_analyze())
        .arg("verify")
        .arg("--man=no")
        .args(files)
        // No D-Bus, no running manager: verify loads the units by itself.
        .env("SYSTEMD_LOG_COLOR", "0"));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let about_us: Vec<&str> = all.lines().filter(|l| l.contains("bootsync")).collect();
    assert!(
        out.status.success() && about_us.is_empty(),
        "systemd-analyze verify {files:?} complained:\n{}",
        text(&out)
    );
}

/// Copies the units to `dir` with `ExecStart=` pointing at `bin`, so verify finds an executable.
fn units_with_binary(src_dir: &Path, dir: &Path, bin: &str) -> Vec<PathBuf> {
    UNITS
        .iter()
        .map(|u| {
            let body = fs::read_to_string(src_dir.join(u)).unwrap();
            assert!(body.contains(UNIT_BIN), "{u} does not run {UNIT_BIN}");
            let dst = dir.join(u);
            fs::write(&dst, body.replace(UNIT_BIN, bin)).unwrap();
            dst
        })
        .collect()
}

/// `deploy/prometheus/bootsync-rules.yml` passes `promtool check rules`, and its unit tests
/// (`bootsync-rules.test.yml`, series shaped like bootsync's /metrics) pass `promtool test rules`.
/// `tests/networks.rs` checks that every series the rules name is in a live daemon's /metrics.
#[test]
fn alert_rules_pass_promtool() {
    let promtool = find_tool("promtool").unwrap_or_else(|| {
        panic!(
            "promtool not found: install the `prometheus` package (apt-get install -y prometheus)"
        )
    });
    let dir = repo().join("deploy/prometheus");
    let check = run_ok(
        Command::new(&promtool)
            .args(["check", "rules", "bootsync-rules.yml"])
            .current_dir(&dir),
    );
    assert!(
        text(&check).contains("SUCCESS: 6 rules found"),
        "{}",
        text(&check)
    );
    let test = run_ok(
        Command::new(&promtool)
            .args(["test", "rules", "bootsync-rules.test.yml"])
            .current_dir(&dir),
    );
    assert!(text(&test).contains("SUCCESS"), "{}", text(&test));
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let files = units_with_binary(&repo().join("systemd"), tmp.path(), BIN);
    verify_units(&files);

    // The check itself works: a broken unit is reported.
    let bad = tmp.path().join("bad");
    fs::create_dir(&bad).unwrap();
    let broken = units_with_binary(&repo().join("systemd"), &bad, "/nonexistent/bootsync");
    let out = run(Command::new(systemd_analyze())
        .args(["verify", "--man=no"])
        .arg(&broken[0]));
    assert!(
        !out.status.success(),
        "verify accepted a missing binary\n{}",
        text(&out)
    );
}

/// Every `Key=value` in a unit file (later assignments append).
fn unit_keys(path: &Path) -> BTreeMap<String, Vec<String>> {
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in fs::read_to_string(path).unwrap().lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        keys.entry(k.trim().into())
            .or_default()
            .push(v.trim().into());
    }
    keys
}

#[test]
fn units_declare_what_the_daemon_relies_on() {
    let d = repo().join("systemd");
    let main = unit_keys(&d.join("bootsync.service"));
    let once = unit_keys(&d.join("bootsync-once.service"));
    let one = |m: &BTreeMap<String, Vec<String>>, k: &str| -> String {
        m.get(k).unwrap_or_else(|| panic!("{k}= missing")).join(" ")
    };
    assert_eq!(one(&main, "Type"), "notify");
    assert_eq!(one(&main, "NotifyAccess"), "main");
    assert_eq!(one(&main, "WatchdogSec"), "2min");
    assert_eq!(one(&main, "Restart"), "on-failure");
    assert!(main.contains_key("RestartSec"));
    assert_eq!(one(&main, "ExecReload"), "/bin/kill -HUP $MAINPID");
    assert!(one(&main, "ExecStart").ends_with(" run"));
    assert!(one(&main, "After").contains("bootsync-once.service"));
    assert_eq!(one(&once, "Type"), "oneshot");
    assert!(one(&once, "ExecStart").ends_with(" sync --once"));
    assert_eq!(one(&once, "Before"), "matchbox.service");
    for (name, u) in [
        ("bootsync.service", &main),
        ("bootsync-once.service", &once),
    ] {
        assert!(one(u, "After").contains("network-online.target"), "{name}");
        assert!(one(u, "Wants").contains("network-online.target"), "{name}");
        assert_eq!(one(u, "User"), "bootsync", "{name}");
        assert!(!u.contains_key("DynamicUser"), "{name}");
        assert_eq!(one(u, "ProtectSystem"), "strict", "{name}");
        assert_eq!(
            one(u, "ReadWritePaths"),
            "/var/lib/matchbox/assets -/var/lib/matchbox/profiles",
            "{name}"
        );
        assert_eq!(one(u, "StateDirectory"), "bootsync", "{name}");
        assert_eq!(one(u, "NoNewPrivileges"), "yes", "{name}");
        assert_eq!(one(u, "CapabilityBoundingSet"), "", "{name}");
        assert_eq!(
            one(u, "RestrictAddressFamilies"),
            "AF_INET AF_INET6 AF_UNIX",
            "{name}"
        );
        assert_eq!(
            one(u, "UMask"),
            "0022",
            "{name}: matchbox must read what bootsync writes"
        );
        assert_eq!(one(u, "WantedBy"), "multi-user.target", "{name}");
    }
}

/// The number in "Overall exposure level for X: 1.1 OK".
fn exposure(unit: &Path) -> (f64, String) {
    let out = run_ok(
        Command::new(systemd_analyze())
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(unit)
            .env("SYSTEMD_COLORS", "0"),
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level for"))
        .unwrap_or_else(|| panic!("no overall line in:\n{}", text(&out)))
        .to_string();
    let value = line
        .rsplit_once(": ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("cannot parse exposure from {line:?}"));
    (value, line)
}

#[test]
fn units_are_rated_at_most_1_5_by_systemd_analyze_security() {
    for u in UNITS {
        let (value, line) = exposure(&repo().join("systemd").join(u));
        eprintln!("{line}");
        assert!(
            value <= MAX_EXPOSURE,
            "{u}: exposure {value} > {MAX_EXPOSURE}: {line}"
        );
    }
}

// --- deploy/install.sh ---------------------------------------------------------------------------

fn install(destdir: &Path, extra_env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new("sh");
    cmd.arg(repo().join("deploy/install.sh"))
        .env("DESTDIR", destdir)
        .env("BOOTSYNC_BIN", BIN)
        .env_remove("PREFIX");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = run_ok(&mut cmd);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256(path: &Path) -> String {
    let out = run_ok(Command::new("sha256sum").arg(path));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Every entry below `root`: type, mode, owner, size, inode, mtime, ctime and (files) sha256.
/// Any rewrite, chmod or chown between two listings shows up in ctime or the inode.
fn listing(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let m = fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let kind = if m.is_dir() {
                "d".to_string()
            } else if m.file_type().is_symlink() {
                format!("l->{}", fs::read_link(&p).unwrap().display())
            } else {
                format!("f:{}", sha256(&p))
            };
            out.insert(
                rel,
                format!(
                    "{kind} mode={:o} uid={} gid={} size={} ino={} mtime={}.{} ctime={}.{}",
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    m.len(),
                    m.ino(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec()
                ),
            );
            if m.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// uid or gid of `name` in a passwd/group file.
fn id_in(file: &Path, name: &str) -> Option<u32> {
    fs::read_to_string(file).ok()?.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name)).then(|| f[2].parse().unwrap())
    })
}

/// The live system's account files (None where missing or unreadable).
fn host_accounts() -> Vec<(&'static str, Option<Vec<u8>>)> {
    ["/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow"]
        .into_iter()
        .map(|f| (f, fs::read(f).ok()))
        .collect()
}

#[test]
fn install_sh_into_destdir_is_complete_and_idempotent() {
    let host_before = host_accounts();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");

    let first = install(&root, &[]);
    assert!(
        first.contains("DESTDIR set: not calling systemctl"),
        "{first}"
    );

    // The binary, byte for byte and executable.
    let bin = root.join("usr/local/bin/bootsync");
    assert_eq!(sha256(&bin), sha256(Path::new(BIN)));
    assert_eq!(mode(&bin), 0o755);

    // Units, pointing at the installed binary; snippets; docs.
    let unitdir = root.join("usr/local/lib/systemd/system");
    for u in UNITS {
        let body = fs::read_to_string(unitdir.join(u)).unwrap();
        assert!(
            body.contains("ExecStart=/usr/local/bin/bootsync --config"),
            "{u}"
        );
        assert_eq!(mode(&unitdir.join(u)), 0o644);
    }
    for (src, dst) in [
        (
            "systemd/sysusers.d/bootsync.conf",
            "usr/local/lib/sysusers.d/bootsync.conf",
        ),
        (
            "systemd/tmpfiles.d/bootsync.conf",
            "usr/local/lib/tmpfiles.d/bootsync.conf",
        ),
        ("deploy/README.md", "usr/local/share/doc/bootsync/README.md"),
        (
            "config/bootsync.example.toml",
            "usr/local/share/doc/bootsync/bootsync.example.toml",
        ),
    ] {
        assert_eq!(
            fs::read(root.join(dst)).unwrap(),
            fs::read(repo().join(src)).unwrap(),
            "{dst}"
        );
    }

    // The units as installed still verify, with the installed binary.
    let vdir = tmp.path().join("verify");
    fs::create_dir(&vdir).unwrap();
    verify_units(&units_with_binary(&unitdir, &vdir, bin.to_str().unwrap()));

    // User and group in the scratch root only.
    let uid = id_in(&root.join("etc/passwd"), "bootsync").expect("bootsync in etc/passwd");
    let gid = id_in(&root.join("etc/group"), "bootsync").expect("bootsync in etc/group");
    let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(
        passwd.contains(":/var/lib/bootsync:/usr/sbin/nologin"),
        "{passwd}"
    );
    assert_eq!(
        host_accounts(),
        host_before,
        "the live system's accounts changed"
    );

    // Configuration: the example, readable by the group only; drop-in directory.
    let conf = root.join("etc/bootsync/bootsync.toml");
    assert_eq!(
        fs::read(&conf).unwrap(),
        fs::read(repo().join("config/bootsync.example.toml")).unwrap()
    );
    assert_eq!(mode(&conf), 0o640);
    for (p, want_mode, want_uid) in [
        ("etc/bootsync", 0o750, 0),
        ("etc/bootsync/config.d", 0o750, 0),
        ("etc/bootsync/bootsync.toml", 0o640, 0),
        ("var/lib/matchbox/assets", 0o755, uid),
        ("var/lib/bootsync", 0o750, uid),
    ] {
        let m = fs::metadata(root.join(p)).unwrap();
        assert_eq!(mode(&root.join(p)), want_mode, "{p}");
        assert_eq!(m.uid(), want_uid, "{p} owner");
        assert_eq!(m.gid(), gid, "{p} group");
    }

    // An operator edits the config; a second run changes nothing at all.
    let edited = format!(
        "{}\n# edited by the operator\n",
        fs::read_to_string(&conf).unwrap()
    );
    fs::write(&conf, &edited).unwrap();
    let before = listing(&root);
    let second = install(&root, &[]);
    assert!(second.contains("nothing to change"), "{second}");
    assert!(
        second.contains("kept existing /etc/bootsync/bootsync.toml"),
        "{second}"
    );
    let after = listing(&root);
    for (path, was) in &before {
        assert_eq!(after.get(path), Some(was), "second run changed {path}");
    }
    assert_eq!(
        after.keys().collect::<BTreeSet<_>>(),
        before.keys().collect::<BTreeSet<_>>(),
        "second run added or removed files"
    );
    assert_eq!(fs::read_to_string(&conf).unwrap(), edited);
    assert_eq!(
        host_accounts(),
        host_before,
        "the live system's accounts changed"
    );
}

#[test]
fn install_sh_honours_prefix_and_help() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    install(&root, &[("PREFIX", "/usr")]);
    assert!(root.join("usr/bin/bootsync").is_file());
    let unit = fs::read_to_string(root.join("usr/lib/systemd/system/bootsync.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/bin/bootsync --config"),
        "{unit}"
    );
    assert!(!unit.contains("/usr/local"), "{unit}");
    assert!(root.join("usr/lib/sysusers.d/bootsync.conf").is_file());
    assert!(root.join("usr/lib/tmpfiles.d/bootsync.conf").is_file());
    assert!(!root.join("usr/local").exists());

    // A prefix systemd does not search: units and snippets go below /etc.
    let root2 = tmp.path().join("root2");
    install(&root2, &[("PREFIX", "/opt/bootsync")]);
    assert!(root2.join("opt/bootsync/bin/bootsync").is_file());
    let unit = fs::read_to_string(root2.join("etc/systemd/system/bootsync.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/opt/bootsync/bin/bootsync --config"),
        "{unit}"
    );
    assert!(root2.join("etc/sysusers.d/bootsync.conf").is_file());

    let help = run_ok(
        Command::new("sh")
            .arg(repo().join("deploy/install.sh"))
            .arg("--help"),
    );
    let help = String::from_utf8_lossy(&help.stdout);
    for word in ["DESTDIR", "PREFIX", "BOOTSYNC_BIN", "--no-start"] {
        assert!(
            help.contains(word),
            "--help does not mention {word}:\n{help}"
        );
    }
    let bad = run(Command::new("sh")
        .arg(repo().join("deploy/install.sh"))
        .arg("--bogus"));
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));

    let missing = run(Command::new("sh")
        .arg(repo().join("deploy/install.sh"))
        .env("DESTDIR", tmp.path().join("root3"))
        .env("BOOTSYNC_BIN", tmp.path().join("no-such-binary")));
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("BOOTSYNC_BIN"));
}

#[test]
fn install_sh_is_valid_shell() {
    for shell in ["bash", "sh"] {
        run_ok(
            Command::new(shell)
                .arg("-n")
                .arg(repo().join("deploy/install.sh")),
        );
    }
    let m = mode(&repo().join("deploy/install.sh"));
    assert!(
        m & 0o111 != 0,
        "deploy/install.sh is not executable ({m:o})"
    );
}

// --- deploy/cloud-init.yaml ----------------------------------------------------------------------

/// The parts of cloud-init.yaml these tests need, read by a deliberately small parser: top-level
/// keys, `write_files` items (`- path:` then `content: |` block scalars), and `runcmd` items written
/// as flow sequences (`- [a, b, "c d"]`).
struct CloudInit {
    top_keys: Vec<String>,
    files: BTreeMap<String, String>,
    runcmd: Vec<Vec<String>>,
}

fn indent(l: &str) -> usize {
    l.len() - l.trim_start().len()
}

fn flow_seq(s: &str) -> Vec<String> {
    let inner = s
        .trim()
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or_else(|| panic!("runcmd entry is not a [..] list: {s}"));
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in inner.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                items.push(cur.trim().to_string());
                cur.clear();
            }
            _ => cur.push(c),
        }
    }
    assert!(!quoted, "unbalanced quote in {s}");
    items.push(cur.trim().to_string());
    items
}

fn parse_cloud_init(src: &str) -> CloudInit {
    let lines: Vec<&str> = src.lines().collect();
    let mut ci = CloudInit {
        top_keys: vec![],
        files: BTreeMap::new(),
        runcmd: vec![],
    };
    let mut section = String::new();
    let mut path: Option<String> = None;
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        assert!(!l.contains('\t'), "tab in cloud-init.yaml line {}", i + 1);
        let t = l.trim();
        if t.is_empty() || t.starts_with('#') {
            i += 1;
            continue;
        }
        if indent(l) == 0 {
            let key = t
                .strip_suffix(':')
                .unwrap_or_else(|| panic!("line {}: {l}", i + 1));
            section = key.to_string();
            ci.top_keys.push(section.clone());
        } else if section == "write_files" {
            if let Some(p) = t.strip_prefix("- path:") {
                path = Some(p.trim().to_string());
            } else if t == "content: |" {
                let base = indent(l);
                let mut body = String::new();
                i += 1;
                while i < lines.len() && (lines[i].trim().is_empty() || indent(lines[i]) > base) {
                    let line = lines[i];
                    body.push_str(line.get(base + 2..).unwrap_or(""));
                    body.push('\n');
                    i += 1;
                }
                let p = path.take().expect("content: before path:");
                ci.files.insert(p, body.trim_end().to_string() + "\n");
                continue;
            }
        } else if section == "runcmd" {
            let entry = t.strip_prefix("- ").expect("runcmd entry");
            ci.runcmd.push(flow_seq(entry));
        }
        i += 1;
    }
    ci
}

#[test]
fn cloud_init_is_consistent() {
    let src = fs::read_to_string(repo().join("deploy/cloud-init.yaml")).unwrap();
    assert!(
        src.starts_with("#cloud-config\n"),
        "first line must be #cloud-config"
    );
    let ci = parse_cloud_init(&src);
    assert_eq!(ci.top_keys, ["packages", "write_files", "runcmd"]);

    let conf_path = "/etc/bootsync/bootsync.toml";
    let fetch = "/usr/local/sbin/bootsync-fetch-install";
    for p in [conf_path, fetch, "/etc/default/bootsync-release"] {
        assert!(ci.files.contains_key(p), "write_files lacks {p}");
    }

    // Paths a runcmd entry may name: what write_files wrote, and what install.sh installs.
    let installed = ["/usr/local/bin/bootsync"];
    let units: BTreeSet<String> = fs::read_dir(repo().join("systemd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".service"))
        .collect();
    for entry in &ci.runcmd {
        for word in entry.iter().flat_map(|w| w.split_whitespace()) {
            if word.starts_with('/') && !word.starts_with("/dev/") {
                assert!(
                    ci.files.contains_key(word) || installed.contains(&word),
                    "runcmd {entry:?} names {word}, which cloud-init neither wrote nor installed"
                );
            }
            if word.ends_with(".service") && word != "matchbox.service" {
                assert!(
                    units.contains(word),
                    "runcmd {entry:?}: no unit {word} in systemd/"
                );
            }
        }
    }
    // The order that matters: install, then the one-shot pass, then the daemon.
    let pos = |needle: &str| {
        ci.runcmd
            .iter()
            .position(|e| e.join(" ").contains(needle))
            .unwrap_or_else(|| panic!("runcmd lacks {needle}"))
    };
    assert!(pos(fetch) < pos("start bootsync-once.service"));
    assert!(pos("start bootsync-once.service") < pos("enable --now bootsync.service"));
    assert!(pos("enable --now bootsync.service") < pos("matchbox.service"));

    // The configuration it writes is valid and is the demo target.
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("bootsync.toml");
    fs::write(&conf, &ci.files[conf_path]).unwrap();
    let out = run_ok(
        Command::new(BIN)
            .arg("--config")
            .arg(&conf)
            .arg("check-config"),
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    for want in [
        "ghcr.io/urmanac/talos-cozystack-demo:demo-stable",
        "[linux/arm64]",
        "/var/lib/matchbox/assets/talos/custom",
        "assets/talos/arm64/vmlinuz -> vmlinuz-arm64",
        "assets/talos/arm64/initramfs.xz -> initramfs-arm64.xz",
    ] {
        assert!(
            shown.contains(want),
            "check-config output lacks {want}:\n{shown}"
        );
    }

    // The fetch script is valid shell and runs the installer of the release it unpacks.
    let script = &ci.files[fetch];
    assert!(script.starts_with("#!/bin/sh\n"));
    assert!(script.contains("/release/deploy/install.sh\" --no-start"));
    let sp = tmp.path().join("fetch.sh");
    fs::write(&sp, script).unwrap();
    run_ok(Command::new("sh").arg("-n").arg(&sp));
}

/// The fetch script end to end: a release tarball laid out as deploy/README.md says, fetched
/// from a file:// URL with its sha256 checked, installed into a scratch root.
#[test]
fn cloud_init_fetch_script_installs_a_release_tarball() {
    assert!(
        find_tool("curl").is_some(),
        "curl not found: install the `curl` package (the fetch script uses it)"
    );
    let src = fs::read_to_string(repo().join("deploy/cloud-init.yaml")).unwrap();
    let ci = parse_cloud_init(&src);
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();

    // bootsync/{target/release/bootsync,systemd,deploy,config}
    let stage = t.join("stage/bootsync");
    fs::create_dir_all(stage.join("target/release")).unwrap();
    fs::copy(BIN, stage.join("target/release/bootsync")).unwrap();
    for dir in ["systemd", "deploy", "config"] {
        run_ok(
            Command::new("cp")
                .arg("-a")
                .arg(repo().join(dir))
                .arg(&stage),
        );
    }
    let arch = String::from_utf8(run_ok(Command::new("uname").arg("-m")).stdout).unwrap();
    let arch = arch.trim();
    let tarball = t.join(format!("bootsync-{arch}-linux.tar.gz"));
    run_ok(
        Command::new("tar")
            .arg("-cf")
            .arg(&tarball)
            .arg("--use-compress-program=gzip -1")
            .arg("-C")
            .arg(t.join("stage"))
            .arg("bootsync"),
    );

    // The env file as cloud-init writes it, with the operator's URL and sum filled in.
    let env_src = &ci.files["/etc/default/bootsync-release"];
    assert!(
        env_src.contains("REPLACE-ME"),
        "placeholder URL expected in the shipped file"
    );
    let url = format!("file://{}/bootsync-%ARCH%-linux.tar.gz", t.display());
    let env_file = t.join("bootsync-release");
    let env_body: String = env_src
        .lines()
        .map(|l| {
            if l.starts_with("BOOTSYNC_RELEASE_URL=") {
                format!("BOOTSYNC_RELEASE_URL=\"{url}\"\n")
            } else if l.starts_with(&format!("BOOTSYNC_RELEASE_SHA256_{arch}=")) {
                format!("BOOTSYNC_RELEASE_SHA256_{arch}=\"{}\"\n", sha256(&tarball))
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    fs::write(&env_file, env_body).unwrap();
    let script = t.join("bootsync-fetch-install");
    fs::write(&script, &ci.files["/usr/local/sbin/bootsync-fetch-install"]).unwrap();

    let root = t.join("root");
    let fetch = |env: &Path| {
        run(Command::new("sh")
            .arg(&script)
            .env("BOOTSYNC_RELEASE_ENV", env)
            .env("BOOTSYNC_RELEASE_DIR", t.join("opt"))
            .env("DESTDIR", &root)
            .env_remove("BOOTSYNC_BIN")
            .env_remove("PREFIX"))
    };
    let out = fetch(&env_file);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        sha256(&root.join("usr/local/bin/bootsync")),
        sha256(Path::new(BIN))
    );
    assert!(root
        .join("usr/local/lib/systemd/system/bootsync-once.service")
        .is_file());
    assert!(root.join("etc/bootsync/bootsync.toml").is_file());
    assert!(t.join("opt/release/deploy/install.sh").is_file());

    // A wrong sum stops it before anything is installed.
    let bad_env = t.join("bad-release");
    let body = fs::read_to_string(&env_file).unwrap();
    let bad_body: String = body
        .lines()
        .map(|l| {
            if l.starts_with(&format!("BOOTSYNC_RELEASE_SHA256_{arch}=")) {
                format!("BOOTSYNC_RELEASE_SHA256_{arch}=\"{}\"\n", "0".repeat(64))
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    fs::write(&bad_env, bad_body).unwrap();
    fs::remove_dir_all(&root).unwrap();
    let out = fetch(&bad_env);
    assert!(
        !out.status.success(),
        "a wrong sha256 was accepted\n{}",
        text(&out)
    );
    assert!(!root.join("usr/local/bin/bootsync").exists());

    // The shipped placeholder is refused with a clear message.
    let shipped = t.join("shipped-release");
    fs::write(&shipped, env_src).unwrap();
    let out = fetch(&shipped);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("set BOOTSYNC_RELEASE_URL"),
        "{}",
        text(&out)
    );
}

#[test]
fn matchbox_examples_point_at_bootsyncs_stable_names() {
    let profile =
        fs::read_to_string(repo().join("deploy/matchbox/profiles/talos-arm64.json")).unwrap();
    let group = fs::read_to_string(repo().join("deploy/matchbox/groups/talos-arm64.json")).unwrap();
    // Whitespace-insensitive: `"key": "value"` pairs as matchbox's JSON schema names them.
    let flat = |s: &str| s.split_whitespace().collect::<String>();
    let (profile, group) = (flat(&profile), flat(&group));
    for want in [
        r#""id":"talos-arm64""#,
        r#""kernel":"/assets/talos/custom/vmlinuz-arm64""#,
        r#""initrd":["/assets/talos/custom/initramfs-arm64.xz"]"#,
        r#""talos.platform=metal""#,
        r#""console=ttyAMA0""#,
        r#""init_on_alloc=1""#,
        r#""slab_nomerge""#,
        r#""pti=on""#,
        r#""printk.devkmsg=on""#,
    ] {
        assert!(profile.contains(want), "profile lacks {want}: {profile}");
    }
    assert!(group.contains(r#""profile":"talos-arm64""#), "{group}");
    for doc in [&profile, &group] {
        assert!(doc.starts_with('{') && doc.ends_with('}'), "{doc}");
        assert_eq!(doc.matches('{').count(), doc.matches('}').count(), "{doc}");
        assert_eq!(doc.matches('[').count(), doc.matches(']').count(), "{doc}");
    }
}
