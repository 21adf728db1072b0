//! bootsync: keeps a netboot server's kernel and initramfs in step with an OCI image.
//!
//! The binary (`src/main.rs`) is a thin shell over [`cli::main`]. The modules are public so
//! the fuzz targets in `fuzz/` can reach the parsers and checkers.

pub mod assets;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod hook;
pub mod http;
pub mod inspect;
pub mod io;
pub mod logging;
pub mod metrics;
pub mod pins;
pub mod pipeline;
pub mod profile;
pub mod progress;
pub mod registry;
pub mod status;
pub mod store;
pub mod sync;
pub mod systemd;
pub mod testhook;
