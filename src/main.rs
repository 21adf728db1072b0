//! The `bootsync` command: see `bootsync --help` and the README.

fn main() -> std::process::ExitCode {
    bootsync::main()
}
