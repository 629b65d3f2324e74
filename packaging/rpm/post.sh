# %post of sticky-dispatch: %systemd_post sticky-dispatch.socket.
# On a first install ($1 = 1) the distribution's presets decide whether the
# socket is enabled (Fedora and RHEL: disabled unless a preset says otherwise);
# the unit files' own trigger in the systemd package reloads systemd, which also
# runs sticky-dispatch-generator.
if [ "$1" -eq 1 ]; then
    if [ -x /usr/lib/systemd/systemd-update-helper ]; then
        /usr/lib/systemd/systemd-update-helper install-system-units sticky-dispatch.socket || :
    elif command -v systemctl >/dev/null 2>&1; then
        # systemd < 249 (RHEL 8 and the like): what %systemd_post expanded to there.
        systemctl --no-reload preset sticky-dispatch.socket >/dev/null 2>&1 || :
    fi
fi
