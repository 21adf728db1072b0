//! End-to-end tests: a real CNCF distribution registry per test, images built in pure Rust and
//! pushed over HTTP, and the real `bootsync` binary syncing them into temp directories.
//!
//! Needs `/usr/bin/docker-registry` (`apt-get install -y docker-registry`) or
//! `BOOTSYNC_TEST_REGISTRY_BIN=/path/to/registry`. Run with `cargo test --test e2e`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic: a panic is a failure

mod common;

use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::Duration;

const REPO: &str = "talos/demo";
const KERNEL: usize = 600_000;
const INITRAMFS: usize = 900_000;

/// Kernel and initramfs bytes for one (arch, version) pair.
struct Boot {
    kernel: Vec<u8>,
    initramfs: Vec<u8>,
}

fn boot(arch: &str, seed: u64) -> Boot {
    Boot {
        kernel: fake_kernel(arch, seed * 2, KERNEL),
        initramfs: fake_initramfs(seed * 2 + 1, INITRAMFS),
    }
}

/// A base layer that has nothing bootsync wants (like an OS base image).
fn base_layer(c: Compression, seed: u64) -> Layer {
    Layer::new(c)
        .file(
            "etc/os-release",
            format!("ID=talos\nVERSION_ID=v1.{seed}\n"),
        )
        .file("usr/lib/libfiller.so", bytes(10_000 + seed, 300_000))
        .symlink("lib", "usr/lib")
}

/// `<arch>` files at the `demo` preset's paths (`assets/talos/<arch>/...`).
fn demo_layer(c: Compression, arch: &str, b: &Boot) -> Layer {
    Layer::new(c)
        .file(&format!("assets/talos/{arch}/vmlinuz"), b.kernel.clone())
        .file(
            &format!("assets/talos/{arch}/initramfs.xz"),
            b.initramfs.clone(),
        )
}

fn demo_image(format: Format, c: Compression, arch: &str, seed: u64, b: &Boot) -> Image {
    Image::new(format, arch)
        .label(&format!("v{seed}"))
        .layer(base_layer(c, seed))
        .layer(demo_layer(c, arch, b))
}

/// A target with explicit `files` for the demo layout.
fn demo_target(name: &str, reference: &str, dest: &Path, arch: &str) -> TargetCfg {
    TargetCfg::new(name, reference, dest)
        .platform(&format!("linux/{arch}"))
        .file(
            &format!("assets/talos/{arch}/vmlinuz"),
            &format!("vmlinuz-{arch}"),
        )
        .file(
            &format!("assets/talos/{arch}/initramfs.xz"),
            &format!("initramfs-{arch}.xz"),
        )
}

fn demo_wants<'a>(arch: &str, b: &'a Boot) -> Vec<Want<'a>> {
    // Leak two small strings per call so `Want` can borrow them; fine in tests.
    let k_name: &'static str = Box::leak(format!("vmlinuz-{arch}").into_boxed_str());
    let i_name: &'static str = Box::leak(format!("initramfs-{arch}.xz").into_boxed_str());
    let k_src: &'static str = Box::leak(format!("assets/talos/{arch}/vmlinuz").into_boxed_str());
    let i_src: &'static str =
        Box::leak(format!("assets/talos/{arch}/initramfs.xz").into_boxed_str());
    vec![
        Want {
            name: k_name,
            source: k_src,
            data: &b.kernel,
        },
        Want {
            name: i_name,
            source: i_src,
            data: &b.initramfs,
        },
    ]
}

fn reference(reg: &Registry, repo: &str, tag: &str) -> String {
    format!("{}/{repo}:{tag}", reg.host())
}

/// Collects every regular file under `dir` (relative path -> bytes) and checks modes
/// (files 0644, directories 0755).
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        assert_eq!(mode(dir), 0o755, "mode of directory {dir:?}");
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let ft = fs::symlink_metadata(&p).unwrap().file_type();
            if ft.is_dir() {
                walk(root, &p, out);
            } else {
                assert!(ft.is_file(), "{p:?} is not a regular file");
                assert_eq!(mode(&p), 0o644, "mode of {p:?}");
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn assert_tree_eq(got: &BTreeMap<String, Vec<u8>>, want: &BTreeMap<String, Vec<u8>>) {
    let got_names: Vec<&String> = got.keys().collect();
    let want_names: Vec<&String> = want.keys().collect();
    assert_eq!(got_names, want_names, "files in the copied directory");
    for (k, v) in want {
        assert!(&got[k] == v, "content of {k} differs from what was pushed");
    }
}

// ---------------------------------------------------------------------------------------------
// Image formats and platform selection
// ---------------------------------------------------------------------------------------------

#[test]
fn oci_index_two_platforms_get_their_own_files() {
    let reg = Registry::start();
    let arm = boot("arm64", 1);
    let amd = boot("amd64", 2);
    // amd64 first in the index, so "take the first entry" would be caught.
    let (index, built) = reg.push_index(
        REPO,
        Format::Oci,
        &[
            demo_image(Format::Oci, Compression::Gzip, "amd64", 1, &amd),
            demo_image(Format::Oci, Compression::Gzip, "arm64", 1, &arm),
        ],
        "stable",
    );
    let (amd_img, arm_img) = (&built[0], &built[1]);
    let reference = reference(&reg, REPO, "stable");
    let work = Work::new();
    let (d_arm, d_amd) = (work.dest("arm"), work.dest("amd"));
    let cfg = Config::new()
        .registry(&reg.host())
        .target(demo_target("talos-arm64", &reference, &d_arm, "arm64"))
        .target(demo_target("talos-amd64", &reference, &d_amd, "amd64"));
    let out = work.sync_once(&work.config(&cfg));
    out.assert_success();

    assert_ne!(arm_img.digest, amd_img.digest);
    assert_ne!(arm_img.digest, index);
    assert_current(
        &d_arm,
        &Published {
            target: "talos-arm64",
            reference: &reference,
            platform: "linux/arm64",
            digest: &arm_img.digest,
            tag_digest: &index,
            files: &demo_wants("arm64", &arm),
        },
    );
    assert_current(
        &d_amd,
        &Published {
            target: "talos-amd64",
            reference: &reference,
            platform: "linux/amd64",
            digest: &amd_img.digest,
            tag_digest: &index,
            files: &demo_wants("amd64", &amd),
        },
    );
    assert_eq!(versions(&d_arm), [arm_img.hex().to_string()].into());
    assert_eq!(versions(&d_amd), [amd_img.hex().to_string()].into());
}

#[test]
fn docker_manifest_list_and_schema2_manifest_with_gzip_layers() {
    let reg = Registry::start();
    let arm = boot("arm64", 3);
    let amd = boot("amd64", 4);
    let single = boot("arm64", 5);
    let (list, built) = reg.push_index(
        REPO,
        Format::Docker,
        &[
            demo_image(Format::Docker, Compression::Gzip, "amd64", 3, &amd),
            demo_image(Format::Docker, Compression::Gzip, "arm64", 3, &arm),
        ],
        "multi",
    );
    assert_eq!(built[1].media_type, image::DOCKER_MANIFEST);
    assert!(built[1]
        .layers
        .iter()
        .all(|l| l.media_type == image::DOCKER_LAYER_GZIP));
    // A tag pointing straight at a Docker schema 2 manifest (no list).
    let plain = reg.push_image(
        "talos/single",
        &demo_image(Format::Docker, Compression::Gzip, "arm64", 5, &single),
        Some("v1"),
    );

    let r_list = reference(&reg, REPO, "multi");
    let r_plain = reference(&reg, "talos/single", "v1");
    let work = Work::new();
    let (d_list, d_plain) = (work.dest("list"), work.dest("plain"));
    let cfg = Config::new()
        .registry(&reg.host())
        .target(demo_target("from-list", &r_list, &d_list, "arm64"))
        .target(demo_target("from-manifest", &r_plain, &d_plain, "arm64"));
    work.sync_once(&work.config(&cfg)).assert_success();

    assert_current(
        &d_list,
        &Published {
            target: "from-list",
            reference: &r_list,
            platform: "linux/arm64",
            digest: &built[1].digest,
            tag_digest: &list,
            files: &demo_wants("arm64", &arm),
        },
    );
    assert_current(
        &d_plain,
        &Published {
            target: "from-manifest",
            reference: &r_plain,
            platform: "linux/arm64",
            digest: &plain.digest,
            tag_digest: &plain.digest,
            files: &demo_wants("arm64", &single),
        },
    );
}

fn compression_case(c: Compression, seed: u64) {
    let reg = Registry::start();
    let b = boot("arm64", seed);
    let img = reg.push_image(
        REPO,
        &demo_image(Format::Oci, c, "arm64", seed, &b),
        Some("stable"),
    );
    let want_type = match c {
        Compression::None => image::OCI_LAYER_TAR,
        Compression::Gzip => image::OCI_LAYER_GZIP,
        Compression::Zstd => image::OCI_LAYER_ZSTD,
    };
    assert!(img.layers.iter().all(|l| l.media_type == want_type));
    let reference = reference(&reg, REPO, "stable");
    let work = Work::new();
    let dest = work.dest("talos");
    let cfg = Config::new().registry(&reg.host()).target(demo_target(
        "talos-arm64",
        &reference,
        &dest,
        "arm64",
    ));
    work.sync_once(&work.config(&cfg)).assert_success();
    assert_current(
        &dest,
        &Published {
            target: "talos-arm64",
            reference: &reference,
            platform: "linux/arm64",
            digest: &img.digest,
            tag_digest: &img.digest,
            files: &demo_wants("arm64", &b),
        },
    );
}

#[test]
fn gzip_layers() {
    compression_case(Compression::Gzip, 10);
}

#[test]
fn zstd_layers() {
    compression_case(Compression::Zstd, 11);
}

#[test]
fn uncompressed_layers() {
    compression_case(Compression::None, 12);
}

#[test]
fn mixed_compression_across_layers() {
    let reg = Registry::start();
    let b = boot("arm64", 13);
    let img = Image::oci("arm64")
        .layer(base_layer(Compression::Zstd, 13))
        .layer(Layer::uncompressed().file("assets/talos/arm64/initramfs.xz", b.initramfs.clone()))
        .layer(Layer::gzip().file("assets/talos/arm64/vmlinuz", b.kernel.clone()));
    let img = reg.push_image(REPO, &img, Some("stable"));
    let reference = reference(&reg, REPO, "stable");
    let work = Work::new();
    let dest = work.dest("talos");
    let cfg = Config::new().registry(&reg.host()).target(demo_target(
        "talos-arm64",
        &reference,
        &dest,
        "arm64",
    ));
    work.sync_once(&work.config(&cfg)).assert_success();
    assert_current(
        &dest,
        &Published {
            target: "talos-arm64",
            reference: &reference,
            platform: "linux/arm64",
            digest: &img.digest,
            tag_digest: &img.digest,
            files: &demo_wants("arm64", &b),
        },
    );
    // The base layer holds nothing wanted: never downloaded.
    assert_eq!(
        reg.blob_gets_of(REPO, &img.layers[0].digest),
        0,
        "base layer fetched"
    );
}

#[test]
fn reference_pinned_by_index_digest() {
    let reg = Registry::start();
    let arm = boot("arm64", 14);
    let amd = boot("amd64", 15);
    let (index, built) = reg.push_index(
        REPO,
        Format::Oci,
        &[
            demo_image(Format::Oci, Compression::Gzip, "arm64", 14, &arm),
            demo_image(Format::Oci, Compression::Gzip, "amd64", 14, &amd),
        ],
        "stable",
    );
    let reference = format!("{}/{REPO}@{index}", reg.host());
    let work = Work::new();
    let dest = work.dest("talos");
    let cfg = Config::new()
        .registry(&reg.host())
        .target(demo_target("pinned", &reference, &dest, "arm64"));
    work.sync_once(&work.config(&cfg)).assert_success();
    assert_current(
        &dest,
        &Published {
            target: "pinned",
            reference: &reference,
            platform: "linux/arm64",
            digest: &built[0].digest,
            tag_digest: &index,
            files: &demo_wants("arm64", &arm),
        },
    );
}

#[test]
fn presets_map_known_layouts() {
    let reg = Registry::start();
    // talos-installer: multi-arch index, usr/install/<arch>/...
    let inst_arm = boot("arm64", 20);
    let inst_amd = boot("amd64", 21);
    let installer = |arch: &str, b: &Boot| {
        Image::oci(arch)
            .layer(base_layer(Compression::Gzip, 20))
            .layer(
                Layer::gzip()
                    .file(&format!("usr/install/{arch}/vmlinuz"), b.kernel.clone())
                    .file(
                        &format!("usr/install/{arch}/initramfs.xz"),
                        b.initramfs.clone(),
                    ),
            )
    };
    let (inst_index, inst) = reg.push_index(
        "siderolabs/installer",
        Format::Oci,
        &[installer("arm64", &inst_arm), installer("amd64", &inst_amd)],
        "v1.9.5",
    );
    // talos-imager: one image holding both arches.
    let img_arm = boot("arm64", 22);
    let img_amd = boot("amd64", 23);
    let imager = reg.push_image(
        "siderolabs/imager",
        &Image::oci("arm64").layer(
            Layer::zstd()
                .file("usr/install/amd64/vmlinuz", img_amd.kernel.clone())
                .file("usr/install/amd64/initramfs.xz", img_amd.initramfs.clone())
                .file("usr/install/arm64/vmlinuz", img_arm.kernel.clone())
                .file("usr/install/arm64/initramfs.xz", img_arm.initramfs.clone()),
        ),
        Some("v1.9.5"),
    );
    // cozystack: amd64, var/lib/matchbox/assets/...
    let cozy_b = boot("amd64", 24);
    let cozy = reg.push_image(
        "cozystack/matchbox",
        &Image::oci("amd64")
            .layer(base_layer(Compression::Gzip, 24))
            .layer(
                Layer::gzip()
                    .file("var/lib/matchbox/assets/vmlinuz", cozy_b.kernel.clone())
                    .file(
                        "var/lib/matchbox/assets/initramfs.xz",
                        cozy_b.initramfs.clone(),
                    ),
            ),
        Some("latest"),
    );
    // demo: assets/talos/<arch>/...
    let demo_b = boot("arm64", 25);
    let demo = reg.push_image(
        REPO,
        &demo_image(Format::Oci, Compression::Gzip, "arm64", 25, &demo_b),
        Some("stable"),
    );

    let work = Work::new();
    let r_inst = reference(&reg, "siderolabs/installer", "v1.9.5");
    let r_imager = reference(&reg, "siderolabs/imager", "v1.9.5");
    let r_cozy = reference(&reg, "cozystack/matchbox", "latest");
    let r_demo = reference(&reg, REPO, "stable");
    let (d_inst, d_imager, d_cozy, d_demo) = (
        work.dest("installer"),
        work.dest("imager"),
        work.dest("cozy"),
        work.dest("demo"),
    );
    let cfg = Config::new()
        .registry(&reg.host())
        .target(
            TargetCfg::new("installer", &r_inst, &d_inst)
                .platform("linux/amd64")
                .preset("talos-installer"),
        )
        .target(
            TargetCfg::new("imager", &r_imager, &d_imager)
                .platform("linux/arm64")
                .preset("talos-imager"),
        )
        .target(
            TargetCfg::new("cozy", &r_cozy, &d_cozy)
                .platform("linux/amd64")
                .preset("cozystack"),
        )
        // platform left at its default (linux/arm64)
        .target(TargetCfg::new("demo", &r_demo, &d_demo).preset("demo"));
    work.sync_once(&work.config(&cfg)).assert_success();

    assert_current(
        &d_inst,
        &Published {
            target: "installer",
            reference: &r_inst,
            platform: "linux/amd64",
            digest: &inst[1].digest,
            tag_digest: &inst_index,
            files: &[
                Want {
                    name: "vmlinuz-amd64",
                    source: "usr/install/amd64/vmlinuz",
                    data: &inst_amd.kernel,
                },
                Want {
                    name: "initramfs-amd64.xz",
                    source: "usr/install/amd64/initramfs.xz",
                    data: &inst_amd.initramfs,
                },
            ],
        },
    );
    assert_current(
        &d_imager,
        &Published {
            target: "imager",
            reference: &r_imager,
            platform: "linux/arm64",
            digest: &imager.digest,
            tag_digest: &imager.digest,
            files: &[
                Want {
                    name: "vmlinuz-arm64",
                    source: "usr/install/arm64/vmlinuz",
                    data: &img_arm.kernel,
                },
                Want {
                    name: "initramfs-arm64.xz",
                    source: "usr/install/arm64/initramfs.xz",
                    data: &img_arm.initramfs,
                },
            ],
        },
    );
    assert_current(
        &d_cozy,
        &Published {
            target: "cozy",
            reference: &r_cozy,
            platform: "linux/amd64",
            digest: &cozy.digest,
            tag_digest: &cozy.digest,
            files: &[
                Want {
                    name: "vmlinuz",
                    source: "var/lib/matchbox/assets/vmlinuz",
                    data: &cozy_b.kernel,
                },
                Want {
                    name: "initramfs.xz",
                    source: "var/lib/matchbox/assets/initramfs.xz",
                    data: &cozy_b.initramfs,
                },
            ],
        },
    );
    assert_current(
        &d_demo,
        &Published {
            target: "demo",
            reference: &r_demo,
            platform: "linux/arm64",
            digest: &demo.digest,
            tag_digest: &demo.digest,
            files: &demo_wants("arm64", &demo_b),
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Layer semantics: overrides, whiteouts, directories
// ---------------------------------------------------------------------------------------------

#[test]
fn upper_layer_wins_and_lower_layer_is_not_downloaded() {
    let reg = Registry::start();
    let old = boot("arm64", 30);
    let new = boot("arm64", 31);
    let img = Image::oci("arm64")
        .layer(
            base_layer(Compression::Gzip, 30)
                .file("assets/talos/arm64/vmlinuz", old.kernel.clone())
                .file("assets/talos/arm64/initramfs.xz", old.initramfs.clone()),
        )
        .layer(demo_layer(Compression::Gzip, "arm64", &new));
    let img = reg.push_image(REPO, &img, Some("stable"));
    let reference = reference(&reg, REPO, "stable");
    let work = Work::new();
    let dest = work.dest("talos");
    let cfg = Config::new().registry(&reg.host()).target(demo_target(
        "talos-arm64",
        &reference,
        &dest,
        "arm64",
    ));
    work.sync_once(&work.config(&cfg)).assert_success();
    assert_current(
        &dest,
        &Published {
            target: "talos-arm64",
            reference: &reference,
            platform: "linux/arm64",
            digest: &img.digest,
            tag_digest: &img.digest,
            files: &demo_wants("arm64", &new),
        },
    );
    let lower = reg.blob_gets_of(REPO, &img.layers[0].digest);
    let upper = reg.blob_gets_of(REPO, &img.layers[1].digest);
    let config = reg.blob_gets_of(REPO, &img.config_digest);
    let total = reg.blob_gets(REPO);
    assert_eq!(
        lower, 0,
        "lower layer was downloaded although the top layer has every file"
    );
    assert_eq!(upper, 1, "top layer downloads");
    assert_eq!(total - config, 1, "layer blob GETs in total");
}

#[test]
fn upper_layer_replaces_one_file_other_comes_from_lower() {
    let reg = Registry::start();
    let old = boot("arm64", 32);
    let new_kernel = fake_kernel("arm64", 333, KERNEL);
    let img = Image::oci("arm64")
        .layer(demo_layer(Compression::Gzip, "arm64", &old))
        .layer(base_layer(Compression::Gzip, 32))
        .layer(Layer::gzip().file("assets/talos/arm64/vmlinuz", new_kernel.clone()));
    let img = reg.push_image(REPO, &img, Some("stable"));
    let reference = reference(&reg, REPO, "stable");
    let work = Work::new();
    let dest = work.dest("talos");
    let cfg = Config::new().registry(&reg.host()).target(demo_target(
        "talos-arm64",
        &reference,
        &dest,
        "arm64",
    ));
    work.sync_once(&work.config(&cfg)).assert_success();
    let want = Boot {
        kernel: new_kernel,
        initramfs: old.initramfs.clone(),
    };
    assert_current(
        &dest,
        &Published {
            target: "talos-arm64",
            reference: &reference,
            platform: "linux/arm64",
            digest: &img.digest,
            tag_digest: &img.digest,
            files: &demo_wants("arm64", &want),
        },
    );
    for (i, l) in img.layers.iter().enumerate() {
        assert_eq!(reg.blob_gets_of(REPO, &l.digest), 1, "GETs of layer {i}");
    }
}

#[test]
fn whiteout_of_wanted_file_fails_and_publishes_nothing() {
    let reg = Registry::start();
    let b = boot("arm64", 40);
    let img = Image::oci("arm64")
        .layer(demo_layer(Compression::Gzip, "arm64", &b))
        .layer(Layer::gzip().whiteout("assets/talos/arm64/initramfs.xz"));
    reg.push_image(REPO, &img, Some("stable"));
    let reference = reference(&reg, REPO, "stable");
    let work = Work::new();
    let dest = work.dest("talos");
    let cfg = Config::new().registry(&reg.host()).target(demo_target(
        "talos-arm64",
        &reference,
        &dest,
        "arm64",
    ));
    let out = work.sync_once(&work.config(&cfg));
    out.assert_code(1)
        .assert_stderr_has(&["talos-arm64", "whiteout"]);
    assert_nothing_published(&dest);
}

#[test]
fn opaque_whiteout_hiding_wanted_file_fails() {
    let reg = Registry::start();
    let b = boot("arm64", 41);
    let img = Image::oci("arm64")
        .layer(demo_layer(Compression::Gzip, "arm64", &b))
        .layer(
            Layer::gzip()
                .opaque("assets/talos/arm64")
                .file("assets/talos/arm64/vmlinuz", b.kernel.clone()),
        );
    reg.push_image(REPO, &img, Some("stable"));
    let reference = reference(&reg, REPO, "stable");
    let work = Work::new();
    let dest = work.dest("talos");
    let cfg = Config::new().registry(&reg.host()).target(demo_target(
        "talos-arm64",
        &reference,
        &dest,
        "arm64",
    ));
    let out = work.sync_once(&work.config(&cfg));
    out.assert_code(1)
        .assert_stderr_has(&["talos-arm64"])
        .assert_stderr_has_any(&["whiteout", "opaque"]);
    assert_nothing_published(&dest);
}

#[test]
fn file_deleted_then_readded_in_higher_layer() {
    let reg = Registry::start();
    let old = boot("arm64", 42);
    let new_initramfs = fake_initramfs(4242, INITRAMFS);
    let img = Image::oci("arm64")
        .layer(demo_layer(Compression::Gzip, "arm64", &old))
        .layer(Layer::gzip().whiteout("assets/talos/arm64/initramfs.xz"))
        .layer(Layer::gzip().file("assets/talos/arm64/initramfs.xz", new_initramfs.clone()));
    let img = reg.push_image(REPO, &img, Some("stable"));
    let reference = reference(&reg, REPO, "stable");
    let work = Work::new();
    let dest = work.dest("talos");
    let cfg = Config::new().registry(&reg.host()).target(demo_target(
        "talos-arm64",
        &reference,
        &dest,
        "arm64",
    ));
    work.sync_once(&work.config(&cfg)).assert_success();
    let want = Boot {
        kernel: old.kernel.clone(),
        initramfs: new_initramfs,
    };
    assert_current(
        &dest,
        &Published {
            target: "talos-arm64",
            reference: &reference,
            platform: "linux/arm64",
            digest: &img.digest,
            tag_digest: &img.digest,
            files: &demo_wants("arm64", &want),
        },
    );
}

#[test]
fn source_dir_is_copied_whole_across_layers() {
    let reg = Registry::start();
    let k1 = fake_kernel("arm64", 50, KERNEL);
    let k2 = fake_kernel("arm64", 51, KERNEL);
    let initramfs = fake_initramfs(52, INITRAMFS);
    let dtb = bytes(53, 40_000);
    let readme = b"installer assets\n".to_vec();
    let img = Image::oci("arm64")
        .layer(
            base_layer(Compression::Gzip, 50)
                .file("usr/install/arm64/vmlinuz", k1)
                .file("usr/install/arm64/initramfs.xz", initramfs.clone())
                .file("usr/install/arm64/dtb/board.dtb", dtb.clone())
                .file("usr/install/amd64/vmlinuz", fake_kernel("amd64", 54, 8192)),
        )
        .layer(
            Layer::zstd()
                .file("usr/install/arm64/vmlinuz", k2.clone())
                .file("usr/install/arm64/extra/README", readme.clone())
                .file("usr/install/arm64-other/decoy", b"not in the dir".to_vec()),
        );
    let img = reg.push_image(REPO, &img, Some("stable"));
    let reference = reference(&reg, REPO, "stable");
    let work = Work::new();
    let dest = work.dest("talos");
    let cfg = Config::new().registry(&reg.host()).target(
        TargetCfg::new("installer-dir", &reference, &dest)
            .platform("linux/arm64")
            .dir("usr/install/arm64", "install"),
    );
    work.sync_once(&work.config(&cfg)).assert_success();

    let vdir = dest.join("versions").join(img.hex());
    let want: BTreeMap<String, Vec<u8>> = [
        ("vmlinuz".to_string(), k2),
        ("initramfs.xz".to_string(), initramfs),
        ("dtb/board.dtb".to_string(), dtb),
        ("extra/README".to_string(), readme),
    ]
    .into();
    assert_tree_eq(&tree(&vdir.join("install")), &want);
    assert_eq!(
        readlink(&dest.join("current")),
        format!("versions/{}", img.hex())
    );
    assert_eq!(readlink(&dest.join("install")), "current/install");
    assert_tree_eq(&tree(&dest.join("install")), &want);
    assert_only_entries(
        &dest,
        &["versions", "current", "install"].map(String::from).into(),
    );
    let meta = read_meta(&dest, &img.digest);
    assert_eq!(meta["digest"], img.digest.as_str(), "{meta}");
    assert_eq!(meta["target"], "installer-dir", "{meta}");
}

#[test]
fn source_dir_respects_whiteouts_and_opaque_dirs() {
    let reg = Registry::start();
    let a = bytes(60, 200_000);
    let b = bytes(61, 200_000);
    let c = bytes(62, 200_000);
    let d = bytes(63, 200_000);
    let img = Image::oci("arm64")
        .layer(
            Layer::gzip()
                .file("boot/a", a.clone())
                .file("boot/b", b)
                .file("boot/sub/c", c),
        )
        .layer(
            Layer::gzip()
                .whiteout("boot/b")
                .opaque("boot/sub")
                .file("boot/sub/d", d.clone()),
        );
    let img = reg.push_image(REPO, &img, Some("stable"));
    let reference = reference(&reg, REPO, "stable");
    let work = Work::new();
    let dest = work.dest("boot");
    let cfg = Config::new().registry(&reg.host()).target(
        TargetCfg::new("bootdir", &reference, &dest)
            .platform("linux/arm64")
            .dir("boot", "boot"),
    );
    work.sync_once(&work.config(&cfg)).assert_success();
    let want: BTreeMap<String, Vec<u8>> = [("a".to_string(), a), ("sub/d".to_string(), d)].into();
    assert_tree_eq(
        &tree(&dest.join("versions").join(img.hex()).join("boot")),
        &want,
    );
    assert_eq!(
        readlink(&dest.join("current")),
        format!("versions/{}", img.hex())
    );
    assert_eq!(readlink(&dest.join("boot")), "current/boot");
    assert_only_entries(
        &dest,
        &["versions", "current", "boot"].map(String::from).into(),
    );
}

// ---------------------------------------------------------------------------------------------
// Versions: moving tags, retention, no-op syncs, corruption
// ---------------------------------------------------------------------------------------------

#[test]
fn moved_tag_publishes_new_version_and_retain_prunes_oldest() {
    let reg = Registry::start();
    let reference = reference(&reg, REPO, "stable");
    let work = Work::new();
    let dest = work.dest("talos");
    let cfg = Config::new()
        .retain(2)
        .grace("0s")
        .registry(&reg.host())
        .target(demo_target("talos-arm64", &reference, &dest, "arm64"));
    let config = work.config(&cfg);

    let mut pushed = Vec::new();
    for v in 0..3u64 {
        if v > 0 {
            // Keep published_at strictly increasing even at one-second resolution.
            std::thread::sleep(Duration::from_millis(1100));
        }
        let b = boot("arm64", 70 + v);
        let img = reg.push_image(
            REPO,
            &demo_image(Format::Oci, Compression::Gzip, "arm64", 70 + v, &b),
            Some("stable"),
        );
        work.sync_once(&config).assert_success();
        assert_current(
            &dest,
            &Published {
                target: "talos-arm64",
                reference: &reference,
                platform: "linux/arm64",
                digest: &img.digest,
                tag_digest: &img.digest,
                files: &demo_wants("arm64", &b),
            },
        );
        pushed.push((img, b));
        match v {
            0 => assert_eq!(versions(&dest), [pushed[0].0.hex().to_string()].into()),
            1 => {
                // The old version is retained, byte for byte.
                assert_eq!(
                    versions(&dest),
                    [pushed[0].0.hex().to_string(), pushed[1].0.hex().to_string()].into()
                );
                let (old, old_b) = &pushed[0];
                assert_version(
                    &dest,
                    &Published {
                        target: "talos-arm64",
                        reference: &reference,
                        platform: "linux/arm64",
                        digest: &old.digest,
                        tag_digest: &old.digest,
                        files: &demo_wants("arm64", old_b),
                    },
                );
            }
            _ => assert_eq!(
                versions(&dest),
                [pushed[1].0.hex().to_string(), pushed[2].0.hex().to_string()].into(),
                "retain = 2 keeps the two newest"
            ),
        }
    }
}

#[test]
fn unchanged_tag_downloads_no_blob() {
    let reg = Registry::start();
    let b = boot("arm64", 80);
    let img = reg.push_image(
        REPO,
        &demo_image(Format::Oci, Compression::Gzip, "arm64", 80, &b),
        Some("stable"),
    );
    let reference = reference(&reg, REPO, "stable");
    let work = Work::new();
    let dest = work.dest("talos");
    let cfg = Config::new().registry(&reg.host()).target(demo_target(
        "talos-arm64",
        &reference,
        &dest,
        "arm64",
    ));
    let config = work.config(&cfg);
    work.sync_once(&config).assert_success();
    let gets = reg.blob_gets(REPO);
    assert!(gets >= 1, "first sync fetched no blob?");
    let meta = read_meta(&dest, &img.digest);
    let repo_path = format!("/v2/{REPO}/");
    let (heads, all_gets) = (
        reg.requests("HEAD", &repo_path).len(),
        reg.requests("GET", &repo_path).len(),
    );

    work.sync_once(&config).assert_success();
    assert_eq!(
        reg.blob_gets(REPO),
        gets,
        "second sync of an unchanged tag fetched blobs"
    );
    // An unchanged poll is one HEAD of the tag and nothing else.
    assert_eq!(
        (
            reg.requests("HEAD", &repo_path).len() - heads,
            reg.requests("GET", &repo_path).len() - all_gets
        ),
        (1, 0),
        "an unchanged poll: HEADs and GETs"
    );
    assert_eq!(
        read_meta(&dest, &img.digest),
        meta,
        ".bootsync.json rewritten"
    );
    assert_current(
        &dest,
        &Published {
            target: "talos-arm64",
            reference: &reference,
            platform: "linux/arm64",
            digest: &img.digest,
            tag_digest: &img.digest,
            files: &demo_wants("arm64", &b),
        },
    );
}

fn corrupted_blob_case(c: Compression, seed: u64) {
    let reg = Registry::start();
    let reference = reference(&reg, REPO, "stable");
    let work = Work::new();
    let dest = work.dest("talos");
    let cfg = Config::new().registry(&reg.host()).target(demo_target(
        "talos-arm64",
        &reference,
        &dest,
        "arm64",
    ));
    let config = work.config(&cfg);

    let good_b = boot("arm64", seed);
    let good = reg.push_image(
        REPO,
        &demo_image(Format::Oci, c, "arm64", seed, &good_b),
        Some("stable"),
    );
    work.sync_once(&config).assert_success();
    let good_pub = Published {
        target: "talos-arm64",
        reference: &reference,
        platform: "linux/arm64",
        digest: &good.digest,
        tag_digest: &good.digest,
        files: &demo_wants("arm64", &good_b),
    };
    assert_current(&dest, &good_pub);

    // The new version's boot layer: a single big file, so the middle of the blob is file data
    // (for an uncompressed layer the tar still parses; only the digest can tell).
    let bad_b = boot("arm64", seed + 1);
    let bad = reg.push_image(
        REPO,
        &Image::oci("arm64")
            .label("bad")
            .layer(base_layer(c, seed))
            .layer(Layer::new(c).file("assets/talos/arm64/vmlinuz", bad_b.kernel.clone()))
            .layer(Layer::new(c).file("assets/talos/arm64/initramfs.xz", bad_b.initramfs.clone())),
        Some("stable"),
    );
    reg.corrupt_blob(&bad.layers[2].digest);

    let out = work.sync_once(&config);
    out.assert_code(1)
        .assert_stderr_has(&["talos-arm64", "digest"]);
    // The previous version is still current, unchanged, and nothing else was left behind.
    assert_current(&dest, &good_pub);
    assert_eq!(versions(&dest), [good.hex().to_string()].into());
    assert!(
        reg.blob_gets_of(REPO, &bad.layers[2].digest) >= 1,
        "corrupted layer never fetched"
    );
}

#[test]
fn corrupted_uncompressed_blob_is_rejected_by_digest() {
    corrupted_blob_case(Compression::None, 90);
}

#[test]
fn corrupted_gzip_blob_is_rejected_by_digest() {
    corrupted_blob_case(Compression::Gzip, 92);
}

#[test]
fn corrupted_zstd_blob_is_rejected_by_digest() {
    corrupted_blob_case(Compression::Zstd, 94);
}

#[test]
fn sync_once_target_filter() {
    let reg = Registry::start();
    let b = boot("arm64", 100);
    let img = reg.push_image(
        REPO,
        &demo_image(Format::Oci, Compression::Gzip, "arm64", 100, &b),
        Some("stable"),
    );
    let reference = reference(&reg, REPO, "stable");
    let work = Work::new();
    let (d_a, d_b) = (work.dest("a"), work.dest("b"));
    let cfg = Config::new()
        .registry(&reg.host())
        .target(demo_target("a", &reference, &d_a, "arm64"))
        .target(demo_target("b", &reference, &d_b, "arm64"));
    let config = work.config(&cfg);
    work.run(&config, &["sync", "--once", "--target", "a"])
        .assert_success();
    assert_current(
        &d_a,
        &Published {
            target: "a",
            reference: &reference,
            platform: "linux/arm64",
            digest: &img.digest,
            tag_digest: &img.digest,
            files: &demo_wants("arm64", &b),
        },
    );
    assert_nothing_published(&d_b);
}

// ---------------------------------------------------------------------------------------------
// Failures
// ---------------------------------------------------------------------------------------------

#[test]
fn missing_platform_fails_and_lists_available_platforms() {
    let reg = Registry::start();
    let amd = boot("amd64", 110);
    let riscv = boot("riscv64", 111);
    reg.push_index(
        REPO,
        Format::Oci,
        &[
            demo_image(Format::Oci, Compression::Gzip, "amd64", 110, &amd),
            demo_image(Format::Oci, Compression::Gzip, "riscv64", 110, &riscv),
        ],
        "stable",
    );
    let reference = reference(&reg, REPO, "stable");
    let work = Work::new();
    let dest = work.dest("talos");
    let cfg = Config::new().registry(&reg.host()).target(demo_target(
        "talos-arm64",
        &reference,
        &dest,
        "arm64",
    ));
    let out = work.sync_once(&work.config(&cfg));
    out.assert_code(1).assert_stderr_has(&[
        "talos-arm64",
        &reference,
        "platform",
        "linux/arm64",
        "linux/amd64",
        "linux/riscv64",
    ]);
    assert_nothing_published(&dest);
    assert_eq!(
        reg.blob_gets(REPO),
        0,
        "blobs fetched for a missing platform"
    );
}

#[test]
fn missing_tag_fails() {
    let reg = Registry::start();
    let b = boot("arm64", 120);
    reg.push_image(
        REPO,
        &demo_image(Format::Oci, Compression::Gzip, "arm64", 120, &b),
        Some("stable"),
    );
    let reference = reference(&reg, REPO, "no-such-tag");
    let work = Work::new();
    let dest = work.dest("talos");
    let cfg = Config::new().registry(&reg.host()).target(demo_target(
        "talos-arm64",
        &reference,
        &dest,
        "arm64",
    ));
    let out = work.sync_once(&work.config(&cfg));
    out.assert_code(1)
        .assert_stderr_has(&["talos-arm64", "no-such-tag"])
        .assert_stderr_has_any(&[
            "not found",
            "manifest unknown",
            "manifest_unknown",
            "unknown",
        ]);
    assert_nothing_published(&dest);
}

#[test]
fn unreachable_registry_fails_naming_the_host() {
    let port = free_port(); // nothing listens there
    let host = format!("127.0.0.1:{port}");
    let reference = format!("{host}/{REPO}:stable");
    let work = Work::new();
    let dest = work.dest("talos");
    let cfg = Config::new().registry(&host).target(demo_target(
        "talos-arm64",
        &reference,
        &dest,
        "arm64",
    ));
    let started = std::time::Instant::now();
    let out = work.sync_once(&work.config(&cfg));
    out.assert_code(1)
        .assert_stderr_has(&["talos-arm64", &host]);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?} to give up on a refused connection",
        started.elapsed()
    );
    assert_nothing_published(&dest);
}

#[test]
fn one_failing_target_does_not_block_the_others_in_sync_once() {
    let reg = Registry::start();
    let b = boot("arm64", 125);
    let img = reg.push_image(
        REPO,
        &demo_image(Format::Oci, Compression::Gzip, "arm64", 125, &b),
        Some("stable"),
    );
    let good_ref = reference(&reg, REPO, "stable");
    let bad_ref = reference(&reg, REPO, "missing");
    let work = Work::new();
    let (d_good, d_bad) = (work.dest("good"), work.dest("bad"));
    let cfg = Config::new()
        .registry(&reg.host())
        .target(demo_target("bad", &bad_ref, &d_bad, "arm64"))
        .target(demo_target("good", &good_ref, &d_good, "arm64"));
    let out = work.sync_once(&work.config(&cfg));
    out.assert_code(1).assert_stderr_has(&["bad", "missing"]);
    assert_current(
        &d_good,
        &Published {
            target: "good",
            reference: &good_ref,
            platform: "linux/arm64",
            digest: &img.digest,
            tag_digest: &img.digest,
            files: &demo_wants("arm64", &b),
        },
    );
    assert_nothing_published(&d_bad);
}

// ---------------------------------------------------------------------------------------------
// `run` mode and the HTTP API
// ---------------------------------------------------------------------------------------------

#[test]
fn run_mode_reports_failed_targets_next_to_a_healthy_one() {
    let reg = Registry::start();
    let b = boot("arm64", 130);
    let img = reg.push_image(
        REPO,
        &demo_image(Format::Oci, Compression::Gzip, "arm64", 130, &b),
        Some("stable"),
    );
    let good_ref = reference(&reg, REPO, "stable");
    let missing_ref = reference(&reg, REPO, "missing");
    let dead_host = format!("127.0.0.1:{}", free_port());
    let dead_ref = format!("{dead_host}/{REPO}:stable");
    let work = Work::new();
    let (d_good, d_missing, d_dead) = (work.dest("good"), work.dest("missing"), work.dest("dead"));
    let cfg = Config::new()
        .interval("1s")
        .registry(&reg.host())
        .registry(&dead_host)
        .target(demo_target("good", &good_ref, &d_good, "arm64"))
        .target(demo_target(
            "missing-tag",
            &missing_ref,
            &d_missing,
            "arm64",
        ))
        .target(demo_target("dead-registry", &dead_ref, &d_dead, "arm64"));
    let config = work.config(&cfg);
    let mut daemon = work.spawn_run(&config, &cfg.listen);

    let failed = |t: &serde_json::Value| {
        t["state"] == "failed"
            && t["last_error"].as_str().is_some_and(|e| !e.is_empty())
            && t["consecutive_failures"].as_u64().is_some_and(|n| n >= 1)
    };
    let st = daemon.wait_status(
        "good=ok, missing-tag=failed, dead-registry=failed",
        Duration::from_secs(60),
        |s| {
            status_target(s, "good").is_some_and(|t| t["state"] == "ok")
                && status_target(s, "missing-tag").is_some_and(failed)
                && status_target(s, "dead-registry").is_some_and(failed)
        },
    );
    assert_eq!(st["ready"], false, "{st}");
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"), "{st}");

    let good = status_target(&st, "good").unwrap();
    assert_eq!(good["reference"], good_ref.as_str(), "{good}");
    assert_eq!(good["platform"], "linux/arm64", "{good}");
    assert_eq!(good["dest"], d_good.to_str().unwrap(), "{good}");
    assert!(good["last_error"].is_null(), "{good}");
    assert_eq!(good["consecutive_failures"], 0, "{good}");
    assert!(good["last_success"].is_string(), "{good}");
    assert!(good["last_check"].is_string(), "{good}");
    let published = &good["published"];
    assert_eq!(published["digest"], img.digest.as_str(), "{good}");
    assert_eq!(published["tag_digest"], img.digest.as_str(), "{good}");
    let files = published["files"].as_array().expect("published.files");
    for w in demo_wants("arm64", &b) {
        let f = files
            .iter()
            .find(|f| f["name"] == w.name)
            .unwrap_or_else(|| panic!("{} missing in {good}", w.name));
        assert_eq!(f["size"], w.data.len() as u64, "{good}");
        assert_eq!(f["sha256"], sha256_hex(w.data), "{good}");
    }

    let dead = status_target(&st, "dead-registry").unwrap();
    assert!(dead["published"].is_null(), "{dead}");
    assert!(
        dead["last_error"].as_str().unwrap().contains(&dead_host),
        "last_error should name the host: {dead}"
    );
    let missing = status_target(&st, "missing-tag").unwrap();
    assert!(missing["published"].is_null(), "{missing}");

    let readyz = daemon.get("/readyz").expect("GET /readyz");
    assert_eq!(
        readyz.status,
        503,
        "/readyz with failed targets: {}",
        readyz.text()
    );
    let healthz = daemon.get("/healthz").expect("GET /healthz");
    assert_eq!(healthz.status, 200, "/healthz: {}", healthz.text());

    assert_current(
        &d_good,
        &Published {
            target: "good",
            reference: &good_ref,
            platform: "linux/arm64",
            digest: &img.digest,
            tag_digest: &img.digest,
            files: &demo_wants("arm64", &b),
        },
    );
    assert_nothing_published(&d_missing);
    assert_nothing_published(&d_dead);
}

#[test]
fn run_mode_becomes_ready_and_follows_a_moved_tag() {
    let reg = Registry::start();
    let b1 = boot("arm64", 140);
    let v1 = reg.push_image(
        REPO,
        &demo_image(Format::Oci, Compression::Zstd, "arm64", 140, &b1),
        Some("stable"),
    );
    let reference = reference(&reg, REPO, "stable");
    let work = Work::new();
    let dest = work.dest("talos");
    let cfg = Config::new()
        .interval("1s")
        .registry(&reg.host())
        .target(demo_target("talos-arm64", &reference, &dest, "arm64"));
    let config = work.config(&cfg);
    let mut daemon = work.spawn_run(&config, &cfg.listen);

    let st = daemon.wait_status("first version published", Duration::from_secs(60), |s| {
        s["ready"] == true
            && status_target(s, "talos-arm64").is_some_and(|t| {
                t["state"] == "ok" && t["published"]["digest"] == v1.digest.as_str()
            })
    });
    let t = status_target(&st, "talos-arm64").unwrap();
    assert!(t["next_check"].is_string(), "{t}");
    let readyz = daemon.get("/readyz").expect("GET /readyz");
    assert_eq!(
        readyz.status,
        200,
        "/readyz once published: {}",
        readyz.text()
    );

    let b2 = boot("arm64", 141);
    let v2 = reg.push_image(
        REPO,
        &demo_image(Format::Oci, Compression::Zstd, "arm64", 141, &b2),
        Some("stable"),
    );
    daemon.wait_status("moved tag published", Duration::from_secs(60), |s| {
        status_target(s, "talos-arm64")
            .is_some_and(|t| t["state"] == "ok" && t["published"]["digest"] == v2.digest.as_str())
    });
    assert_current(
        &dest,
        &Published {
            target: "talos-arm64",
            reference: &reference,
            platform: "linux/arm64",
            digest: &v2.digest,
            tag_digest: &v2.digest,
            files: &demo_wants("arm64", &b2),
        },
    );
    assert_eq!(
        versions(&dest),
        [v1.hex().to_string(), v2.hex().to_string()].into()
    );
    // Polling an unchanged tag downloads nothing more.
    let gets = reg.blob_gets(REPO);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        reg.blob_gets(REPO),
        gets,
        "blobs fetched while the tag did not move"
    );
}

// ---------------------------------------------------------------------------------------------
// check-config
// ---------------------------------------------------------------------------------------------

fn valid_config(work: &Work) -> Config {
    Config::new().registry("127.0.0.1:5000").target(
        TargetCfg::new(
            "talos-arm64",
            "127.0.0.1:5000/talos/demo:stable",
            &work.dest("talos"),
        )
        .preset("demo"),
    )
}

#[test]
fn check_config_accepts_a_valid_config() {
    let work = Work::new();
    let path = work.config(&valid_config(&work));
    work.check_config(&path).assert_success();
}

#[test]
fn check_config_rejects_unknown_top_level_key() {
    let work = Work::new();
    let path = work.write_config(
        "unknown-top.toml",
        &valid_config(&work).extra_top("colour = \"blue\"").render(),
    );
    work.check_config(&path)
        .assert_code(2)
        .assert_stderr_has(&["colour", path.to_str().unwrap()]);
}

#[test]
fn check_config_rejects_unknown_target_key() {
    let work = Work::new();
    let mut cfg = valid_config(&work);
    cfg.targets[0] = cfg.targets[0].clone().extra("destination = \"/srv/x\"");
    let path = work.write_config("unknown-target.toml", &cfg.render());
    work.check_config(&path)
        .assert_code(2)
        .assert_stderr_has(&["destination", path.to_str().unwrap()]);
}

#[test]
fn check_config_rejects_duplicate_target_names() {
    let work = Work::new();
    let cfg = valid_config(&work).target(
        TargetCfg::new(
            "talos-arm64",
            "127.0.0.1:5000/talos/other:stable",
            &work.dest("other"),
        )
        .preset("demo"),
    );
    let path = work.write_config("duplicate.toml", &cfg.render());
    work.check_config(&path)
        .assert_code(2)
        .assert_stderr_has(&["talos-arm64", path.to_str().unwrap()])
        .assert_stderr_has_any(&["duplicate", "more than once", "twice", "unique"]);
}

#[test]
fn download_cap_stops_a_sync_before_the_layer_is_fetched() {
    let reg = Registry::start();
    let b = boot("arm64", 120);
    let img = reg.push_image(
        REPO,
        &demo_image(Format::Oci, Compression::Zstd, "arm64", 120, &b),
        Some("stable"),
    );
    let reference = reference(&reg, REPO, "stable");
    let work = Work::new();
    let dest = work.dest("talos");
    let cfg = Config::new()
        .registry(&reg.host())
        .extra_top("max_download_size = \"10KB\"")
        .target(demo_target("talos-arm64", &reference, &dest, "arm64"));
    let out = work.sync_once(&work.config(&cfg));
    out.assert_code(1)
        .assert_stderr_has(&["talos-arm64", "max_download_size"]);
    assert_eq!(
        reg.blob_gets_of(REPO, img.layers.last().map(|l| l.digest.as_str()).unwrap()),
        0,
        "the layer over the cap was fetched anyway"
    );
    assert!(!dest.join("current").exists());
}
