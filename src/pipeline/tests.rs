//! The pipeline over layers held in memory: what is published, what is read twice, what is
//! refused. Images from real producers are tested end to end in `tests/producers.rs`.

use super::*;
use crate::bootfile::Kind;
use std::io::Write;

fn spec(source: &str, is_dir: bool, name: &str) -> FileSpec {
    FileSpec {
        source: source.into(),
        is_dir,
        name: name.into(),
        kind: Kind::Raw,
        uki: None,
    }
}

fn descriptor(media_type: &str, blob: &[u8], title: Option<&str>) -> Descriptor {
    Descriptor {
        media_type: media_type.into(),
        digest: Digest::of(blob),
        size: blob.len() as u64,
        annotations: title
            .map(|t| (layer::TITLE.to_string(), t.to_string()))
            .into_iter()
            .collect(),
    }
}

const TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// Entries: `path` = file with content `data`; `path/` = directory; `path -> t` = symlink;
/// `path => t` = hard link.
fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        if let Some((p, t)) = path.split_once(" -> ") {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, p, t).unwrap();
        } else if let Some((p, t)) = path.split_once(" => ") {
            h.set_entry_type(tar::EntryType::Link);
            h.set_size(0);
            b.append_link(&mut h, p, t).unwrap();
        } else if let Some(d) = path.strip_suffix('/') {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            b.append_data(&mut h, d, &[][..]).unwrap();
        } else {
            h.set_size(data.len() as u64);
            b.append_data(&mut h, path, *data).unwrap();
        }
    }
    b.into_inner().unwrap()
}

/// Runs the pipeline over `blobs` (bottom layer first) and returns staging and the result, with
/// how many layer reads there were.
fn run(
    blobs: &[(Descriptor, Vec<u8>)],
    layouts: &[Layout],
    limits: &Limits,
) -> (tempfile::TempDir, Result<Extracted, PipelineError>) {
    let dir = tempfile::tempdir().unwrap();
    let layers: Vec<Descriptor> = blobs.iter().map(|(d, _)| d.clone()).collect();
    let fetch = InMemory {
        blobs: blobs
            .iter()
            .map(|(d, b)| (d.digest.clone(), b.as_slice()))
            .collect(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let modes = Modes::default();
    let r = rt.block_on(async {
        Run::new(&layers, layouts, dir.path(), &modes, limits)?
            .extract(&fetch)
            .await
    });
    (dir, r)
}

fn layer_of(entries: &[(&str, &[u8])]) -> (Descriptor, Vec<u8>) {
    let blob = tar_of(entries);
    (descriptor(TAR, &blob, None), blob)
}

fn one(files: &[FileSpec]) -> Vec<Layout> {
    vec![Layout {
        files: files.to_vec(),
    }]
}

fn names(e: &Extracted) -> Vec<&str> {
    e.files.iter().map(|f| f.name.as_str()).collect()
}

#[test]
fn a_tar_layer_yields_the_wanted_files_only() {
    let layers = [layer_of(&[
        ("boot/vmlinuz", b"kernel"),
        ("etc/passwd", b"root"),
        ("usr/install/a/b", b"bee"),
    ])];
    let files = [
        spec("boot/vmlinuz", false, "k"),
        spec("usr/install", true, "inst"),
    ];
    let (dir, r) = run(&layers, &one(&files), &Limits::default());
    let e = r.unwrap();
    assert_eq!(names(&e), ["inst/a/b", "k"]);
    assert_eq!(fs::read(dir.path().join("k")).unwrap(), b"kernel");
    assert!(!dir.path().join("etc").exists());
    // nothing left over from the captures
    assert!(!dir.path().join(".parts").exists());
}

#[test]
fn a_corrupt_blob_is_reported_as_a_digest_mismatch() {
    let (desc, blob) = layer_of(&[("boot/vmlinuz", b"kernel")]);
    let mut bad = blob.clone();
    bad[600] ^= 0xff;
    let files = one(&[spec("boot/vmlinuz", false, "k")]);
    let (_d, r) = run(&[(desc.clone(), bad)], &files, &Limits::default());
    assert!(
        matches!(r, Err(PipelineError::DigestMismatch { .. })),
        "{r:?}"
    );
    let mut long = blob.clone();
    long.extend_from_slice(&[0; 512]);
    let (_d, r) = run(&[(desc, long)], &files, &Limits::default());
    assert!(r.is_err());
}

#[test]
fn artifact_files_are_their_blobs_byte_for_byte() {
    let content = b"initramfs bytes ".repeat(1000);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&content).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::encode_all(&content[..], 1).unwrap();
    for (media_type, blob) in [
        ("application/vnd.example.file", content.clone()),
        ("application/vnd.example.file+gzip", gz),
        ("application/vnd.example.file+zstd", zst),
    ] {
        let desc = descriptor(media_type, &blob, Some("initramfs.xz"));
        let (dir, r) = run(
            &[(desc, blob.clone())],
            &one(&[spec("initramfs.xz", false, "initrd")]),
            &Limits::default(),
        );
        assert_eq!(r.unwrap().files.len(), 1, "{media_type}");
        assert_eq!(
            fs::read(dir.path().join("initrd")).unwrap(),
            blob,
            "{media_type}"
        );
    }
}

#[test]
fn unwanted_artifact_files_are_never_read() {
    let wanted = b"kernel".to_vec();
    let other = b"something else".to_vec();
    let layers = [
        (
            descriptor("application/x", &wanted, Some("vmlinuz")),
            wanted.clone(),
        ),
        // a blob that would fail its digest if it were read
        (
            descriptor("application/x", &other, Some("README")),
            b"garbage".to_vec(),
        ),
    ];
    let (dir, r) = run(
        &layers,
        &one(&[spec("vmlinuz", false, "k")]),
        &Limits::default(),
    );
    r.unwrap();
    assert_eq!(fs::read(dir.path().join("k")).unwrap(), wanted);
}

#[test]
fn files_over_the_size_cap_are_refused() {
    let layers = [layer_of(&[("boot/vmlinuz", &[7u8; 4096])])];
    let limits = Limits {
        max_file: 1024,
        ..Limits::default()
    };
    let (_d, r) = run(&layers, &one(&[spec("boot/vmlinuz", false, "k")]), &limits);
    assert!(
        matches!(
            r,
            Err(PipelineError::Limit {
                limit: "max_file_size",
                ..
            })
        ),
        "{r:?}"
    );
    let raw = vec![7u8; 4096];
    let desc = descriptor("application/octet-stream", &raw, Some("vmlinuz"));
    let (_d, r) = run(
        &[(desc, raw)],
        &one(&[spec("vmlinuz", false, "k")]),
        &limits,
    );
    assert!(
        matches!(
            r,
            Err(PipelineError::Limit {
                limit: "max_file_size",
                ..
            })
        ),
        "{r:?}"
    );
}

#[test]
fn a_directory_replaced_by_a_symlink_hides_the_lower_files() {
    // buildah: `rm -rf a; ln -s nowhere a` in the upper layer
    let layers = [
        layer_of(&[("a/b", b"lower")]),
        layer_of(&[("a -> nowhere", b"")]),
    ];
    let (_d, r) = run(
        &layers,
        &one(&[spec("a/b", false, "b")]),
        &Limits::default(),
    );
    let e = r.unwrap_err().to_string();
    assert!(e.contains("a/b") && e.contains("nowhere"), "{e}");
}

#[test]
fn symlinks_publish_their_target_inside_the_image() {
    let layers = [
        layer_of(&[("boot/vmlinuz-6.1", b"the kernel")]),
        layer_of(&[("usr/install/arm64/vmlinuz -> /boot/vmlinuz-6.1", b"")]),
    ];
    let (dir, r) = run(
        &layers,
        &one(&[spec("usr/install/arm64/vmlinuz", false, "k")]),
        &Limits::default(),
    );
    let e = r.unwrap();
    assert_eq!(fs::read(dir.path().join("k")).unwrap(), b"the kernel");
    assert_eq!(e.files[0].source, "usr/install/arm64/vmlinuz");
}

#[test]
fn a_hard_link_to_an_earlier_entry_reads_its_layer_again() {
    let layers = [layer_of(&[
        ("boot/vmlinuz-6.1", b"linked kernel"),
        ("usr/install/arm64/vmlinuz => boot/vmlinuz-6.1", b""),
    ])];
    let (dir, r) = run(
        &layers,
        &one(&[spec("usr/install/arm64/vmlinuz", false, "k")]),
        &Limits::default(),
    );
    r.unwrap();
    assert_eq!(fs::read(dir.path().join("k")).unwrap(), b"linked kernel");
}

#[test]
fn a_link_from_a_lower_layer_into_an_upper_one_is_followed() {
    let layers = [
        layer_of(&[("usr/install -> /opt/install", b"")]),
        layer_of(&[("opt/install/vmlinuz", b"upper")]),
    ];
    let (dir, r) = run(
        &layers,
        &one(&[spec("usr/install/vmlinuz", false, "k")]),
        &Limits::default(),
    );
    r.unwrap();
    assert_eq!(fs::read(dir.path().join("k")).unwrap(), b"upper");
}

#[test]
fn a_tar_without_its_end_blocks_is_accepted_and_a_truncated_one_is_not() {
    // umoci 0.4.7 insert: header, data, no padding, no trailer
    let whole = tar_of(&[("usr/install/arm64/vmlinuz", b"hello kernel\n")]);
    let cut = whole[..512 + 13].to_vec();
    let (dir, r) = run(
        &[(descriptor(TAR, &cut, None), cut.clone())],
        &one(&[spec("usr/install/arm64/vmlinuz", false, "k")]),
        &Limits::default(),
    );
    r.unwrap();
    assert_eq!(fs::read(dir.path().join("k")).unwrap(), b"hello kernel\n");

    let short = whole[..512 + 5].to_vec();
    let (_d, r) = run(
        &[(descriptor(TAR, &short, None), short.clone())],
        &one(&[spec("usr/install/arm64/vmlinuz", false, "k")]),
        &Limits::default(),
    );
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("usr/install/arm64/vmlinuz") && e.contains("truncated") && e.contains("offset"),
        "{e}"
    );
}

#[test]
fn the_first_layout_complete_going_down_wins() {
    let uki_layout = Layout {
        files: vec![spec("i/vmlinuz.efi", false, "uki")],
    };
    let split = Layout {
        files: vec![
            spec("i/vmlinuz", false, "k"),
            spec("i/initramfs.xz", false, "i"),
        ],
    };
    let layouts = [split, uki_layout];
    // top layer: only the UKI; the split files sit in a lower layer (never read)
    let bottom = tar_of(&[("i/vmlinuz", b"k"), ("i/initramfs.xz", b"i")]);
    let layers = [
        (descriptor(TAR, &bottom, None), b"not even read".to_vec()),
        layer_of(&[("i/vmlinuz.efi", b"uki")]),
    ];
    let (_d, r) = run(&layers, &layouts, &Limits::default());
    let e = r.unwrap();
    assert_eq!(e.layout, 1);
    assert_eq!(names(&e), ["uki"]);
    // both in one layer: config order
    let layers = [layer_of(&[
        ("i/vmlinuz", b"k"),
        ("i/initramfs.xz", b"i"),
        ("i/vmlinuz.efi", b"uki"),
    ])];
    let (_d, r) = run(&layers, &layouts, &Limits::default());
    assert_eq!(r.unwrap().layout, 0);
}

#[test]
fn not_found_names_what_the_image_holds() {
    let layers = [layer_of(&[
        ("usr/install/amd64/vmlinuz", b"k"),
        ("etc/x", b"x"),
    ])];
    let (_d, r) = run(
        &layers,
        &one(&[spec("usr/install/arm64/vmlinuz", false, "k")]),
        &Limits::default(),
    );
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains("usr/install/arm64/vmlinuz")
            && e.contains("not found")
            && e.contains("usr/install/amd64/vmlinuz")
            && e.contains("[[target.files]]"),
        "{e}"
    );
}

#[test]
fn links_inside_a_copied_directory_publish_their_targets_or_are_refused() {
    let layers = [layer_of(&[
        ("d/real", b"real"),
        ("d/alias -> real", b""),
        ("d/hard => d/real", b""),
    ])];
    let (dir, r) = run(&layers, &one(&[spec("d", true, "out")]), &Limits::default());
    let e = r.unwrap();
    assert_eq!(names(&e), ["out/alias", "out/hard", "out/real"]);
    assert_eq!(fs::read(dir.path().join("out/alias")).unwrap(), b"real");
    let layers = [layer_of(&[
        ("d/real", b"real"),
        ("d/shadow -> /etc/shadow", b""),
    ])];
    let (_d, r) = run(&layers, &one(&[spec("d", true, "out")]), &Limits::default());
    let e = r.unwrap_err().to_string();
    assert!(e.contains("d/shadow") && e.contains("regular file"), "{e}");
}

#[test]
fn unpack_single_layer_serves_the_fuzz_targets() {
    let blob = tar_of(&[("boot/vmlinuz", b"kernel")]);
    let desc = descriptor(TAR, &blob, None);
    let dir = tempfile::tempdir().unwrap();
    let files = unpack_single_layer(
        &blob,
        &desc,
        &[spec("boot/vmlinuz", false, "vmlinuz")],
        dir.path(),
        &Modes::default(),
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(files.len(), 1);
    assert_eq!(fs::read(dir.path().join("vmlinuz")).unwrap(), b"kernel");
}

#[test]
fn an_initramfs_is_checked_as_it_is_written_and_a_broken_one_is_refused() {
    use crate::bootfile::testdata::{cpio, noise, zstd};
    let init = |name: &str| FileSpec {
        kind: Kind::Initramfs,
        ..spec("boot/initramfs", false, name)
    };
    // Large enough for the check beside the write (STREAM_CHECK_MIN).
    let payload = noise(600 << 10, 7);
    let good = zstd(&cpio(&[("init", &payload)]));
    assert!(good.len() as u64 >= STREAM_CHECK_MIN);
    let (dir, r) = run(
        &[layer_of(&[("boot/initramfs", &good)])],
        &one(&[init("initramfs")]),
        &Limits::default(),
    );
    let e = r.unwrap();
    assert_eq!(names(&e), ["initramfs"]);
    assert_eq!(fs::read(dir.path().join("initramfs")).unwrap(), good);

    // The same frame cut short: the check beside the write refuses it, naming the file.
    let broken = &good[..good.len() - 1000];
    let (_dir, r) = run(
        &[layer_of(&[("boot/initramfs", broken)])],
        &one(&[init("initramfs")]),
        &Limits::default(),
    );
    match r {
        Err(PipelineError::Check { file, kind, .. }) => {
            assert_eq!((file.as_str(), kind), ("initramfs", Kind::Initramfs))
        }
        other => panic!("{other:?}"),
    }

    // Checked as an initramfs while written, but published as raw: no initramfs verdict is
    // applied to it (a raw file is only hashed).
    let (_dir, r) = run(
        &[layer_of(&[("boot/initramfs", broken)])],
        &one(&[spec("boot/initramfs", false, "blob")]),
        &Limits::default(),
    );
    assert_eq!(names(&r.unwrap()), ["blob"]);
}

#[test]
fn a_kernel_is_checked_as_it_is_written() {
    use crate::bootfile::testdata::{gzip, noise, zboot_with};
    let dir = tempfile::tempdir().unwrap();
    let limits = crate::bootfile::Limits::default();
    let layer = Digest::of(b"layer");
    let write = |bytes: &[u8], size: u64| {
        let target = dir.path().join("k");
        let mut entry = bytes;
        let check = Some((&limits, size));
        write_file(&mut entry, &target, &Modes::default(), &layer, check).unwrap()
    };
    // A zboot kernel whose gzip payload (an arm64 Image) is decoded beside the write.
    let image = crate::bootfile::testdata::arm64_image(512 << 10);
    let good = zboot_with("gzip", &gzip(&image));
    let (size, sha, pre) = write(&good, good.len() as u64);
    assert_eq!(
        (size, sha),
        (good.len() as u64, Digest::of(&good).hex().to_string())
    );
    let pre = pre.expect("checked beside the write");
    assert_eq!(pre.kind, Kind::Kernel);
    let verdict = pre.checked.unwrap();
    assert!(verdict.format.contains("decodes to a"), "{verdict}");

    // A flipped byte inside the payload: refused by the check beside the write.
    let mut bad = good.clone();
    bad[0x1000 + 300] ^= 0x40;
    let pre = write(&bad, bad.len() as u64).2.unwrap();
    assert_eq!(pre.kind, Kind::Kernel);
    let e = pre.checked.unwrap_err();
    assert_eq!(e.check, "zboot payload", "{e}");

    // The layer said the file is longer than what came: no verdict (it is read back, if the
    // layer is not refused first).
    assert!(write(&good, good.len() as u64 + 1).2.is_none());
    // Neither kernel nor initramfs by its first bytes: nothing runs beside the write.
    assert!(write(&noise(300 << 10, 3), 300 << 10).2.is_none());
}

#[test]
fn a_kernel_refused_in_the_stream_is_refused_by_name() {
    use crate::bootfile::testdata::{arm64_image, gzip, zboot_with};
    let kernel = |name: &str| FileSpec {
        kind: Kind::Kernel,
        ..spec("boot/vmlinuz", false, name)
    };
    let mut k = zboot_with("gzip", &gzip(&arm64_image(512 << 10)));
    assert!(k.len() as u64 >= STREAM_CHECK_MIN);
    let (dir, r) = run(
        &[layer_of(&[("boot/vmlinuz", &k)])],
        &one(&[kernel("vmlinuz")]),
        &Limits::default(),
    );
    assert_eq!(names(&r.unwrap()), ["vmlinuz"]);
    assert_eq!(fs::read(dir.path().join("vmlinuz")).unwrap(), k);
    let at = k.len() - 0x200 - 8;
    k[at] ^= 1; // the gzip trailer's CRC
    let (_dir, r) = run(
        &[layer_of(&[("boot/vmlinuz", &k)])],
        &one(&[kernel("vmlinuz")]),
        &Limits::default(),
    );
    match r {
        Err(PipelineError::Check { file, kind, source }) => {
            assert_eq!((file.as_str(), kind), ("vmlinuz", Kind::Kernel));
            assert_eq!(source.check, "zboot payload", "{source}");
        }
        other => panic!("{other:?}"),
    }
}
