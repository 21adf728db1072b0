//! Boot-file checks by real format (kernel, initramfs, UKI). Being written; see issue 3.
#![allow(dead_code)]
