# Creates the bootsync user and its directories; the services stay disabled until configured.
if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers bootsync.conf
elif ! getent passwd bootsync >/dev/null; then
    useradd --system --home-dir /var/lib/bootsync --no-create-home \
        --shell /sbin/nologin --user-group bootsync
fi
if command -v systemd-tmpfiles >/dev/null 2>&1; then
    systemd-tmpfiles --create bootsync.conf || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
