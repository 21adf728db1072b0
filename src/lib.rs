//! bootsync: keeps a netboot server's kernel and initramfs in step with an OCI image.
//!
//! `docs/ARCHITECTURE.md` is the map. Data flows one way: `registry` -> `pipeline` (with the
//! `bootfile` checks) -> `store` -> `agent` (one state machine per target) -> `service` (the
//! daemon, its API, status and metrics) and `cli`. Everything is crate-private except `main` and
//! the narrow facade the fuzz targets need, below.

mod agent;
mod backoff;
mod bootfile;
mod cli;
mod config;
mod digest;
mod inspect;
mod io;
mod pipeline;
mod reference;
mod registry;
mod service;
mod signature;
mod store;
mod testhook;
mod text;

/// The `bootsync` command (`src/main.rs` is a thin shell over it).
pub use cli::main;

/// The command line's clap definition, for what packages generate from it (the man page and
/// shell completions: `examples/package-assets.rs`).
pub fn command() -> clap::Command {
    <cli::Cli as clap::CommandFactory>::command()
}

/// What the fuzz targets reach, and nothing else outside the crate: the parsers and checks that
/// hostile input meets first.
pub mod fuzzing {
    pub use crate::bootfile::{
        check_initramfs_with, check_kernel_stream, check_kernel_with, extract_uki_with,
        Limits as CheckLimits,
    };
    pub use crate::config::{FileSpec, Kind, Limits, Modes, Platform};
    pub use crate::digest::Digest;
    pub use crate::pipeline::unpack_single_layer;
    pub use crate::registry::{
        bundle_layer, bundle_referrers, resolve_manifest, signature_layers, Descriptor, Resolved,
    };
    pub use crate::signature::{claim, verify, IdentitySpec, Material, Policy};
}
