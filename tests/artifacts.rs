//! Images that are not plain container images: ORAS-style artifacts whose layers are single
//! files named by their title annotation, and Talos >= 1.10 installers that ship only a UKI.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic: a panic is a failure

#[allow(unused_imports)] // each test binary uses a different part of the harness
mod common;

use common::*;
use serde_json::json;

const REPO: &str = "talos/artifact";

fn title_layer(media_type: &str, blob: &[u8], title: &str) -> serde_json::Value {
    json!({
        "mediaType": media_type,
        "digest": digest_of(blob),
        "size": blob.len(),
        "annotations": { "org.opencontainers.image.title": title },
    })
}

#[test]
fn oras_artifact_files_are_taken_by_title_and_unwanted_ones_never_fetched() {
    let reg = Registry::start();
    let kernel = fake_kernel("arm64", 501, 300_000);
    let initramfs = fake_initramfs(502, 400_000);
    let readme = bytes(503, 200_000);

    // An artifact's file is its blob, byte for byte, whatever the media type says (`oras pull`
    // writes it unchanged): a `+gzip` file stays gzip. And a README nobody asked for.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, b"release notes\n").unwrap();
    let notes_gz = gz.finish().unwrap();
    let empty = b"{}".to_vec();
    for blob in [&kernel, &notes_gz, &initramfs, &readme, &empty] {
        reg.push_blob(REPO, blob);
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.example.talos.boot",
        "config": { "mediaType": "application/vnd.oci.empty.v1+json", "digest": digest_of(&empty), "size": 2 },
        "layers": [
            title_layer("application/vnd.example.kernel", &kernel, "vmlinuz-arm64"),
            title_layer("application/vnd.example.notes+gzip", &notes_gz, "notes.txt.gz"),
            title_layer("application/vnd.example.initramfs", &initramfs, "initramfs-arm64.xz"),
            title_layer("text/markdown", &readme, "README.md"),
        ],
    }))
    .unwrap();
    let digest = reg.push_manifest(
        REPO,
        "v1",
        "application/vnd.oci.image.manifest.v1+json",
        &manifest,
    );

    let work = Work::new();
    let dest = work.dest("talos");
    let reference = format!("{}/{REPO}:v1", reg.host());
    let target = TargetCfg::new("talos-arm64", &reference, &dest)
        .file("vmlinuz-arm64", "vmlinuz-arm64")
        .file("initramfs-arm64.xz", "initramfs-arm64.xz")
        .file("notes.txt.gz", "notes.txt.gz");
    let config = work.config(&Config::new().registry(&reg.host()).target(target));
    work.sync_once(&config).assert_success();

    let version = dest.join("versions").join(hex_of(&digest));
    assert_eq!(
        std::fs::read(version.join("vmlinuz-arm64")).unwrap(),
        kernel
    );
    assert_eq!(
        std::fs::read(version.join("initramfs-arm64.xz")).unwrap(),
        initramfs
    );
    assert_eq!(std::fs::read(dest.join("vmlinuz-arm64")).unwrap(), kernel);
    assert_eq!(
        reg.blob_gets_of(REPO, &digest_of(&readme)),
        0,
        "the unwanted README was downloaded"
    );
    assert_eq!(
        std::fs::read(version.join("notes.txt.gz")).unwrap(),
        notes_gz,
        "a +gzip artifact file was changed"
    );
    assert_eq!(reg.blob_gets_of(REPO, &digest_of(&kernel)), 1);
}

/// A minimal PE32+ EFI application with the given sections (what systemd's ukify makes).
fn pe(sections: &[(&str, &[u8])]) -> Vec<u8> {
    const E_LFANEW: usize = 0x80;
    const OPT: usize = 240;
    let table = E_LFANEW + 4 + 20 + OPT;
    let headers = (table + 40 * sections.len()).next_multiple_of(0x200);
    let mut out = vec![0u8; headers];
    out[0..2].copy_from_slice(b"MZ");
    out[0x3C..0x40].copy_from_slice(&(E_LFANEW as u32).to_le_bytes());
    out[E_LFANEW..E_LFANEW + 4].copy_from_slice(b"PE\0\0");
    let coff = E_LFANEW + 4;
    out[coff..coff + 2].copy_from_slice(&0xAA64u16.to_le_bytes());
    out[coff + 2..coff + 4].copy_from_slice(&(sections.len() as u16).to_le_bytes());
    out[coff + 16..coff + 18].copy_from_slice(&(OPT as u16).to_le_bytes());
    out[coff + 18..coff + 20].copy_from_slice(&0x22u16.to_le_bytes());
    let opt = coff + 20;
    out[opt..opt + 2].copy_from_slice(&0x20Bu16.to_le_bytes());
    out[opt + 32..opt + 36].copy_from_slice(&0x1000u32.to_le_bytes());
    out[opt + 36..opt + 40].copy_from_slice(&0x200u32.to_le_bytes());
    out[opt + 68..opt + 70].copy_from_slice(&10u16.to_le_bytes());
    out[opt + 108..opt + 112].copy_from_slice(&16u32.to_le_bytes());
    let mut va = 0x1000usize;
    let mut body = Vec::new();
    for (i, (name, data)) in sections.iter().enumerate() {
        let raw_size = data.len().next_multiple_of(0x200);
        let s = table + 40 * i;
        out[s..s + name.len()].copy_from_slice(name.as_bytes());
        out[s + 8..s + 12].copy_from_slice(&(data.len() as u32).to_le_bytes());
        out[s + 12..s + 16].copy_from_slice(&(va as u32).to_le_bytes());
        out[s + 16..s + 20].copy_from_slice(&(raw_size as u32).to_le_bytes());
        out[s + 20..s + 24].copy_from_slice(&((headers + body.len()) as u32).to_le_bytes());
        body.extend_from_slice(data);
        body.resize(body.len() + raw_size - data.len(), 0);
        va += data.len().next_multiple_of(0x1000);
    }
    out[opt + 56..opt + 60].copy_from_slice(&(va as u32).to_le_bytes());
    out[opt + 60..opt + 64].copy_from_slice(&(headers as u32).to_le_bytes());
    out.extend(body);
    out
}

#[test]
fn a_uki_is_split_into_kernel_initramfs_and_cmdline() {
    let reg = Registry::start();
    let kernel = fake_kernel("arm64", 601, 200_000);
    let initramfs = fake_initramfs(602, 300_000);
    let cmdline = "talos.platform=metal console=ttyAMA0";
    let uki = pe(&[
        (".linux", &kernel),
        (".initrd", &initramfs),
        (".cmdline", format!("{cmdline}\0").as_bytes()),
    ]);
    let image = reg.push_image(
        REPO,
        &Image::oci("arm64")
            .layer(Layer::zstd().file("usr/install/arm64/vmlinuz.efi", uki.clone())),
        Some("uki"),
    );
    let work = Work::new();
    let dest = work.dest("talos");
    let reference = format!("{}/{REPO}:uki", reg.host());
    // The harness's file specs have no `kind`: write this target by hand.
    let text = format!(
        "state_dir = {}\n{}\n[[target]]\nname = \"talos-uki\"\nreference = {}\ndest = {}\n\
         [[target.files]]\nsource = \"usr/install/arm64/vmlinuz.efi\"\nname = \"talos-arm64\"\nkind = \"uki\"\n",
        q(work.path().join("state").to_str().unwrap()),
        Config::new().registry(&reg.host()).render(),
        q(&reference),
        q(dest.to_str().unwrap()),
    );
    let config = work.write_config("bootsync.toml", &text);
    work.sync_once(&config).assert_success();

    assert_eq!(
        std::fs::read(dest.join("talos-arm64.vmlinuz")).unwrap(),
        kernel
    );
    assert_eq!(
        std::fs::read(dest.join("talos-arm64.initramfs")).unwrap(),
        initramfs
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("talos-arm64.cmdline")).unwrap(),
        cmdline
    );
    let meta = read_meta(&dest, &image.digest);
    let names: Vec<&str> = meta["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "talos-arm64.cmdline",
            "talos-arm64.initramfs",
            "talos-arm64.vmlinuz"
        ]
    );
    // The UKI itself is not published (only its parts), and no temp copy is left.
    let version = dest.join("versions").join(image.hex());
    assert_eq!(entries(&version).len(), 4, "{:?}", entries(&version));

    // A UKI whose .initrd is truncated is refused, and the good version keeps serving.
    let mut broken = initramfs.clone();
    broken.truncate(broken.len() / 2);
    let bad = pe(&[(".linux", &kernel), (".initrd", &broken)]);
    reg.push_image(
        REPO,
        &Image::oci("arm64")
            .label("bad")
            .layer(Layer::zstd().file("usr/install/arm64/vmlinuz.efi", bad)),
        Some("uki"),
    );
    let out = work.sync_once(&config);
    out.assert_code(1)
        .assert_stderr_has(&["talos-arm64", "uki", "initramfs"]);
    assert_eq!(
        std::fs::read(dest.join("talos-arm64.initramfs")).unwrap(),
        initramfs
    );
}
