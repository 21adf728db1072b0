//! Images made by the tools people really use — buildah, umoci, skopeo, the Python ORAS client —
//! pushed to a real registry and synced; what bootsync publishes is compared byte for byte with
//! what a container runtime shows at that path (`podman create` + `podman cp`, as
//! `docker create` + `docker cp`), or with what `oras pull` writes. A Talos >= 1.10 style
//! installer carries a real UKI: Debian's arm64 kernel and systemd's EFI stub joined by objcopy.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic: a panic is a failure

#[allow(unused_imports)] // each test binary uses a different part of the harness
mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::producers::*;
use common::proxy::{self, Proxy};
use common::*;
use serde_json::Value;

fn reference(reg: &Registry, repo: &str, tag: &str) -> String {
    format!("{}/{repo}:{tag}", reg.host())
}

fn docker(reg: &Registry, repo: &str, tag: &str) -> String {
    format!("docker://{}", reference(reg, repo, tag))
}

/// The manifest (or index) a tag points at, as the registry serves it.
fn manifest(reg: &Registry, repo: &str, tag: &str) -> Value {
    let accept =
        "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, \
                  application/vnd.docker.distribution.manifest.list.v2+json, \
                  application/vnd.docker.distribution.manifest.v2+json";
    let r = http::request(
        "GET",
        &reg.url(&format!("/v2/{repo}/manifests/{tag}")),
        &[("Accept", accept)],
        &[],
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// What `version` published under `name`.
fn published(dest: &Path, name: &str) -> Vec<u8> {
    fs::read(dest.join(name)).unwrap_or_else(|e| panic!("{name} not published: {e}"))
}

/// Syncs `target` once against `reg`.
fn sync(work: &Work, reg: &Registry, target: TargetCfg) -> Outcome {
    let config = work.config(&Config::new().registry(&reg.host()).target(target));
    work.sync_once(&config)
}

#[test]
fn buildah_upper_layers_replace_files_and_hide_replaced_directories() {
    let reg = Registry::start();
    let c = Containers::new();
    let (old, new) = (
        fake_kernel("arm64", 1, 40_000),
        fake_kernel("arm64", 2, 40_000),
    );
    let base = c.from("scratch");
    base.write("a/b", b"lower b")
        .write("k/vmlinuz", &old)
        .write("keep/x", b"x");
    let base = base.commit("base");
    // Upper layer: the kernel replaced, the directory `a` replaced by a dangling symlink
    // (`rm -rf a; ln -s nowhere a`: its tar holds only `a -> nowhere`).
    let top = c.from(&base);
    top.write("k/vmlinuz", &new)
        .remove("a")
        .symlink("a", "nowhere");
    let image = top.commit("top");
    c.push(&image, &docker(&reg, "t/replace", "1"), &[]);
    let r = reference(&reg, "t/replace", "1");

    let work = Work::new();
    let dest = work.dest("k");
    sync(
        &work,
        &reg,
        TargetCfg::new("k", &r, &dest).file("k/vmlinuz", "vmlinuz"),
    )
    .assert_success();
    assert_eq!(published(&dest, "vmlinuz"), new);
    assert_eq!(c.container_file(&r, "/k/vmlinuz").unwrap(), new);

    // `a/b` is gone in the image: refused, naming the path and why; podman agrees it is gone.
    let work = Work::new();
    let dest = work.dest("a");
    sync(&work, &reg, TargetCfg::new("a", &r, &dest).file("a/b", "b"))
        .assert_code(1)
        .assert_stderr_has(&["a/b", "nowhere", "not in the image"]);
    assert!(c.container_file(&r, "/a/b").is_err());
    assert!(!dest.join("b").exists());
}

#[test]
fn umoci_directory_replaced_by_a_file_and_tars_without_end_blocks() {
    let reg = Registry::start();
    let u = Umoci::new();
    let kernel = fake_kernel("arm64", 3, 50_000);
    let initrd = fake_initramfs(4, 60_000);
    u.insert_dir("/a", &[("b", b"under a")])
        .insert_file("/a", b"a is a file now")
        .insert_file("/usr/install/arm64/vmlinuz", &kernel)
        .insert_file("/usr/install/arm64/initramfs.xz", &initrd);
    u.push(&docker(&reg, "t/umoci", "1"));
    let r = reference(&reg, "t/umoci", "1");

    // umoci 0.4.7 writes layers whose tar stops right after the last file's data.
    let m = manifest(&reg, "t/umoci", "1");
    let top = m["layers"].as_array().unwrap().last().unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let tar = {
        let mut out = Vec::new();
        let blob = fs::read(reg.blob_path(&top)).unwrap();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&blob[..]), &mut out).unwrap();
        out
    };
    assert!(
        tar.len() % 512 != 0 || tar[tar.len() - 1024..].iter().any(|&b| b != 0),
        "the umoci layer has its end-of-archive blocks: this case tests nothing"
    );

    let c = Containers::new();
    let work = Work::new();
    let dest = work.dest("talos");
    sync(
        &work,
        &reg,
        TargetCfg::new("talos", &r, &dest).preset("talos-installer"),
    )
    .assert_success();
    assert_eq!(published(&dest, "vmlinuz-arm64"), kernel);
    assert_eq!(
        c.container_file(&r, "/usr/install/arm64/vmlinuz").unwrap(),
        kernel
    );
    assert_eq!(published(&dest, "initramfs-arm64.xz"), initrd);

    let work = Work::new();
    let dest = work.dest("a");
    sync(&work, &reg, TargetCfg::new("a", &r, &dest).file("a", "a")).assert_success();
    assert_eq!(published(&dest, "a"), b"a is a file now");
    assert_eq!(c.container_file(&r, "/a").unwrap(), b"a is a file now");
    let work = Work::new();
    let dest = work.dest("ab");
    sync(
        &work,
        &reg,
        TargetCfg::new("ab", &r, &dest).file("a/b", "b"),
    )
    .assert_code(1)
    .assert_stderr_has(&["a/b", "not a directory"]);
    assert!(c.container_file(&r, "/a/b").is_err());
}

#[test]
fn whiteouts_and_opaque_directories_from_buildah() {
    let reg = Registry::start();
    let c = Containers::new();
    let base = c.from("scratch");
    base.write("d/x", b"x")
        .write("d/y", b"y")
        .write("f", b"f")
        .write("g", b"g");
    let base = base.commit("wbase");
    let top = c.from(&base);
    top.remove("f")
        .remove("d")
        .mkdir("d")
        .write("d/z", b"z, after the directory was emptied");
    let image = top.commit("wtop");
    c.push(&image, &docker(&reg, "t/wh", "1"), &[]);
    let r = reference(&reg, "t/wh", "1");

    let work = Work::new();
    let dest = work.dest("d");
    sync(&work, &reg, TargetCfg::new("d", &r, &dest).dir("d", "d")).assert_success();
    let listed: Vec<String> = fs::read_dir(dest.join("current/d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed, ["z"]);
    assert_eq!(
        c.container_file(&r, "/d/z").unwrap(),
        fs::read(dest.join("current/d/z")).unwrap()
    );
    assert!(c.container_file(&r, "/d/x").is_err());

    let work = Work::new();
    let dest = work.dest("f");
    sync(
        &work,
        &reg,
        TargetCfg::new("f", &r, &dest).file("f", "f").file("g", "g"),
    )
    .assert_code(1)
    .assert_stderr_has(&["f", "whiteout"]);
    assert!(c.container_file(&r, "/f").is_err());
}

#[test]
fn symlinked_and_hard_linked_kernels_publish_their_targets() {
    let reg = Registry::start();
    let c = Containers::new();
    let kernel = fake_kernel("arm64", 5, 60_000);
    let initrd = fake_initramfs(6, 70_000);
    let base = c.from("scratch");
    base.write("boot/vmlinuz-6.1", &kernel)
        .write("boot/initrd.img-6.1", &initrd);
    let base = base.commit("lbase");
    // Links in an upper layer: an absolute symlink, a relative one, and a hard link (`ln`)
    let top = c.from(&base);
    top.symlink("usr/install/arm64/vmlinuz", "/boot/vmlinuz-6.1")
        .symlink(
            "usr/install/arm64/initramfs.xz",
            "../../../boot/initrd.img-6.1",
        )
        .hardlink("assets/talos/arm64/vmlinuz", "boot/vmlinuz-6.1")
        .hardlink("assets/talos/arm64/initramfs.xz", "boot/initrd.img-6.1");
    let image = top.commit("ltop");
    c.push(&image, &docker(&reg, "t/links", "1"), &[]);
    let r = reference(&reg, "t/links", "1");

    for (name, preset, path) in [
        ("symlinked", "talos-installer", "/usr/install/arm64/vmlinuz"),
        ("hardlinked", "demo", "/assets/talos/arm64/vmlinuz"),
    ] {
        let work = Work::new();
        let dest = work.dest(name);
        sync(&work, &reg, TargetCfg::new(name, &r, &dest).preset(preset)).assert_success();
        assert_eq!(published(&dest, "vmlinuz-arm64"), kernel, "{name}");
        assert_eq!(published(&dest, "initramfs-arm64.xz"), initrd, "{name}");
        assert_eq!(c.container_file(&r, path).unwrap(), kernel, "{name}");
    }
}

/// One image per compression (a blob already in the registry would be reused as it is).
fn image_with(c: &Containers, seed: u64) -> (String, Vec<u8>, Vec<u8>) {
    let kernel = fake_kernel("arm64", seed, 80_000);
    let initrd = fake_initramfs(seed + 1, 90_000);
    let ctr = c.from("scratch");
    ctr.write("usr/install/arm64/vmlinuz", &kernel)
        .write("usr/install/arm64/initramfs.xz", &initrd)
        .write("etc/os-release", b"ID=test\n");
    (ctr.commit(&format!("comp{seed}")), kernel, initrd)
}

#[test]
fn zstd_zstd_chunked_and_docker_schema_2_from_buildah() {
    let reg = Registry::start();
    let c = Containers::new();
    let cases: [(&str, &[&str], &str); 4] = [
        ("gzip", &[], "application/vnd.oci.image.layer.v1.tar+gzip"),
        (
            "zstd",
            &["--compression-format", "zstd"],
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
        (
            "zstd-chunked",
            &["--compression-format", "zstd:chunked"],
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
        (
            "docker",
            &["--format", "docker"],
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        ),
    ];
    for (i, (name, args, media_type)) in cases.into_iter().enumerate() {
        let (image, kernel, initrd) = image_with(&c, 10 + 2 * i as u64);
        let repo = format!("t/{name}");
        c.push(&image, &docker(&reg, &repo, "1"), args);
        let m = manifest(&reg, &repo, "1");
        let layer = &m["layers"][0];
        assert_eq!(layer["mediaType"], media_type, "{name}: {m}");
        if name == "zstd-chunked" {
            assert!(
                layer["annotations"]["io.containers.zstd-chunked.manifest-checksum"].is_string(),
                "{m}"
            );
        }
        let r = reference(&reg, &repo, "1");
        let work = Work::new();
        let dest = work.dest(name);
        sync(
            &work,
            &reg,
            TargetCfg::new(name, &r, &dest).preset("talos-installer"),
        )
        .assert_success();
        assert_eq!(published(&dest, "vmlinuz-arm64"), kernel, "{name}");
        assert_eq!(published(&dest, "initramfs-arm64.xz"), initrd, "{name}");
        assert_eq!(
            c.container_file(&r, "/usr/install/arm64/initramfs.xz")
                .unwrap(),
            initrd,
            "{name}"
        );
    }
}

#[test]
fn multi_arch_lists_with_variants_match_as_containerd_normalises() {
    let reg = Registry::start();
    let c = Containers::new();
    let mut files = Vec::new();
    for (arch, seed) in [("arm64", 30u64), ("amd64", 31)] {
        let kernel = fake_kernel(arch, seed, 50_000);
        let ctr = c.from("scratch");
        ctr.write(&format!("usr/install/{arch}/vmlinuz"), &kernel)
            .write(
                &format!("usr/install/{arch}/initramfs.xz"),
                &fake_initramfs(seed + 10, 30_000),
            );
        files.push((arch, ctr.commit(&format!("img-{arch}")), kernel));
    }
    c.buildah(&["manifest", "create", "list"]);
    c.buildah(&[
        "manifest",
        "add",
        "--os",
        "linux",
        "--arch",
        "arm64",
        "--variant",
        "v8",
        "list",
        &files[0].1,
    ]);
    c.buildah(&[
        "manifest",
        "add",
        "--os",
        "linux",
        "--arch",
        "amd64",
        "list",
        &files[1].1,
    ]);
    c.buildah(&[
        "manifest",
        "push",
        "--quiet",
        "--all",
        "--tls-verify=false",
        "list",
        &docker(&reg, "t/multi", "1"),
    ]);
    let index = manifest(&reg, "t/multi", "1");
    assert_eq!(
        index["manifests"][0]["platform"]["variant"], "v8",
        "{index}"
    );
    let r = reference(&reg, "t/multi", "1");
    for (platform, arch) in [
        ("linux/arm64", 0),
        ("linux/arm64/v8", 0),
        ("linux/aarch64", 0),
        ("linux/amd64", 1),
        ("linux/x86_64", 1),
    ] {
        let work = Work::new();
        let dest = work.dest("m");
        let out = sync(
            &work,
            &reg,
            TargetCfg::new("m", &r, &dest)
                .platform(platform)
                .preset("talos-installer"),
        );
        out.assert_success();
        let (name, _, kernel) = &files[arch];
        assert_eq!(
            published(&dest, &format!("vmlinuz-{name}")),
            *kernel,
            "{platform}"
        );
    }
    let work = Work::new();
    let dest = work.dest("m");
    sync(
        &work,
        &reg,
        TargetCfg::new("m", &r, &dest)
            .platform("linux/arm64/v9")
            .preset("talos-installer"),
    )
    .assert_code(1)
    .assert_stderr_has(&["linux/arm64/v9", "linux/arm64/v8", "linux/amd64"]);
}

#[test]
fn oras_py_files_stay_byte_for_byte_and_directories_are_unpacked() {
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let kernel = fake_kernel("arm64", 40, 50_000);
    let initrd = fake_initramfs(41, 50_000);
    fs::create_dir_all(src.join("assets/talos/arm64")).unwrap();
    fs::write(src.join("vmlinuz"), &kernel).unwrap();
    fs::write(src.join("initramfs.xz"), &initrd).unwrap();
    fs::write(src.join("assets/talos/arm64/extra.cfg"), b"extra\n").unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, b"hello\n").unwrap();
    fs::write(src.join("hello.txt.gz"), gz.finish().unwrap()).unwrap();
    let target = reference(&reg, "t/oras", "1");
    oras_push(
        &src,
        &target,
        &[
            "vmlinuz",
            "initramfs.xz",
            "hello.txt.gz:application/vnd.acme.blob+gzip",
            "assets",
        ],
    );
    let m = manifest(&reg, "t/oras", "1");
    assert!(
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["annotations"]["io.deis.oras.content.unpack"].is_null()),
        "oras-py marks no directory as one: {m}"
    );
    let pulled = dir.path().join("pulled");
    oras_pull(&target, &pulled);

    let work = Work::new();
    let dest = work.dest("oras");
    sync(
        &work,
        &reg,
        TargetCfg::new("oras", &target, &dest)
            .file("vmlinuz", "vmlinuz")
            .file("initramfs.xz", "initramfs.xz")
            .file("hello.txt.gz", "hello.txt.gz")
            .dir("assets/talos/arm64", "extra"),
    )
    .assert_success();
    for (name, from) in [
        ("vmlinuz", "vmlinuz"),
        ("initramfs.xz", "initramfs.xz"),
        ("hello.txt.gz", "hello.txt.gz"),
        ("extra/extra.cfg", "assets/talos/arm64/extra.cfg"),
    ] {
        assert_eq!(
            fs::read(dest.join("current").join(name)).unwrap(),
            fs::read(pulled.join(from)).unwrap(),
            "{name} differs from what oras pull wrote"
        );
    }
    assert_eq!(fs::read(dest.join("hello.txt.gz")).unwrap().len(), 26);
}

#[test]
fn files_in_several_artifact_layers_are_downloaded_at_once() {
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let kernel = fake_kernel("arm64", 42, 1_500_000);
    let initrd = fake_initramfs(43, 1_500_000);
    fs::write(dir.path().join("vmlinuz"), &kernel).unwrap();
    fs::write(dir.path().join("initramfs.xz"), &initrd).unwrap();
    oras_push(
        dir.path(),
        &reference(&reg, "t/split", "1"),
        &["vmlinuz", "initramfs.xz"],
    );
    // Through a link of 4 MB/s shared by all connections: one layer takes about 0.4 s.
    let proxy = Proxy::start(&reg.host());
    proxy.set_rate(Some(4e6));
    let work = Work::new();
    let dest = work.dest("split");
    let config = work.config(
        &Config::new().registry(&proxy.host()).target(
            TargetCfg::new("split", &format!("{}/t/split:1", proxy.host()), &dest)
                .file("vmlinuz", "vmlinuz")
                .file("initramfs.xz", "initramfs.xz"),
        ),
    );
    work.sync_once(&config).assert_success();
    assert_eq!(published(&dest, "vmlinuz"), kernel);
    assert_eq!(published(&dest, "initramfs.xz"), initrd);
    let m = manifest(&reg, "t/split", "1");
    let gets: Vec<_> = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let digest = l["digest"].as_str().unwrap();
            let g = proxy.blob_gets("t/split", digest);
            assert_eq!(g.len(), 1, "{digest} fetched once: {}", proxy.dump());
            g[0].clone()
        })
        .collect();
    // Each download started before the other ended.
    let ends = |e: &proxy::Exchange| e.started_at() + e.elapsed;
    assert!(
        gets[0].started_at() < ends(&gets[1]) && gets[1].started_at() < ends(&gets[0]),
        "the two layers were read one after the other: {}",
        proxy.dump()
    );
}

const CMDLINE: &str = "talos.platform=metal console=tty0 console=ttyAMA0 init_on_alloc=1 slab_nomerge pti=on printk.devkmsg=on";
const OSREL: &str =
    "NAME=\"Talos\"\nID=talos\nVERSION_ID=v1.11.5\nPRETTY_NAME=\"Talos (v1.11.5)\"\n";

/// A Talos >= 1.10 style installer: only `vmlinuz.efi` (a real UKI) and `systemd-boot.efi`,
/// over a base layer. Returns the image and the UKI's kernel, initramfs and whole bytes.
fn uki_installer(c: &Containers) -> (String, Vec<u8>, Vec<u8>, Vec<u8>) {
    let kernel = fs::read(fixture("vmlinuz-arm64")).unwrap();
    let initrd = cpio_initramfs(&[
        ("init", b"#!/bin/sh\necho talos\n"),
        ("etc/os-release", OSREL.as_bytes()),
    ]);
    let uki = build_uki(&kernel, &initrd, CMDLINE, OSREL, "6.12.57-talos");
    let base = c.from("scratch");
    base.write("bin/installer", b"the installer binary");
    let base = base.commit("installer-base");
    let top = c.from(&base);
    top.write("usr/install/arm64/vmlinuz.efi", &uki).write(
        "usr/install/arm64/systemd-boot.efi",
        &fs::read(fixture("linuxaa64.efi.stub")).unwrap(),
    );
    (top.commit("installer"), kernel, initrd, uki)
}

#[test]
fn talos_1_10_installer_with_a_real_uki_syncs_with_the_preset() {
    let reg = Registry::start();
    let c = Containers::new();
    let (image, kernel, initrd, uki) = uki_installer(&c);
    c.push(
        &image,
        &docker(&reg, "siderolabs/installer", "v1.11.5"),
        &[],
    );
    let r = reference(&reg, "siderolabs/installer", "v1.11.5");

    let work = Work::new();
    let dest = work.dest("talos");
    let profile = work.path().join("profiles/talos.json");
    let target = TargetCfg::new("talos", &r, &dest)
        .preset("talos-installer")
        .extra("publish_uki = true")
        .extra(&format!(
            "[target.profile]\npath = {}\nurl_prefix = \"/assets/talos\"\nargs = [\"console=ttyS0\", \"talos.config=http://10.0.0.1/c.yaml\"]",
            q(profile.to_str().unwrap())
        ));
    let cfg = Config::new().registry(&reg.host()).target(target);
    let config = work.config(&cfg);
    work.sync_once(&config).assert_success();
    assert_eq!(published(&dest, "vmlinuz-arm64"), kernel);
    assert_eq!(published(&dest, "initramfs-arm64.xz"), initrd);
    assert_eq!(published(&dest, "cmdline-arm64"), CMDLINE.as_bytes());
    assert_eq!(published(&dest, "vmlinuz-arm64.efi"), uki);
    // The base layer (the installer itself) was never downloaded.
    let m = manifest(&reg, "siderolabs/installer", "v1.11.5");
    let base = m["layers"][0]["digest"].as_str().unwrap();
    assert_eq!(reg.blob_gets_of("siderolabs/installer", base), 0);

    let hex = fs::read_link(dest.join("current"))
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let doc: Value = serde_json::from_slice(&fs::read(&profile).unwrap()).unwrap();
    assert_eq!(
        doc["boot"]["kernel"],
        format!("/assets/talos/versions/{hex}/vmlinuz-arm64")
    );
    assert_eq!(
        doc["boot"]["initrd"][0],
        format!("/assets/talos/versions/{hex}/initramfs-arm64.xz")
    );
    assert_eq!(
        doc["boot"]["args"],
        serde_json::json!([
            "talos.platform=metal",
            "init_on_alloc=1",
            "slab_nomerge",
            "pti=on",
            "printk.devkmsg=on",
            "console=ttyS0",
            "talos.config=http://10.0.0.1/c.yaml",
            "initrd=initramfs-arm64.xz"
        ])
    );
    let meta: Value =
        serde_json::from_slice(&fs::read(dest.join("current/.bootsync.json")).unwrap()).unwrap();
    assert_eq!(meta["boot"]["os_release"], "Talos (v1.11.5)");
    assert_eq!(meta["boot"]["kernel_release"], "6.12.57-talos");
    assert_eq!(meta["boot"]["cmdline"], CMDLINE);
    // ... and in /status
    {
        let mut daemon = work.spawn_run(&config, &cfg.listen);
        daemon.wait_status(
            "the Talos version in /status",
            Duration::from_secs(30),
            |st| st["targets"][0]["published"]["boot"]["os_release"] == "Talos (v1.11.5)",
        );
    }

    // The same preset takes a Talos <= 1.9 installer, under the same names.
    let old_kernel = fake_kernel("arm64", 50, 60_000);
    let old = c.from("scratch");
    old.write("usr/install/arm64/vmlinuz", &old_kernel).write(
        "usr/install/arm64/initramfs.xz",
        &fake_initramfs(51, 60_000),
    );
    let old = old.commit("installer-1.9");
    c.push(&old, &docker(&reg, "siderolabs/installer", "v1.11.5"), &[]);
    work.sync_once(&config).assert_success();
    assert_eq!(published(&dest, "vmlinuz-arm64"), old_kernel);
    assert!(!dest.join("cmdline-arm64").exists(), "stale link kept");
}

/// A config made of an `inspect` snippet, with the test's registry and directories.
fn snippet_config(
    work: &Work,
    reg: &Registry,
    assets: &Path,
    file: &str,
    snippet: &str,
) -> std::path::PathBuf {
    work.write_config(
        file,
        &format!(
            "assets_root = {}\nstate_dir = {}\n[[registry]]\nhost = {}\ninsecure = true\n{snippet}",
            q(assets.to_str().unwrap()),
            q(work.path().join("state").to_str().unwrap()),
            q(&reg.host())
        ),
    )
}

#[test]
fn inspect_finds_the_boot_files_and_its_snippet_syncs_the_image() {
    let reg = Registry::start();
    let c = Containers::new();
    let (image, kernel, _, _) = uki_installer(&c);
    c.push(&image, &docker(&reg, "talos/installer", "v1"), &[]);
    let r = reference(&reg, "talos/installer", "v1");
    let work = Work::new();
    let none = work.path().join("no-such-config.toml");
    let out = work.run(&none, &["inspect", &r, "--insecure", "--json"]);
    out.assert_success();
    let report: Value = serde_json::from_str(&out.stdout).unwrap();
    let found = report["candidates"].as_array().unwrap();
    let uki = found
        .iter()
        .find(|c| c["path"] == "usr/install/arm64/vmlinuz.efi")
        .unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(uki["kind"], "uki", "{report:#}");
    assert_eq!(uki["uki"]["cmdline"], CMDLINE);
    assert_eq!(uki["uki"]["os_release"], "Talos (v1.11.5)");
    let boot = found
        .iter()
        .find(|c| c["path"] == "usr/install/arm64/systemd-boot.efi")
        .unwrap();
    assert!(boot["error"].as_str().unwrap().contains("not a"), "{boot}");
    // Only the top layer was read.
    let base = manifest(&reg, "talos/installer", "v1")["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(reg.blob_gets_of("talos/installer", &base), 0);
    let snippet = report["snippet"].as_str().unwrap();
    assert!(
        snippet.contains("preset = \"talos-installer\""),
        "{snippet}"
    );

    // The snippet, as printed, is a config check-config accepts and that syncs the image.
    let assets = work.path().join("assets");
    let config = snippet_config(&work, &reg, &assets, "inspected.toml", snippet);
    work.check_config(&config).assert_success();
    work.sync_once(&config).assert_success();
    assert_eq!(
        fs::read(assets.join("installer/vmlinuz-arm64")).unwrap(),
        kernel
    );

    // A layout no preset knows: the snippet names the files.
    let k = fake_kernel("arm64", 60, 40_000);
    let ctr = c.from("scratch");
    ctr.write("srv/boot/vmlinuz", &k)
        .write("srv/boot/initrd.img", &fake_initramfs(61, 40_000));
    let odd = ctr.commit("odd");
    c.push(&odd, &docker(&reg, "t/odd", "1"), &[]);
    let r = reference(&reg, "t/odd", "1");
    let out = work.run(&none, &["inspect", &r, "--insecure"]);
    out.assert_success();
    assert!(
        out.stdout
            .contains("srv/boot/vmlinuz: kernel: arm64 EFI zboot")
            && out.stdout.contains("source = \"srv/boot/initrd.img\""),
        "{}",
        out.describe()
    );
    let snippet = &out.stdout[out.stdout.find("[[target]]").unwrap()..];
    let config = snippet_config(&work, &reg, &assets, "odd.toml", snippet);
    work.sync_once(&config).assert_success();
    assert_eq!(fs::read(assets.join("odd/vmlinuz")).unwrap(), k);
}

#[test]
fn dry_run_says_what_it_knows_and_what_it_cannot() {
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("vmlinuz"), fake_kernel("arm64", 70, 40_000)).unwrap();
    let target = reference(&reg, "t/dry", "1");
    oras_push(dir.path(), &target, &["vmlinuz"]);
    let work = Work::new();
    let dest = work.dest("dry");
    // The artifact has no initramfs: known without reading a byte.
    let config = work.config(
        &Config::new().registry(&reg.host()).target(
            TargetCfg::new("dry", &target, &dest)
                .file("vmlinuz", "vmlinuz")
                .file("initramfs.xz", "initramfs.xz"),
        ),
    );
    let out = work.run(&config, &["sync", "--once", "--dry-run"]);
    out.assert_code(1);
    assert!(
        out.stdout.contains("would fail") && out.stdout.contains("initramfs.xz"),
        "{}",
        out.describe()
    );
    assert_eq!(reg.blob_gets("t/dry"), 0);
    // A container image: which layer holds the files is known only once it is read.
    let c = Containers::new();
    let (image, _, _) = image_with(&c, 80);
    c.push(&image, &docker(&reg, "t/dry2", "1"), &[]);
    let config = work.config(&Config::new().registry(&reg.host()).target(
        TargetCfg::new("dry", &reference(&reg, "t/dry2", "1"), &dest).preset("talos-installer"),
    ));
    let out = work.run(&config, &["sync", "--once", "--dry-run"]);
    out.assert_success();
    assert!(
        out.stdout.contains("would download")
            && out.stdout.contains("known only once they are read"),
        "{}",
        out.describe()
    );
    assert!(!dest.exists());
}
