//! bootsync: keeps a netboot server's kernel and initramfs in step with an OCI image.

mod assets;
mod cli;
mod config;
mod daemon;
mod hook;
mod http;
mod io;
mod logging;
mod metrics;
mod pins;
mod pipeline;
mod profile;
mod progress;
mod registry;
mod status;
mod store;
mod sync;
mod systemd;
mod testhook;

fn main() -> std::process::ExitCode {
    cli::main()
}
