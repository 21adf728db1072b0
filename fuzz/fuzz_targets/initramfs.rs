//! The compressed-member walker and cpio parser of the initramfs check.
#![no_main]

use bootsync::fuzzing::{check_initramfs_with, CheckLimits as Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_decompressed: 64 << 20,
    };
    let _ = check_initramfs_with(data, &limits);
});
