# On erase (not upgrade), stop the services before their binary goes away.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl stop bootsync.service bootsync-once.service >/dev/null 2>&1 || :
fi
