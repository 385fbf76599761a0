#!/bin/sh
# Make the running libvirt daemons look for hooks again (role vfio_libvirt's handler).
# The network hook runs in virtnetworkd on a modular host and in libvirtd otherwise, the
# qemu hook in virtqemud or libvirtd: reload each of them that runs.  One line per daemon;
# exit 1 if a reload failed.
failed=0 reloaded=0
for daemon in virtqemud virtnetworkd libvirtd; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$daemon" 2>/dev/null; then
        if systemctl reload "$daemon"; then
            echo "reloaded $daemon (systemctl reload)"; reloaded=1
        else
            echo "systemctl reload $daemon failed" >&2; failed=1
        fi
    elif pids=$(pidof "$daemon" 2>/dev/null) && [ -n "$pids" ]; then
        # shellcheck disable=SC2086  # one argument per pid
        if kill -HUP $pids; then
            echo "sent SIGHUP to $daemon ($pids)"; reloaded=1
        else
            echo "kill -HUP $daemon ($pids) failed" >&2; failed=1
        fi
    fi
done
[ "$reloaded" = 1 ] || [ "$failed" = 1 ] || echo "no libvirt daemon runs: nothing to reload (it finds the hooks when it starts)"
exit "$failed"
