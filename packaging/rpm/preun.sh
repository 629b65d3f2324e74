# %preun of sticky-dispatch: %systemd_preun sticky-dispatch.socket sticky-dispatch-metrics.socket
# sticky-dispatch.service.
# On removal ($1 = 0), not upgrade: disable and stop the socket and the
# dispatcher; stopping the socket also stops the workers (the generator's
# PropagatesStopTo=).
if [ "$1" -eq 0 ]; then
    if [ -x /usr/lib/systemd/systemd-update-helper ]; then
        /usr/lib/systemd/systemd-update-helper remove-system-units sticky-dispatch.socket sticky-dispatch-metrics.socket sticky-dispatch.service || :
    elif command -v systemctl >/dev/null 2>&1; then
        systemctl --no-reload disable --now sticky-dispatch.socket sticky-dispatch-metrics.socket sticky-dispatch.service >/dev/null 2>&1 || :
    fi
fi
# Byte code python3 wrote beside the Python worker module: not a file of the package.
rm -rf /usr/share/sticky-dispatch/python/sticky_dispatch/__pycache__
