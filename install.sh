#!/usr/bin/env bash
# Install (or --uninstall) vfio-libvirt: the package, the `vfio-libvirt` CLI, the
# libvirt qemu hook /etc/libvirt/hooks/qemu.d/vfio-libvirt and the network hook
# /etc/libvirt/hooks/network.d/vfio-libvirt (VFs of managed='no' hostdev network pools).
#
#   sudo ./install.sh [--root DIR] [--dry-run] [--no-deps]
#   sudo ./install.sh --uninstall [--force] [--root DIR] [--dry-run]
#
# Python: the system python3 with the distribution's lxml, tenacity and libvirt
# bindings — they get security updates with the OS, need no PyPI at install time,
# and python3-libvirt always matches the installed libvirt.  The package goes into
# its own directory (/usr/lib/vfio-libvirt), so it never clobbers apt's or pip's.
# Every file written is listed in a manifest, which --uninstall removes exactly.
set -euo pipefail

ROOT=""; DRY=0; UNINSTALL=0; FORCE=0; DEPS=1
while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT="${2:?--root needs a directory}"; shift ;;
        --root=*) ROOT="${1#--root=}" ;;
        --dry-run) DRY=1 ;;
        --uninstall) UNINSTALL=1 ;;
        --force) FORCE=1 ;;
        --no-deps) DEPS=0 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
ROOT="${ROOT%/}"
SRC="$(cd "$(dirname "$(readlink -f "$0")")" && pwd)"
LIB="$ROOT/usr/lib/vfio-libvirt"
MANIFEST="$LIB/MANIFEST"
HOOK_DIR="$ROOT/etc/libvirt/hooks/qemu.d"
HOOK="$HOOK_DIR/vfio-libvirt"
NET_HOOK="$ROOT/etc/libvirt/hooks/network.d/vfio-libvirt"
BIN="$ROOT/usr/local/sbin/vfio-libvirt"
CONF_DIR="$ROOT/etc/vfio-libvirt"
CONF="$CONF_DIR/config.toml"
STATE="${VFIO_LIBVIRT_STATE_DIR:-$ROOT/run/vfio-libvirt}"

say() { echo "install.sh: $*"; }
run() { if [ "$DRY" = 1 ]; then say "would run: $*"; else "$@"; fi; }
[ -n "$ROOT" ] || [ "$(id -u)" = 0 ] || { echo "install.sh: run as root (sudo ./install.sh)" >&2; exit 2; }

# The manifest lists every file written and every directory created ("dir:" lines),
# so --uninstall removes exactly those and leaves e.g. /etc/libvirt/hooks as it was.
declare -a INSTALLED=()
previously_installed() { [ -f "$MANIFEST" ] && grep -qxF "$1" "$MANIFEST"; }
make_dirs() {
    local dir="$1" missing=()
    while [ ! -d "$dir" ]; do missing=("$dir" "${missing[@]}"); dir="$(dirname "$dir")"; done
    for dir in "${missing[@]}"; do
        INSTALLED+=("dir:${dir#"$ROOT"}")
        [ "$DRY" = 1 ] || mkdir -m 0755 "$dir"
    done
}
# put DEST SRC MODE: write only when different, and record it in the manifest
put() {
    local dest="$1" src="$2" mode="$3"
    INSTALLED+=("${dest#"$ROOT"}")
    if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
        say "unchanged $dest"; return
    fi
    say "installing $dest"
    make_dirs "$(dirname "$dest")"
    if [ "$DRY" = 0 ]; then
        install -m "$mode" "$src" "$dest.tmp.$$" && mv -f "$dest.tmp.$$" "$dest"
    fi
}

# doctor judges whether a running daemon has seen the hook by its start time; a reload
# leaves no trace of its own, so leave one (vfio_libvirt/cli_common.py: reload_marks)
mark_reloaded() {
    [ "$DRY" = 0 ] || return 0
    local state="${VFIO_LIBVIRT_STATE_DIR:-/run/vfio-libvirt}"
    { mkdir -p -m 700 "$state" && mkdir -p "$state/reloaded" && touch "$state/reloaded/$1"; } 2>/dev/null || true
}

reload_libvirt() {
    [ -z "$ROOT" ] || { say "installed into $ROOT: no daemon to reload"; return; }
    # in a chroot systemctl ignores commands (status 0) and pidof finds the host's daemons
    if command -v ischroot >/dev/null && ischroot; then
        say "in a chroot: no daemon reloaded (the next one started runs the hook)"
        return
    fi
    local daemon reloaded=0
    # the network hook runs in virtnetworkd on a modular host, in libvirtd otherwise
    for daemon in virtqemud virtnetworkd libvirtd; do
        if command -v systemctl >/dev/null && systemctl is-active --quiet "$daemon" 2>/dev/null; then
            run systemctl reload "$daemon" && say "reloaded $daemon: it now runs the hook" && reloaded=1 \
                && mark_reloaded "$daemon"
        elif pidof "$daemon" >/dev/null 2>&1; then
            # shellcheck disable=SC2046  # one argument per pid
            run kill -HUP $(pidof "$daemon") && say "sent SIGHUP to $daemon: it now runs the hook" \
                && reloaded=1 && mark_reloaded "$daemon"
        fi
    done
    [ "$reloaded" = 1 ] || say "no libvirt daemon is running: the hook is picked up when it starts"
}

install_deps() {
    [ "$DEPS" = 1 ] && [ -z "$ROOT" ] || return 0
    /usr/bin/python3 -c 'import lxml, tenacity' 2>/dev/null && return 0
    . /etc/os-release
    case " ${ID:-} ${ID_LIKE:-} " in
        *" debian "*|*" ubuntu "*)
            run apt-get install -y -q python3 python3-lxml python3-tenacity python3-libvirt ;;
        *" fedora "*|*" rhel "*|*" centos "*)
            run dnf install -y python3 python3-lxml python3-tenacity python3-libvirt ;;
        *" arch "*)
            run pacman -S --needed --noconfirm python python-lxml python-tenacity libvirt-python ;;
        *) echo "install.sh: install python3 with lxml and tenacity (and libvirt bindings for the CLI), then re-run" >&2; exit 1 ;;
    esac
}

do_install() {
    install_deps
    tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
    # keep the directories an earlier run created on the list, so uninstall finds them
    if [ -f "$MANIFEST" ]; then
        while read -r line; do
            case "$line" in dir:*) INSTALLED+=("$line") ;; esac
        done < "$MANIFEST"
    fi
    # Modules new to this version first, then the changed ones: the running hooks keep
    # importing the installed modules meanwhile, and a changed module must never find a
    # module it imports missing.  (Each file is replaced by one rename.)
    local f changed=()
    for f in "$SRC"/vfio_libvirt/*.py; do
        if [ -e "$LIB/vfio_libvirt/$(basename "$f")" ]; then changed+=("$f")
        else put "$LIB/vfio_libvirt/$(basename "$f")" "$f" 0644; fi
    done
    for f in "${changed[@]}"; do
        put "$LIB/vfio_libvirt/$(basename "$f")" "$f" 0644
    done
    cat > "$tmp/hook" <<HOOK
#!/usr/bin/python3
# vfio-libvirt qemu hook, installed by install.sh; runs for every domain event.
import sys
sys.path.insert(0, "/usr/lib/vfio-libvirt")
from vfio_libvirt.hook import main
sys.exit(main())
HOOK
    put "$HOOK" "$tmp/hook" 0755
    sed -e 's/qemu hook, installed/network hook, installed/' \
        -e 's/every domain event/every network event and port/' \
        -e 's/vfio_libvirt.hook import/vfio_libvirt.network_hook import/' "$tmp/hook" > "$tmp/net-hook"
    put "$NET_HOOK" "$tmp/net-hook" 0755
    cat > "$tmp/cli" <<CLI
#!/usr/bin/python3
import sys
sys.path.insert(0, "/usr/lib/vfio-libvirt")
from vfio_libvirt.cli import main
sys.exit(main())
CLI
    put "$BIN" "$tmp/cli" 0755
    if [ -e "$CONF" ] && ! previously_installed "${CONF#"$ROOT"}"; then
        say "keeping existing $CONF"
    elif [ -e "$CONF" ]; then
        INSTALLED+=("${CONF#"$ROOT"}"); say "keeping $CONF (installed earlier)"
    else
        put "$CONF" "$SRC/xml/config.toml.example" 0644
    fi
    if [ -e "$ROOT/etc/libvirt/hooks/qemu" ]; then
        say "left $ROOT/etc/libvirt/hooks/qemu alone (libvirt runs qemu.d/ scripts as well)"
    fi
    printf '%s\n' "${INSTALLED[@]}" | sort -u > "$tmp/manifest"
    put "$MANIFEST" "$tmp/manifest" 0644
    reload_libvirt
    say "done: hooks $HOOK and $NET_HOOK, CLI $BIN, config $CONF"
}

do_uninstall() {
    [ -f "$MANIFEST" ] || { say "nothing to uninstall (no $MANIFEST)"; return 0; }
    if [ -s "$STATE/journal.json" ] && grep -q '"address"' "$STATE/journal.json" && [ "$FORCE" = 0 ]; then
        echo "install.sh: devices are still switched (see: vfio-libvirt status); restore them or use --force" >&2
        exit 1
    fi
    local file dirs=()
    while read -r file; do
        case "$file" in
            "") continue ;;
            dir:*) dirs=("$ROOT${file#dir:}" "${dirs[@]}"); continue ;;
        esac
        if [ "$file" = "/etc/vfio-libvirt/config.toml" ] && ! cmp -s "$ROOT$file" "$SRC/xml/config.toml.example"; then
            say "keeping $ROOT$file: it was edited"; continue
        fi
        if [ -e "$ROOT$file" ]; then say "removing $ROOT$file"; run rm -f "$ROOT$file"; fi
    done < "$MANIFEST"
    run rm -f "$MANIFEST"
    run rm -rf "$LIB/vfio_libvirt/__pycache__"
    # directories we created, deepest first, and only when empty
    local sorted; sorted="$(printf '%s\n' "${dirs[@]}" | awk '{ print length, $0 }' | sort -rn | cut -d' ' -f2-)"
    while read -r dir; do
        [ -n "$dir" ] && [ -d "$dir" ] && run rmdir --ignore-fail-on-non-empty "$dir"
    done <<< "$sorted"
    reload_libvirt
    say "uninstalled"
}

if [ "$UNINSTALL" = 1 ]; then do_uninstall; else do_install; fi
