# %postun of sticky-dispatch: %systemd_postun_with_restart sticky-dispatch.service.
# On upgrade ($1 >= 1) restart the dispatcher if it runs: lossless, the socket
# stays open and what the old dispatcher held goes through systemd's fd store.
# The socket itself is not restarted (that would stop the workers).
if [ "$1" -ge 1 ]; then
    if [ -x /usr/lib/systemd/systemd-update-helper ]; then
        # Marks it; the systemd package's file trigger reloads and restarts at
        # the end of the transaction.
        /usr/lib/systemd/systemd-update-helper mark-restart-system-units sticky-dispatch.service || :
    elif command -v systemctl >/dev/null 2>&1; then
        systemctl daemon-reload >/dev/null 2>&1 || :
        systemctl try-restart sticky-dispatch.service >/dev/null 2>&1 || :
    fi
elif command -v systemctl >/dev/null 2>&1 && [ ! -x /usr/lib/systemd/systemd-update-helper ]; then
    # Removal on systemd < 249: forget the units (newer systemd's trigger does it).
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
