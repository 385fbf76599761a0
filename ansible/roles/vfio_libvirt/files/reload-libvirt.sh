#!/bin/sh
# Make the running libvirt daemons look for hooks again (role vfio_libvirt's handler).
# The network hook runs in virtnetworkd on a modular host and in libvirtd otherwise, the
# qemu hook in virtqemud or libvirtd: reload each of them that runs.  One line per daemon;
# exit 1 if a reload failed.  Each reload leaves a mark in the state dir: doctor (run next
# by the role) judges by start time otherwise (vfio_libvirt/cli_common.py: reload_marks).
failed=0 reloaded=0
# in a chroot systemctl ignores commands (status 0) and pidof finds the host's daemons
if command -v ischroot >/dev/null 2>&1 && ischroot; then
    echo "in a chroot: nothing to reload (a daemon finds the hooks when it starts)"
    exit 0
fi
mark_reloaded() {
    state="${VFIO_LIBVIRT_STATE_DIR:-/run/vfio-libvirt}"
    { mkdir -p -m 700 "$state" && mkdir -p "$state/reloaded" && touch "$state/reloaded/$1"; } \
        2>/dev/null || true
}
for daemon in virtqemud virtnetworkd libvirtd; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$daemon" 2>/dev/null; then
        if systemctl reload "$daemon"; then
            echo "reloaded $daemon (systemctl reload)"; reloaded=1; mark_reloaded "$daemon"
        else
            echo "systemctl reload $daemon failed" >&2; failed=1
        fi
    elif pids=$(pidof "$daemon" 2>/dev/null) && [ -n "$pids" ]; then
        # shellcheck disable=SC2086  # one argument per pid
        if kill -HUP $pids; then
            echo "sent SIGHUP to $daemon ($pids)"; reloaded=1; mark_reloaded "$daemon"
        else
            echo "kill -HUP $daemon ($pids) failed" >&2; failed=1
        fi
    fi
done
[ "$reloaded" = 1 ] || [ "$failed" = 1 ] || echo "no libvirt daemon runs: nothing to reload (it finds the hooks when it starts)"
exit "$failed"
