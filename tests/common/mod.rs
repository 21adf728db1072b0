//! Test harness for bootsync's end-to-end tests: a real registry per test, a pure-Rust image
//! builder, and helpers to run the `bootsync` binary and check what it published.
#![allow(dead_code)]

pub mod bootsync;
pub mod data;
pub mod http;
pub mod image;
pub mod registry;

pub use bootsync::*;
pub use data::*;
pub use image::{Compression, Format, Image, Layer};
pub use registry::{free_port, Registry};
