//! The tar entry filter and path normaliser: any bytes as an uncompressed layer (its digest made
//! to match) are unpacked into a fresh staging directory; nothing may appear outside it, and
//! only the wanted names inside it.
#![no_main]

use bootsync::fuzzing::{FileSpec, Kind, Limits, Modes};
use bootsync::fuzzing::Digest;
use bootsync::fuzzing::Descriptor;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(root) = tempfile::tempdir() else { return };
    let staging = root.path().join("staging");
    if std::fs::create_dir(&staging).is_err() {
        return;
    }
    let layer = Descriptor {
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        digest: Digest::of(data),
        size: data.len() as u64,
        annotations: Default::default(),
    };
    let files = [
        FileSpec {
            source: "boot/vmlinuz".into(),
            is_dir: false,
            name: "vmlinuz".into(),
            kind: Kind::Raw,
            uki: None,
        },
        FileSpec {
            source: "usr/install".into(),
            is_dir: true,
            name: "install".into(),
            kind: Kind::Raw,
            uki: None,
        },
    ];
    let limits = Limits {
        max_file: 1 << 20,
        max_download: 1 << 30,
        max_ratio: 100,
        max_decompressed: 1 << 24,
    };
    let _ = bootsync::fuzzing::unpack_single_layer(data, &layer, &files, &staging, &Modes::default(), &limits);
    // Nothing but the staging directory at the top.
    let top: Vec<_> = std::fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(top, ["staging"]);
    for entry in std::fs::read_dir(&staging).unwrap() {
        let name = entry.unwrap().file_name();
        assert!(name == "vmlinuz" || name == "install", "unexpected {name:?} in staging");
    }
});
