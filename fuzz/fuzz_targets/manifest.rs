//! Manifest and index parsing with platform selection: any bytes, fetched "by" their own digest
//! (so the parser is reached), must give a result or an error, never a panic.
#![no_main]

use bootsync::fuzzing::Platform;
use bootsync::fuzzing::{resolve_manifest, Resolved};
use libfuzzer_sys::fuzz_target;
use bootsync::fuzzing::Digest;

fuzz_target!(|data: &[u8]| {
    let digest = Digest::of(data);
    for arch in ["arm64", "amd64"] {
        let platform = Platform {
            os: "linux".into(),
            architecture: arch.into(),
            variant: None,
        };
        for nested in [false, true] {
            if let Ok(Resolved::Follow(next)) = resolve_manifest(data, &digest, &platform, nested) {
                // An index may never send us back to itself.
                assert_ne!(next, digest);
                assert!(!nested);
            }
        }
    }
});
