//! The kernel checks (zboot header and payload, PE/EFI stub, arm64 Image, bzImage).
#![no_main]

use std::io::Cursor;

use bootsync::fuzzing::{check_kernel_with, CheckLimits as Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_decompressed: 64 << 20,
    };
    let _ = check_kernel_with(Cursor::new(data), data.len() as u64, &limits);
});
