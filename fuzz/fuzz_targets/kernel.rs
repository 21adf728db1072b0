//! The kernel checks (zboot header and payload, PE/EFI stub, arm64 Image, bzImage), from a
//! file and from a stream: the two must agree.
#![no_main]

use std::io::Cursor;

use bootsync::fuzzing::{check_kernel_stream, check_kernel_with, CheckLimits as Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_decompressed: 64 << 20,
    };
    let file = check_kernel_with(Cursor::new(data), data.len() as u64, &limits);
    // The check made while a file is written must say what the check of the file says.
    if let Some(stream) = check_kernel_stream(data, data.len() as u64, &limits) {
        assert_eq!(format!("{file:?}"), format!("{stream:?}"));
    }
});
