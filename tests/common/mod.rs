//! Test harness for bootsync's end-to-end tests: a real registry per test, a pure-Rust image
//! builder, and helpers to run the `bootsync` binary and check what it published.
#![allow(dead_code)]

pub mod authfront;
pub mod authreg;
pub mod bootsync;
pub mod chaos;
pub mod data;
pub mod http;
pub mod image;
pub mod lazyfs;
pub mod metrics;
pub mod nginx;
pub mod producers;
pub mod proxy;
pub mod rawimage;
pub mod rawtar;
pub mod registry;
pub mod served;
pub mod signing;
pub mod tmpfs;

pub use bootsync::*;
pub use data::*;
pub use image::{Compression, Format, Image, Layer};
pub use registry::{free_port, Registry};
