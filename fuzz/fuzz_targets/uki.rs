//! The PE section reader and UKI splitter, on a file (PE parsing needs random access).
#![no_main]

use bootsync::fuzzing::{extract_uki_with, CheckLimits as Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let uki = dir.path().join("uki.efi");
    if std::fs::write(&uki, data).is_err() {
        return;
    }
    let limits = Limits {
        max_decompressed: 64 << 20,
    };
    let _ = extract_uki_with(
        &uki,
        &dir.path().join("k"),
        &dir.path().join("i"),
        &dir.path().join("c"),
        &limits,
    );
});
