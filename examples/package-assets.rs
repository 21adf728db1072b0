//! Writes what the .deb and .rpm carry beside the binary, generated from the clap definitions
//! (never written by hand): `bootsync.1.gz` (and one page per subcommand) and the bash, zsh and
//! fish completions. `packaging/build.sh` runs it: `cargo run --example package-assets -- DIR`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a build helper: a panic is a failed build

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap_complete::Shell;
use flate2::write::GzEncoder;

fn gzip(path: &Path, bytes: &[u8]) {
    // No name or time in the header: the same input gives the same bytes (reproducible).
    let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(bytes).unwrap();
    fs::write(path, gz.finish().unwrap()).unwrap();
}

fn main() {
    let out = PathBuf::from(std::env::args().nth(1).expect("usage: package-assets DIR"));
    let man = out.join("man");
    let completions = out.join("completions");
    fs::create_dir_all(&man).unwrap();
    fs::create_dir_all(&completions).unwrap();

    let cmd = bootsync::command();
    let mut pages = vec![(String::from("bootsync"), cmd.clone())];
    for sub in cmd.get_subcommands() {
        if sub.get_name() != "help" {
            let name = format!("bootsync-{}", sub.get_name());
            let leaked: &'static str = Box::leak(name.clone().into_boxed_str());
            pages.push((name, sub.clone().name(leaked)));
        }
    }
    for (name, page) in pages {
        let mut roff = Vec::new();
        clap_mangen::Man::new(page).render(&mut roff).unwrap();
        gzip(&man.join(format!("{name}.1.gz")), &roff);
    }
    for (shell, file) in [
        (Shell::Bash, "bootsync"),
        (Shell::Zsh, "_bootsync"),
        (Shell::Fish, "bootsync.fish"),
    ] {
        let mut cmd = bootsync::command();
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut cmd, "bootsync", &mut text);
        fs::write(completions.join(file), text).unwrap();
    }
    println!("wrote {} and {}", man.display(), completions.display());
}
