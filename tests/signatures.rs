//! Boot only what the publisher signed: `[target.verify]` against signatures made by tools
//! nobody here wrote. cosign v2 `.sig` attachments (cosign's format, signed by `openssl`,
//! pushed with the registry API) and cosign v3 keyless bundles (sigstore-js, its local Fulcio,
//! Rekor and TSA, attached with @sigstore/oci; its verifier as a cross-check), on images built
//! by umoci and pushed by skopeo to a real registry (CNCF distribution, which has no referrers
//! API: bundles are found through the referrers tag schema). A refused image costs no layer
//! download and publishes nothing; what was served keeps serving.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic: a panic is a failure

#[allow(unused_imports)] // each test binary uses a different part of the harness
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::authfront::AuthFront;
use common::producers::*;
use common::proxy::{Fault, Proxy, Rule};
use common::signing::*;
use common::*;
use serde_json::{json, Value};

const NAME: &str = "talos";
const ACCEPT_ALL: &str =
    "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// An installer image pushed by umoci + skopeo.
struct Img {
    repo: String,
    tag: String,
    /// What the tag resolves to.
    digest: String,
    layers: Vec<String>,
    kernel: Vec<u8>,
    initramfs: Vec<u8>,
}

impl Img {
    fn reference(&self, host: &str) -> String {
        format!("{host}/{}:{}", self.repo, self.tag)
    }

    /// GETs of this image's layers at the registry (a refused image must cost none).
    fn layer_gets(&self, reg: &Registry) -> usize {
        self.layers
            .iter()
            .map(|l| reg.blob_gets_of(&self.repo, l))
            .sum()
    }
}

fn head_digest(reg: &Registry, repo: &str, tag: &str) -> String {
    let r = http::request(
        "HEAD",
        &reg.url(&format!("/v2/{repo}/manifests/{tag}")),
        &[("Accept", ACCEPT_ALL)],
        &[],
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(r.status, 200, "HEAD {repo}:{tag}");
    r.header("Docker-Content-Digest").unwrap().to_string()
}

fn push_image(reg: &Registry, repo: &str, tag: &str, seed: u64) -> Img {
    let kernel = fake_kernel("arm64", seed, 60_000);
    let initramfs = fake_initramfs(seed + 1, 80_000);
    let u = Umoci::new();
    u.insert_file(
        "/etc/os-release",
        format!("VERSION_ID=v1.{seed}\n").as_bytes(),
    )
    .insert_file("/usr/install/arm64/vmlinuz", &kernel)
    .insert_file("/usr/install/arm64/initramfs.xz", &initramfs);
    u.push(&format!("docker://{}/{repo}:{tag}", reg.host()));
    let digest = head_digest(reg, repo, tag);
    let m = get_manifest(reg, repo, &digest, ACCEPT_ALL).json();
    let layers = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    Img {
        repo: repo.into(),
        tag: tag.into(),
        digest,
        layers,
        kernel,
        initramfs,
    }
}

/// A config syncing `img` with the `[target.verify]` lines in `verify` (empty: none).
fn config(work: &Work, reg: &Registry, img: &Img, verify: &str) -> PathBuf {
    config_with(work, reg, &img.reference(&reg.host()), verify, "").0
}

/// The config file, and the address its API listens on.
fn config_with(
    work: &Work,
    reg: &Registry,
    reference: &str,
    verify: &str,
    extra: &str,
) -> (PathBuf, String) {
    let state = work.path().join("state");
    let tail = if verify.is_empty() {
        extra.to_string()
    } else {
        format!("{extra}[target.verify]\n{verify}\n")
    };
    let t = TargetCfg::new(NAME, reference, &work.dest(NAME))
        .preset("talos-installer")
        .extra(&tail);
    let cfg = Config::new().registry(&reg.host()).target(t);
    let file = work.write_config(
        "bootsync.toml",
        &format!(
            "state_dir = {}\n{}",
            q(state.to_str().unwrap()),
            cfg.render()
        ),
    );
    (file, cfg.listen.clone())
}

fn keys(list: &[&Key]) -> String {
    let files: Vec<String> = list.iter().map(|k| q(k.public.to_str().unwrap())).collect();
    format!("keys = [{}]\n", files.join(", "))
}

fn identity(root: &Path, issuer: &str, subject_regexp: &str) -> String {
    format!(
        "trusted_root = {}\nidentities = [{{ issuer = {}, subject_regexp = {} }}]\n",
        q(root.to_str().unwrap()),
        q(issuer),
        q(subject_regexp)
    )
}

fn meta(work: &Work, digest: &str) -> Value {
    read_meta(&work.dest(NAME), digest)
}

/// The version `current` points at, by its manifest.
fn current_meta(work: &Work) -> Value {
    let dest = work.dest(NAME);
    serde_json::from_slice(&fs::read(dest.join("current/.bootsync.json")).unwrap()).unwrap()
}

#[track_caller]
fn assert_serves(work: &Work, img: &Img) {
    let dest = work.dest(NAME);
    assert_eq!(fs::read(dest.join("vmlinuz-arm64")).unwrap(), img.kernel);
    assert_eq!(
        fs::read(dest.join("initramfs-arm64.xz")).unwrap(),
        img.initramfs
    );
    assert_eq!(current_meta(work)["tag_digest"], json!(img.digest));
}

/// A sync of `cfg` fails naming the target, the digest and `words`, publishes nothing and
/// downloads no layer of `img`.
#[track_caller]
fn assert_refused(work: &Work, cfg: &Path, reg: &Registry, img: &Img, what: &str, words: &[&str]) {
    let out = work.sync_once(cfg);
    out.assert_code(1);
    let mut must: Vec<&str> = vec![NAME, &img.digest];
    must.extend_from_slice(words);
    out.assert_stderr_has(&must);
    assert_nothing_published(&work.dest(NAME));
    assert_eq!(img.layer_gets(reg), 0, "{what}: a layer was downloaded");
}

/// The manifest (or index) at `reference` of `repo`, as the registry serves it.
fn get_manifest(reg: &Registry, repo: &str, reference: &str, accept: &str) -> http::Response {
    http::request(
        "GET",
        &reg.url(&format!("/v2/{repo}/manifests/{reference}")),
        &[("Accept", accept)],
        &[],
        Duration::from_secs(10),
    )
    .unwrap()
}

/// A cosign v2 signature of `digest` in `repo` by `key`.
fn sign_v2(reg: &Registry, repo: &str, digest: &str, key: &Key) {
    push_sig(
        reg,
        repo,
        digest,
        &[SigLayer::signed(key, payload("r", digest))],
    );
}

// ---------------------------------------------------------------------------------------------
// cosign v2 signatures (`sha256-<hex>.sig`)
// ---------------------------------------------------------------------------------------------

#[test]
fn a_v2_signature_by_the_configured_key_publishes_and_names_the_key() {
    let reg = Registry::start();
    let work = Work::new();
    let key = Key::generate(work.path(), "release", "p256");
    let img = push_image(&reg, "urmanac/talos", "demo-stable", 1);
    let reference = format!("{}/{}", reg.host(), img.repo);
    push_sig(
        &reg,
        &img.repo,
        &img.digest,
        &[SigLayer::signed(&key, payload(&reference, &img.digest))],
    );
    let cfg = config(&work, &reg, &img, &keys(&[&key]));
    work.run(&cfg, &["check-config"]).assert_success();
    work.sync_once(&cfg).assert_success();
    assert_serves(&work, &img);
    let signature = &meta(&work, current_meta(&work)["digest"].as_str().unwrap())["signature"];
    assert_eq!(signature["kind"], json!("key"));
    assert_eq!(signature["key"], json!(key.fingerprint()));
    assert_eq!(signature["key_file"], json!(key.public.to_str().unwrap()));
    assert_eq!(signature["format"], json!("cosign v2 signature"));
    // Every discovery path was asked, the .sig manifest with the OCI manifest type.
    let log = reg.log_tail(400);
    assert!(log.contains("/referrers/"), "{log}");
    assert!(
        log.contains(&format!("sha256-{}.sig", hex_of(&img.digest))),
        "{log}"
    );
}

#[test]
fn refused_v2_signatures_cost_no_layer_and_publish_nothing() {
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let key = Key::generate(dir.path(), "release", "p256");
    let other = Key::generate(dir.path(), "other", "p256");
    let other_img = push_image(&reg, "t/other", "1", 50);
    // (what, the signatures pushed for the image, words the error must hold)
    type Sign = fn(&Key, &Key, &Img, &Img) -> Vec<SigLayer>;
    let cases: Vec<(&str, Sign, &[&str])> = vec![
        (
            "signed by another key",
            |_, other, img, _| vec![SigLayer::signed(other, payload("r", &img.digest))],
            &["signed by an unknown key"],
        ),
        (
            "unsigned",
            |_, _, _, _| Vec::new(),
            &[
                "not signed",
                "no signature found",
                "referrers API: 404",
                ".sig: none",
            ],
        ),
        (
            "a signature copied from another image",
            |key, _, _, copied_from| vec![SigLayer::signed(key, payload("r", &copied_from.digest))],
            &["copied from another image"],
        ),
        (
            "a signature over other bytes than its payload",
            |key, _, img, _| {
                let mut l = SigLayer::signed(key, payload("r", &img.digest));
                l.payload = payload("registry.example/else", &img.digest);
                vec![l]
            },
            &["signed by an unknown key"],
        ),
    ];
    for (i, (what, sign, words)) in cases.into_iter().enumerate() {
        let img = push_image(&reg, &format!("t/refused{i}"), "1", 10 + i as u64);
        let layers = sign(&key, &other, &img, &other_img);
        if !layers.is_empty() {
            push_sig(&reg, &img.repo, &img.digest, &layers);
        }
        let work = Work::new();
        let cfg = config(&work, &reg, &img, &keys(&[&key]));
        assert_refused(&work, &cfg, &reg, &img, what, words);
    }
}

#[test]
fn key_rotation_and_the_other_key_types_cosign_verifies() {
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let old = Key::generate(dir.path(), "old", "p256");
    for (i, kind) in ["p256", "rsa", "ed25519", "p384"].into_iter().enumerate() {
        let new = Key::generate(dir.path(), &format!("new-{kind}"), kind);
        let img = push_image(&reg, &format!("t/rotation-{kind}"), "1", 100 + i as u64);
        sign_v2(&reg, &img.repo, &img.digest, &new);
        let work = Work::new();
        // Two keys configured, signed by the second: any one is enough.
        let cfg = config(&work, &reg, &img, &keys(&[&old, &new]));
        let out = work.sync_once(&cfg);
        assert_eq!(out.code, Some(0), "{kind}: {}", out.describe());
        assert_serves(&work, &img);
        assert_eq!(
            current_meta(&work)["signature"]["key"],
            json!(new.fingerprint()),
            "{kind}"
        );
    }
}

#[test]
fn a_tag_moved_to_an_unsigned_image_keeps_the_signed_one_serving() {
    let reg = Registry::start();
    let work = Work::new();
    let key = Key::generate(work.path(), "release", "p256");
    let v1 = push_image(&reg, "t/moved", "stable", 1);
    sign_v2(&reg, &v1.repo, &v1.digest, &key);
    let cfg = config(&work, &reg, &v1, &keys(&[&key]));
    work.sync_once(&cfg).assert_success();
    assert_serves(&work, &v1);

    let v2 = push_image(&reg, "t/moved", "stable", 2);
    assert_ne!(v1.digest, v2.digest);
    let out = work.sync_once(&cfg);
    out.assert_code(1)
        .assert_stderr_has(&[&v2.digest, "not signed"]);
    assert_serves(&work, &v1);
    assert_eq!(versions(&work.dest(NAME)).len(), 1);
    assert_eq!(
        v2.layer_gets(&reg),
        0,
        "a layer of the unsigned image was downloaded"
    );

    // Signed now: it publishes.
    sign_v2(&reg, &v2.repo, &v2.digest, &key);
    work.sync_once(&cfg).assert_success();
    assert_serves(&work, &v2);
}

#[test]
fn a_policy_added_later_verifies_what_is_served_and_rollback_refuses_unverified_versions() {
    let reg = Registry::start();
    let work = Work::new();
    let key = Key::generate(work.path(), "release", "p256");
    let v1 = push_image(&reg, "t/later", "stable", 1);
    let no_policy = config(&work, &reg, &v1, "");
    work.sync_once(&no_policy).assert_success();
    assert!(current_meta(&work).get("signature").is_none());
    let v2 = push_image(&reg, "t/later", "stable", 2);
    work.sync_once(&no_policy).assert_success();
    assert_serves(&work, &v2);

    // The policy arrives; v2 (served) is unsigned: the sync fails, v2 keeps serving.
    let cfg = config(&work, &reg, &v2, &keys(&[&key]));
    let gets = v2.layer_gets(&reg);
    work.sync_once(&cfg)
        .assert_code(1)
        .assert_stderr_has(&[&v2.digest, "not signed"]);
    assert_serves(&work, &v2);
    // Rolling back to v1, published without a check, is refused under the policy.
    let out = work.run(&cfg, &["rollback", NAME]);
    out.assert_code(1)
        .assert_stderr_has(&["not signed as the target's [verify] policy asks"]);
    assert_serves(&work, &v2);

    // Signed now: the sync records who signed what is served, without a download.
    sign_v2(&reg, &v2.repo, &v2.digest, &key);
    work.sync_once(&cfg).assert_success();
    assert_serves(&work, &v2);
    assert_eq!(
        v2.layer_gets(&reg),
        gets,
        "recording a signature downloaded a layer"
    );
    assert_eq!(
        current_meta(&work)["signature"]["key"],
        json!(key.fingerprint())
    );
}

#[test]
fn the_registry_hides_sig_tags_from_a_plain_accept_and_has_no_referrers_api() {
    // What CNCF distribution answers, which discovery must not read as "unsigned".
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let key = Key::generate(dir.path(), "release", "p256");
    let img = push_image(&reg, "t/semantics", "1", 7);
    sign_v2(&reg, &img.repo, &img.digest, &key);
    let sig = format!(
        "/v2/{}/manifests/sha256-{}.sig",
        img.repo,
        hex_of(&img.digest)
    );
    let plain = http::request("GET", &reg.url(&sig), &[], &[], Duration::from_secs(10)).unwrap();
    assert_eq!(plain.status, 404, "{}", plain.text());
    assert!(
        plain.text().contains("MANIFEST_UNKNOWN"),
        "{}",
        plain.text()
    );
    let sig_tag = format!("sha256-{}.sig", hex_of(&img.digest));
    let oci = get_manifest(
        &reg,
        &img.repo,
        &sig_tag,
        "application/vnd.oci.image.manifest.v1+json",
    );
    assert_eq!(oci.status, 200);
    let referrers = http::request(
        "GET",
        &reg.url(&format!("/v2/{}/referrers/{}", img.repo, img.digest)),
        &[],
        &[],
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(referrers.status, 404);
    // And bootsync finds the signature all the same.
    let work = Work::new();
    work.sync_once(&config(&work, &reg, &img, &keys(&[&key])))
        .assert_success();
    assert_serves(&work, &img);
}

#[test]
fn the_signer_reaches_status_metrics_the_hook_and_inspect() {
    let reg = Registry::start();
    let work = Work::new();
    let key = Key::generate(work.path(), "release", "p256");
    let img = push_image(&reg, "t/observed", "stable", 3);
    sign_v2(&reg, &img.repo, &img.digest, &key);
    let env_file = work.path().join("hook.env");
    let hook = format!(
        "hook = [\"/bin/sh\", \"-c\", {}]\n",
        q(&format!("env | grep ^BOOTSYNC_ > {}", env_file.display()))
    );
    let (cfg, listen) = config_with(
        &work,
        &reg,
        &img.reference(&reg.host()),
        &keys(&[&key]),
        &hook,
    );
    let mut daemon = work.spawn_run(&cfg, &listen);
    let st = daemon.wait_status("a signed publish", Duration::from_secs(60), |v| {
        status_target(v, NAME).is_some_and(|t| !t["published"].is_null())
    });
    let t = status_target(&st, NAME).unwrap();
    assert!(
        t["verify"].as_str().unwrap().contains(&key.fingerprint()),
        "{t}"
    );
    assert_eq!(t["published"]["signature"]["key"], json!(key.fingerprint()));
    let metrics = daemon.get("/metrics").unwrap().text();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("bootsync_published_info{"))
        .unwrap_or_else(|| panic!("no published_info in\n{metrics}"));
    assert!(line.contains(&key.fingerprint()), "{line}");
    assert!(
        metrics.contains(&format!(
            "bootsync_signature_checks_total{{target=\"{NAME}\",result=\"verified\"}} 1"
        )),
        "{metrics}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !env_file.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let env = fs::read_to_string(&env_file).unwrap();
    assert!(
        env.contains(&format!("BOOTSYNC_SIGNER_KEY={}", key.fingerprint())),
        "{env}"
    );
    assert!(env.contains("BOOTSYNC_SIGNED_BY=key sha256:"), "{env}");
    drop(daemon);

    // inspect shows the signature it finds, before any policy exists.
    let out = run_bin(
        &[
            "inspect".into(),
            "--insecure".into(),
            img.reference(&reg.host()),
        ],
        Duration::from_secs(60),
    );
    assert!(
        out.stdout.contains("cosign v2 signature, key"),
        "{}",
        out.describe()
    );

    // Without a policy, /status says so.
    let work = Work::new();
    let (cfg, listen) = config_with(&work, &reg, &img.reference(&reg.host()), "", "");
    let mut daemon = work.spawn_run(&cfg, &listen);
    let st = daemon.wait_status("an unverified publish", Duration::from_secs(60), |v| {
        status_target(v, NAME).is_some_and(|t| !t["published"].is_null())
    });
    let t = status_target(&st, NAME).unwrap();
    assert_eq!(t["verify"], json!("unverified"));
    assert!(t["published"]["signature"].is_null());
}

#[test]
fn bad_verify_config_is_a_config_error() {
    let reg = Registry::start();
    let work = Work::new();
    let img = Img {
        repo: "t/x".into(),
        tag: "1".into(),
        digest: String::new(),
        layers: Vec::new(),
        kernel: Vec::new(),
        initramfs: Vec::new(),
    };
    let not_a_key = work.path().join("not-a-key.pub");
    fs::write(&not_a_key, "hello").unwrap();
    for (verify, words) in [
        (
            format!("keys = [{}]", q(not_a_key.to_str().unwrap())),
            vec!["verify", "not a PEM public key"],
        ),
        (
            "keys = [\"/nonexistent/release.pub\"]".to_string(),
            vec!["verify", "/nonexistent/release.pub"],
        ),
        (
            format!(
                "identities = [{{ issuer = {}, subject = \"x\" }}]",
                q(ISSUER)
            ),
            vec!["trusted_root"],
        ),
        ("".to_string(), vec!["set `keys`"]),
        ("keyz = []".to_string(), vec!["unknown field"]),
    ] {
        let verify = if verify.is_empty() {
            " ".to_string()
        } else {
            verify
        };
        let cfg = config(&work, &reg, &img, &verify);
        let mut must: Vec<&str> = vec![];
        must.extend(words.iter());
        work.check_config(&cfg)
            .assert_code(2)
            .assert_stderr_has(&must);
    }
}

// ---------------------------------------------------------------------------------------------
// cosign v3 keyless bundles (sigstore-js)
// ---------------------------------------------------------------------------------------------

/// Where sigstore-js pushes: @sigstore/oci signs in before it pushes and expects the
/// registry to challenge it (GHCR does; an open distribution answers 202 and no challenge),
/// so it pushes through a token-auth front on the same registry.
fn push_front(reg: &Registry) -> AuthFront {
    AuthFront::start(&reg.host(), "push")
}

fn bundle_job(img: &Img, front: &AuthFront, tamper: bool) -> Value {
    json!({
        "digest": img.digest,
        "attach_to": img.digest,
        "image": format!("{}/{}", front.host(), img.repo),
        "tamper": tamper,
    })
}

#[test]
fn a_keyless_bundle_attached_as_a_referrer_publishes_with_its_identity() {
    let reg = Registry::start();
    let work = Work::new();
    let img = push_image(&reg, "urmanac/talos-cozystack-demo", "demo-stable", 1);
    let front = push_front(&reg);
    let signed = sigstore_sign(
        &work.path().join("sjs"),
        json!({ "tsa": true, "sign": [bundle_job(&img, &front, false)] }),
    );
    // sigstore-js attached it through the referrers tag schema (distribution has no API).
    let referrers_tag = format!("sha256-{}", hex_of(&img.digest));
    let index = get_manifest(
        &reg,
        &img.repo,
        &referrers_tag,
        "application/vnd.oci.image.index.v1+json",
    );
    assert_eq!(index.status, 200, "no referrers tag: {}", index.text());
    assert_eq!(
        index.json()["manifests"][0]["artifactType"],
        json!("application/vnd.dev.sigstore.bundle.v0.3+json")
    );
    // The independent verifier agrees.
    sigstore_js_verify(
        &signed.bundles[0],
        &signed.trusted_root,
        &img.digest,
        ISSUER,
        "^https://github.com/urmanac/",
        None,
    )
    .unwrap();

    let cfg = config(
        &work,
        &reg,
        &img,
        &identity(&signed.trusted_root, ISSUER, "^https://github.com/urmanac/"),
    );
    work.sync_once(&cfg).assert_success();
    assert_serves(&work, &img);
    let signature = &current_meta(&work)["signature"];
    assert_eq!(signature["kind"], json!("keyless"));
    assert_eq!(signature["issuer"], json!(ISSUER));
    assert_eq!(signature["subject"], json!(SUBJECT));
    assert_eq!(signature["format"], json!("cosign v3 bundle"));
    assert!(
        signature["source"]
            .as_str()
            .unwrap()
            .starts_with("referrer sha256:"),
        "{signature}"
    );

    // An exact subject matches as well.
    let work = Work::new();
    let cfg = config(
        &work,
        &reg,
        &img,
        &format!(
            "trusted_root = {}\nidentities = [{{ issuer = {}, subject = {} }}]\n",
            q(signed.trusted_root.to_str().unwrap()),
            q(ISSUER),
            q(SUBJECT)
        ),
    );
    work.sync_once(&cfg).assert_success();
}

#[test]
fn refused_keyless_bundles_agree_with_sigstore_js_and_cost_no_layer() {
    let reg = Registry::start();
    let scratch = tempfile::tempdir().unwrap();
    let another = push_image(&reg, "t/another", "1", 90);
    // (what, the job's signing, the policy's issuer and subject regexp, words in the error)
    let cases: Vec<(&str, Value, &str, &str, &[&str])> = vec![
        (
            "wrong issuer",
            json!({}),
            "https://accounts.google.com",
            "^https://github.com/urmanac/",
            &["identity mismatch", ISSUER, "https://accounts.google.com"],
        ),
        (
            "subject not matching the regexp",
            json!({}),
            ISSUER,
            "^https://github.com/siderolabs/",
            &["identity mismatch", SUBJECT],
        ),
        (
            "a bundle for another digest",
            json!({ "digest": another.digest }),
            ISSUER,
            "^https://github.com/urmanac/",
            &["not signed as the policy requires", "artifact mismatch"],
        ),
        (
            "a tampered signature",
            // Without a TSA, whose stamp over the signature would give it away first.
            json!({ "tamper": true, "tsa": false }),
            ISSUER,
            "^https://github.com/urmanac/",
            &["not signed as the policy requires", "signature"],
        ),
        (
            "a certificate used outside its validity",
            json!({ "ca_clock": "2024-01-01T00:00:00Z" }),
            ISSUER,
            "^https://github.com/urmanac/",
            &[
                "not signed as the policy requires",
                "certificate",
                "expired",
            ],
        ),
        (
            "an attestation that is not an image signature",
            json!({ "predicate_type": "https://slsa.dev/provenance/v1" }),
            ISSUER,
            "^https://github.com/urmanac/",
            &["https://slsa.dev/provenance/v1", "not an image signature"],
        ),
    ];
    for (i, (what, tweak, issuer, subject_re, words)) in cases.into_iter().enumerate() {
        let img = push_image(&reg, &format!("t/keyless{i}"), "1", 200 + 2 * i as u64);
        let front = push_front(&reg);
        let mut job = bundle_job(&img, &front, false);
        let mut top = json!({ "tsa": true });
        for (k, v) in tweak.as_object().unwrap() {
            match k.as_str() {
                "ca_clock" | "tsa" => top[k] = v.clone(),
                _ => job[k] = v.clone(),
            }
        }
        top["sign"] = json!([job]);
        let signed = sigstore_sign(&scratch.path().join(format!("case{i}")), top);
        let js = sigstore_js_verify(
            &signed.bundles[0],
            &signed.trusted_root,
            &img.digest,
            issuer,
            subject_re,
            None,
        );
        assert!(js.is_err(), "{what}: sigstore-js accepts it");

        let work = Work::new();
        let cfg = config(
            &work,
            &reg,
            &img,
            &identity(&signed.trusted_root, issuer, subject_re),
        );
        assert_refused(&work, &cfg, &reg, &img, what, words);
    }
}

#[test]
fn a_message_signature_bundle_over_the_manifest_is_a_signature_too() {
    let reg = Registry::start();
    let work = Work::new();
    let img = push_image(&reg, "t/message", "1", 5);
    let manifest = get_manifest(&reg, &img.repo, &img.digest, ACCEPT_ALL).body;
    let artifact = work.path().join("manifest.json");
    fs::write(&artifact, &manifest).unwrap();
    let front = push_front(&reg);
    let signed = sigstore_sign(
        &work.path().join("sjs"),
        json!({ "sign": [{
            "message": base64_of(&manifest),
            "attach_to": img.digest,
            "image": format!("{}/{}", front.host(), img.repo),
        }]}),
    );
    sigstore_js_verify(
        &signed.bundles[0],
        &signed.trusted_root,
        &img.digest,
        ISSUER,
        "^https://github.com/urmanac/",
        Some(&artifact),
    )
    .unwrap();
    let cfg = config(
        &work,
        &reg,
        &img,
        &identity(&signed.trusted_root, ISSUER, "^https://github.com/urmanac/"),
    );
    work.sync_once(&cfg).assert_success();
    assert_serves(&work, &img);
}

fn base64_of(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[test]
fn ghcr_style_referrers_redirects_and_429s_fall_back_to_the_tag_schema() {
    let reg = Registry::start();
    let img = push_image(&reg, "t/ghcr", "1", 9);
    let scratch = tempfile::tempdir().unwrap();
    let front = push_front(&reg);
    let signed = sigstore_sign(
        scratch.path(),
        json!({ "sign": [bundle_job(&img, &front, false)] }),
    );
    let dead = free_port();
    for fault in [
        Fault::Respond {
            status: 303,
            headers: vec![(
                "Location".into(),
                format!("http://127.0.0.1:{dead}/rate-limited"),
            )],
            body: Vec::new(),
        },
        Fault::too_many_requests(60),
        Fault::status(500),
    ] {
        let proxy = Proxy::start(&reg.host());
        proxy.add(Rule::get("/referrers/").every().fault(fault.clone()));
        let work = Work::new();
        let reference = format!("{}/{}:{}", proxy.host(), img.repo, img.tag);
        let state = work.path().join("state");
        let t = TargetCfg::new(NAME, &reference, &work.dest(NAME))
            .preset("talos-installer")
            .extra(&format!(
                "[target.verify]\n{}",
                identity(&signed.trusted_root, ISSUER, "^https://github.com/urmanac/")
            ));
        let cfg = work.write_config(
            "bootsync.toml",
            &format!(
                "state_dir = {}\n{}",
                q(state.to_str().unwrap()),
                Config::new().registry(&proxy.host()).target(t).render()
            ),
        );
        let out = work.sync_once(&cfg);
        assert_eq!(out.code, Some(0), "{fault:?}: {}", out.describe());
        assert_serves(&work, &img);
        // The API was asked once (no retries of a 429 or a 5xx: there is a fallback).
        assert_eq!(proxy.exchanges_to("/referrers/").len(), 1, "{fault:?}");
        assert_eq!(
            proxy
                .exchanges_to(&format!("/manifests/sha256-{}", hex_of(&img.digest)))
                .iter()
                .filter(|e| !e.path.ends_with(".sig"))
                .count(),
            1,
            "{fault:?}: the tag schema was not asked"
        );
    }
}

#[test]
fn a_multi_arch_tag_needs_the_signature_of_its_index_as_cosign_sign_recursive_makes() {
    let reg = Registry::start();
    let work = Work::new();
    let key = Key::generate(work.path(), "release", "p256");
    let arm = push_image(&reg, "t/multi", "arm64", 1);
    // An index over it, made by buildah (`buildah manifest`), pushed at `stable`.
    let c = Containers::new();
    let host = reg.host();
    c.buildah(&["manifest", "create", "release"]);
    c.buildah(&[
        "manifest",
        "add",
        "--tls-verify=false",
        "--os",
        "linux",
        "--arch",
        "arm64",
        "release",
        &format!("docker://{host}/t/multi:arm64"),
    ]);
    c.buildah(&[
        "manifest",
        "push",
        "--all",
        "--quiet",
        "--tls-verify=false",
        "--format",
        "oci",
        "release",
        &format!("docker://{host}/t/multi:stable"),
    ]);
    let index_digest = head_digest(&reg, "t/multi", "stable");
    let index = get_manifest(&reg, "t/multi", &index_digest, ACCEPT_ALL).json();
    let platform_digest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(index_digest, platform_digest);
    let img = Img {
        tag: "stable".into(),
        digest: index_digest.clone(),
        ..arm
    };
    // Signed the platform manifest only: the tag's digest (the index) is unsigned.
    sign_v2(&reg, "t/multi", &platform_digest, &key);
    let cfg = config(&work, &reg, &img, &keys(&[&key]));
    work.sync_once(&cfg)
        .assert_code(1)
        .assert_stderr_has(&[&index_digest, "not signed"]);
    assert_nothing_published(&work.dest(NAME));
    // `cosign sign --recursive` signs the index as well: it publishes.
    sign_v2(&reg, "t/multi", &index_digest, &key);
    work.sync_once(&cfg).assert_success();
    assert_serves(&work, &img);
    assert_eq!(current_meta(&work)["digest"], json!(platform_digest));
}

#[test]
fn the_daemon_picks_up_a_replaced_key_file_without_a_reload_by_hand() {
    let reg = Registry::start();
    let work = Work::new();
    let keys_dir = tempfile::tempdir().unwrap(); // outside the config's directory
    let old = Key::generate(keys_dir.path(), "old", "p256");
    let new = Key::generate(keys_dir.path(), "new", "p256");
    let configured = keys_dir.path().join("release.pub");
    fs::copy(&old.public, &configured).unwrap();
    let img = push_image(&reg, "t/rotated", "stable", 4);
    sign_v2(&reg, &img.repo, &img.digest, &new);
    let verify = format!("keys = [{}]\n", q(configured.to_str().unwrap()));
    let (cfg, listen) = config_with(&work, &reg, &img.reference(&reg.host()), &verify, "");
    let mut daemon = work.spawn_run(&cfg, &listen);
    daemon.wait_status("a refusal", Duration::from_secs(60), |v| {
        status_target(v, NAME).is_some_and(|t| {
            t["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("unknown key"))
        })
    });
    // The operator rotates the key file in place (a rename, as editors and installers do).
    let tmp = keys_dir.path().join(".release.pub.tmp");
    fs::copy(&new.public, &tmp).unwrap();
    fs::rename(&tmp, &configured).unwrap();
    let st = daemon.wait_status(
        "a publish under the new key",
        Duration::from_secs(60),
        |v| status_target(v, NAME).is_some_and(|t| !t["published"].is_null()),
    );
    let t = status_target(&st, NAME).unwrap();
    assert_eq!(t["published"]["signature"]["key"], json!(new.fingerprint()));
    assert!(daemon.log_tail().contains("config changed on disk"));
}
