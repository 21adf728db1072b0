//! bootsync: keeps a netboot server's kernel and initramfs in step with an OCI image.

mod assets;
mod cli;
mod config;
mod daemon;
mod http;
mod io;
mod logging;
mod pipeline;
mod registry;
mod status;
mod store;
mod sync;

fn main() -> std::process::ExitCode {
    cli::main()
}
