#!/bin/sh
# Installs bootsync: binary, systemd units, sysusers.d/tmpfiles.d snippets, example configuration.
# Idempotent: a second run with the same inputs changes nothing. See `deploy/install.sh --help`.
set -eu
umask 022

usage() {
	cat <<'EOF'
Usage: deploy/install.sh [--no-start] [--help]

Installs bootsync on this host (or into a scratch root with DESTDIR):

  $PREFIX/bin/bootsync                             the binary (from $BOOTSYNC_BIN)
  $PREFIX/lib/systemd/system/bootsync.service      daemon unit
  $PREFIX/lib/systemd/system/bootsync-once.service one pass at boot, before matchbox.service
  $PREFIX/lib/sysusers.d/bootsync.conf             system user and group `bootsync`
  $PREFIX/lib/tmpfiles.d/bootsync.conf             /var/lib/matchbox/assets, /var/lib/bootsync,
                                                   /etc/bootsync (modes and owners)
  $PREFIX/share/doc/bootsync/                      README, example config, matchbox examples
  /etc/bootsync/bootsync.toml                      example config, only if none exists
  /etc/bootsync/config.d/                          drop-in directory (*.toml)

For a PREFIX other than /usr or /usr/local (which systemd does not search), units and snippets
go to /etc/systemd/system, /etc/sysusers.d and /etc/tmpfiles.d instead.

Then creates the `bootsync` user and group (systemd-sysusers, or useradd where it is missing),
applies the tmpfiles.d snippet, and, only when DESTDIR is empty and systemd is running:
`systemctl daemon-reload`, enables bootsync-once.service and enables and starts bootsync.service
(restarting it when the binary or a unit changed). An existing /etc/bootsync/bootsync.toml is
never overwritten. Running it again changes nothing.

Options:
  --no-start   enable the units but do not start or restart bootsync.service
  -h, --help   show this text

Environment:
  BOOTSYNC_BIN  binary to install (default: target/release/bootsync in the source tree)
  PREFIX        installation prefix (default: /usr/local)
  DESTDIR       scratch root to install into; users are then created in $DESTDIR/etc only,
                and systemctl is not called (default: empty, the live system)
EOF
}

START=yes
for arg in "$@"; do
	case $arg in
	-h | --help)
		usage
		exit 0
		;;
	--no-start) START=no ;;
	*)
		echo "install.sh: unknown argument: $arg" >&2
		usage >&2
		exit 2
		;;
	esac
done

say() { printf 'install.sh: %s\n' "$*"; }
die() {
	printf 'install.sh: error: %s\n' "$*" >&2
	exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

SRCDIR=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/usr/local}
PREFIX=${PREFIX%/}
case $PREFIX in
/*) ;;
*) die "PREFIX must be an absolute path (got '$PREFIX')" ;;
esac
BOOTSYNC_BIN=${BOOTSYNC_BIN:-$SRCDIR/target/release/bootsync}
if [ ! -f "$BOOTSYNC_BIN" ] || [ ! -x "$BOOTSYNC_BIN" ]; then
	die "no executable at BOOTSYNC_BIN=$BOOTSYNC_BIN (build it with 'cargo build --release' or set BOOTSYNC_BIN)"
fi

DESTDIR=${DESTDIR:-}
if [ -n "$DESTDIR" ]; then
	mkdir -p "$DESTDIR"
	DESTDIR=$(cd "$DESTDIR" && pwd)
	[ "$DESTDIR" = / ] && DESTDIR=
fi

case $PREFIX in
/usr | /usr/local)
	UNITDIR=$PREFIX/lib/systemd/system
	SYSUSERSDIR=$PREFIX/lib/sysusers.d
	TMPFILESDIR=$PREFIX/lib/tmpfiles.d
	;;
*)
	UNITDIR=/etc/systemd/system
	SYSUSERSDIR=/etc/sysusers.d
	TMPFILESDIR=/etc/tmpfiles.d
	;;
esac
DOCDIR=$PREFIX/share/doc/bootsync
CONFDIR=/etc/bootsync

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

CHANGED=0

# install_file SRC DEST MODE: puts SRC at $DESTDIR/DEST with MODE unless it is already there with
# the same content and mode. Replaces by rename, so a running binary is never written in place.
install_file() {
	src=$1
	dst=$DESTDIR$2
	mode=$3
	if [ -f "$dst" ] && [ ! -L "$dst" ] && cmp -s "$src" "$dst"; then
		if [ "$(stat -c %a "$dst")" != "${mode#0}" ]; then
			chmod "$mode" "$dst"
			say "mode $mode $2"
			CHANGED=1
		fi
		return 0
	fi
	mkdir -p "$(dirname "$dst")"
	tmp=$dst.install-new.$$
	if ! { cp "$src" "$tmp" && chmod "$mode" "$tmp" && mv -f "$tmp" "$dst"; }; then
		rm -f "$tmp"
		die "cannot install $2"
	fi
	say "installed $2"
	CHANGED=1
}

ensure_dir() {
	if [ ! -d "$DESTDIR$1" ]; then
		mkdir -p "$DESTDIR$1"
		say "created $1/"
		CHANGED=1
	fi
}

# --- binary, units, snippets, docs ---------------------------------------------------------------
install_file "$BOOTSYNC_BIN" "$PREFIX/bin/bootsync" 0755

for unit in bootsync.service bootsync-once.service; do
	# The units name /usr/local; point them at the real prefix.
	sed -e "s#/usr/local/bin/bootsync#$PREFIX/bin/bootsync#g" \
		-e "s#/usr/local/share/doc/bootsync#$DOCDIR#g" \
		"$SRCDIR/systemd/$unit" >"$WORK/$unit"
	install_file "$WORK/$unit" "$UNITDIR/$unit" 0644
done
install_file "$SRCDIR/systemd/sysusers.d/bootsync.conf" "$SYSUSERSDIR/bootsync.conf" 0644
install_file "$SRCDIR/systemd/tmpfiles.d/bootsync.conf" "$TMPFILESDIR/bootsync.conf" 0644

install_file "$SRCDIR/deploy/README.md" "$DOCDIR/README.md" 0644
install_file "$SRCDIR/config/bootsync.example.toml" "$DOCDIR/bootsync.example.toml" 0644
install_file "$SRCDIR/deploy/matchbox/profiles/talos-arm64.json" "$DOCDIR/matchbox/profiles/talos-arm64.json" 0644
install_file "$SRCDIR/deploy/matchbox/groups/talos-arm64.json" "$DOCDIR/matchbox/groups/talos-arm64.json" 0644

# --- user and group ------------------------------------------------------------------------------
user_exists() {
	if [ -n "$DESTDIR" ]; then
		[ -f "$DESTDIR/etc/passwd" ] && grep -q '^bootsync:' "$DESTDIR/etc/passwd"
	else
		getent passwd bootsync >/dev/null 2>&1
	fi
}

had_user=no
user_exists && had_user=yes
if have systemd-sysusers; then
	# A bare file name is looked up in the sysusers.d directories (below --root when given);
	# with --root only $DESTDIR/etc/{passwd,group,shadow,gshadow} are touched.
	if [ -n "$DESTDIR" ]; then
		mkdir -p "$DESTDIR/etc"
		systemd-sysusers --root="$DESTDIR" bootsync.conf
	else
		systemd-sysusers bootsync.conf
	fi
elif [ "$had_user" = no ]; then
	have useradd || die "neither systemd-sysusers nor useradd found: cannot create user bootsync"
	if [ -n "$DESTDIR" ]; then
		mkdir -p "$DESTDIR/etc"
		for f in passwd group shadow gshadow; do
			[ -e "$DESTDIR/etc/$f" ] || : >"$DESTDIR/etc/$f"
		done
		chmod 0640 "$DESTDIR/etc/shadow" "$DESTDIR/etc/gshadow"
		set -- --root "$DESTDIR"
	else
		set --
	fi
	useradd "$@" --system --user-group --home-dir /var/lib/bootsync --no-create-home \
		--shell /usr/sbin/nologin --comment "bootsync (matchbox boot asset sync)" bootsync
fi
user_exists || die "user bootsync was not created"
if [ "$had_user" = no ]; then
	say "created user and group bootsync"
	CHANGED=1
fi

# --- configuration -------------------------------------------------------------------------------
ensure_dir "$CONFDIR"
ensure_dir "$CONFDIR/config.d"
if [ -e "$DESTDIR$CONFDIR/bootsync.toml" ] || [ -L "$DESTDIR$CONFDIR/bootsync.toml" ]; then
	say "kept existing $CONFDIR/bootsync.toml"
else
	install_file "$SRCDIR/config/bootsync.example.toml" "$CONFDIR/bootsync.toml" 0640
	say "edit $CONFDIR/bootsync.toml (targets), then: systemctl restart bootsync"
fi

# --- directories, owners and modes (tmpfiles.d snippet) ------------------------------------------
if have systemd-tmpfiles; then
	if [ -n "$DESTDIR" ]; then
		# Found in $DESTDIR's tmpfiles.d directories; resolves bootsync from $DESTDIR/etc/passwd.
		systemd-tmpfiles --root="$DESTDIR" --create bootsync.conf
	else
		systemd-tmpfiles --create bootsync.conf
	fi
else
	# The same as the snippet, by hand (ids from the target root's own files).
	uid=$(awk -F: '$1 == "bootsync" { print $3 }' "$DESTDIR/etc/passwd")
	gid=$(awk -F: '$1 == "bootsync" { print $3 }' "$DESTDIR/etc/group")
	if [ -z "$uid" ] || [ -z "$gid" ]; then
		die "cannot find uid/gid of bootsync in $DESTDIR/etc"
	fi
	mkdir -p "$DESTDIR/var/lib/matchbox/assets" "$DESTDIR/var/lib/bootsync"
	chown "$uid:$gid" "$DESTDIR/var/lib/matchbox/assets" "$DESTDIR/var/lib/bootsync"
	chmod 0755 "$DESTDIR/var/lib/matchbox/assets"
	chmod 0750 "$DESTDIR/var/lib/bootsync"
	chown "0:$gid" "$DESTDIR$CONFDIR" "$DESTDIR$CONFDIR/config.d" "$DESTDIR$CONFDIR/bootsync.toml"
	chmod 0750 "$DESTDIR$CONFDIR" "$DESTDIR$CONFDIR/config.d"
	chmod 0640 "$DESTDIR$CONFDIR/bootsync.toml"
fi

# --- systemd (live system only) ------------------------------------------------------------------
if [ -n "$DESTDIR" ]; then
	say "DESTDIR set: not calling systemctl"
elif ! have systemctl || [ ! -d /run/systemd/system ]; then
	say "systemd is not running here: enable later with" \
		"'systemctl enable bootsync-once.service && systemctl enable --now bootsync.service'"
else
	was_active=no
	systemctl is-active --quiet bootsync.service && was_active=yes
	systemctl daemon-reload
	systemctl enable --quiet bootsync-once.service
	config_ok=yes
	if ! "$PREFIX/bin/bootsync" --config "$CONFDIR/bootsync.toml" check-config >/dev/null; then
		config_ok=no
		say "warning: $CONFDIR/bootsync.toml is invalid (see above); fix it, then" \
			"'systemctl restart bootsync'"
	fi
	if [ "$START" = no ] || [ "$config_ok" = no ]; then
		systemctl enable --quiet bootsync.service
		say "enabled bootsync.service (not started)"
	elif [ "$was_active" = yes ] && [ "$CHANGED" = 1 ]; then
		systemctl enable --quiet bootsync.service
		systemctl restart bootsync.service
		say "restarted bootsync.service"
	else
		systemctl enable --quiet --now bootsync.service
		[ "$was_active" = yes ] || say "started bootsync.service"
	fi
fi

if [ "$CHANGED" = 1 ]; then
	say "done"
else
	say "nothing to change"
fi
