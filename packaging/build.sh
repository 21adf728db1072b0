#!/usr/bin/env bash
# Builds bootsync's .deb (cargo-deb) and .rpm (cargo-generate-rpm) from this tree:
#   packaging/build.sh            -> $TARGET/debian/bootsync_*.deb, $TARGET/generate-rpm/bootsync-*.rpm
# The man pages and shell completions are generated from the clap definitions
# (examples/package-assets.rs), the units get the packaged binary's path (/usr/bin). Needs
# cargo-deb and cargo-generate-rpm on PATH (`cargo install --locked cargo-deb cargo-generate-rpm`).
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-$PWD/target}
gen=packaging/generated
rm -rf "$gen"
mkdir -p "$gen/systemd"

cargo build --release --locked
# Both packages carry the same stripped binary (symbols are for a debug build, not a bastion).
strip --strip-all -o "$gen/bootsync" "$target/release/bootsync"
# The generator needs only the library's clap definitions: the dev profile (shared with the
# tests) is enough.
cargo run --quiet --locked --example package-assets -- "$gen"
for unit in bootsync.service bootsync-once.service; do
    sed 's|/usr/local/bin/bootsync|/usr/bin/bootsync|g' "systemd/$unit" >"$gen/systemd/$unit"
done
grep -q '/usr/bin/bootsync' "$gen/systemd/bootsync.service"

cargo deb --no-build --locked
cargo generate-rpm --target-dir "$target"
ls "$target"/debian/bootsync_*.deb "$target"/generate-rpm/bootsync-*.rpm
