#!/usr/bin/env bash
# Checks the packages packaging/build.sh made: lintian on the .deb (no errors), then, as root,
# installs it, runs `bootsync --version`, `systemd-analyze verify` on the installed units, checks
# that the user exists and the services are not enabled, removes it and checks nothing of it is
# left but its data; and that the .rpm (`rpm -qlp`) holds the same files.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-$PWD/target}
deb=$(ls -t "$target"/debian/bootsync_*.deb | head -n1)
rpm=$(ls -t "$target"/generate-rpm/bootsync-*.rpm | head -n1)
fail() { echo "packaging/check.sh: $*" >&2; exit 1; }

echo "== lintian $deb"
# Errors fail; warnings and infos are printed. `--suppress-tags` only for what does not apply.
lintian --tag-display-limit 0 "$deb" | tee /tmp/bootsync-lintian.txt || true
if grep -q '^E:' /tmp/bootsync-lintian.txt; then fail "lintian reports errors"; fi

echo "== file lists"
deb_files=$(dpkg-deb -c "$deb" | awk '$1 !~ /^d/ {print $NF}' | sed 's|^\./|/|' | sort)
rpm_files=$(rpm -qlp "$rpm" 2>/dev/null | sort)
# The same files, but for where each distribution keeps zsh completions and licence texts.
norm() {
    sed -e 's|^/usr/share/zsh/vendor-completions/|/usr/share/zsh/COMPLETIONS/|' \
        -e 's|^/usr/share/zsh/site-functions/|/usr/share/zsh/COMPLETIONS/|' \
        -e '\|^/usr/share/doc/bootsync/copyright$|d' \
        -e '\|^/usr/share/doc/bootsync/changelog.Debian.gz$|d' \
        -e '\|^/usr/share/licenses/bootsync/LICENSE$|d'
}
if ! diff <(echo "$deb_files" | norm) <(echo "$rpm_files" | norm); then
    fail "the .deb and the .rpm hold different files (< deb, > rpm)"
fi
for f in /usr/bin/bootsync /usr/lib/systemd/system/bootsync.service \
    /usr/lib/systemd/system/bootsync-once.service /usr/lib/sysusers.d/bootsync.conf \
    /usr/lib/tmpfiles.d/bootsync.conf /usr/share/doc/bootsync/bootsync.example.toml \
    /usr/share/man/man1/bootsync.1.gz /usr/share/bash-completion/completions/bootsync; do
    echo "$deb_files" | grep -qx "$f" || fail "the .deb lacks $f"
done
echo "$(echo "$deb_files" | wc -l) files in each"

if [ "$(id -u)" != 0 ]; then
    echo "== not root: install check skipped (run as root to install and remove the .deb)"
    exit 0
fi
installed() { dpkg-query -W -f='${Status}' bootsync 2>/dev/null | grep -q 'ok installed'; }
if installed; then fail "a bootsync package is already installed"; fi

echo "== dpkg -i"
dpkg -i "$deb"
/usr/bin/bootsync --version | grep -q '^bootsync ' || fail "bootsync --version"
/usr/bin/bootsync --version
getent passwd bootsync >/dev/null || fail "no bootsync user after install"
[ -d /var/lib/bootsync ] && [ -d /etc/bootsync ] || fail "tmpfiles directories missing"
for unit in bootsync.service bootsync-once.service; do
    if ls /etc/systemd/system/*.wants/"$unit" >/dev/null 2>&1; then
        fail "$unit was enabled by the install"
    fi
done
systemd-analyze verify /usr/lib/systemd/system/bootsync.service \
    /usr/lib/systemd/system/bootsync-once.service
man -w bootsync >/dev/null 2>&1 || [ -f /usr/share/man/man1/bootsync.1.gz ] || fail "no man page"
zcat /usr/share/man/man1/bootsync.1.gz | grep -q '^\.TH bootsync 1' || fail "man page header"

echo "== dpkg --purge"
# Purge: the package has no conffiles, and nothing of it may be left for the next run.
dpkg --purge bootsync
installed && fail "still installed after the purge"
[ ! -e /usr/bin/bootsync ] || fail "/usr/bin/bootsync left after removal"
[ ! -e /usr/lib/systemd/system/bootsync.service ] || fail "unit left after removal"
echo "packages ok: $(basename "$deb"), $(basename "$rpm")"
