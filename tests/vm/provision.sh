#!/bin/bash
# Provision the kernel test tier of vfio-libvirt (see tests/vm/README.md).
#
#   tests/vm/provision.sh [--libvirt] [--kver KVER] [CACHE_DIR]
#
# CACHE_DIR defaults to ${VFIO_LIBVIRT_TEST_CACHE:-/var/cache/vfio-libvirt-tests}.
# Idempotent: a second run only checks stamps and changes nothing.
#
# What it does (nothing here touches this machine's /sys or loads modules):
#   1. apt packages the tier needs (only those missing; needs root for that),
#      and QEMU >= 8 from bookworm-backports (bookworm's 7.2 has no SR-IOV igb)
#   2. Debian's linux-image-6.12.*-amd64-unsigned + headers + kbuild,
#      fetched with apt-get download and unpacked with dpkg -x under
#      CACHE_DIR/kernel/<kver>/
#   3. builds the test modules (tests/vm/module: two VFIO variant drivers and
#      a slow host driver) against those headers, installs them in
#      lib/modules/<kver>/updates/vfio-libvirt-test/ and runs depmod -b, so
#      modules.alias carries their vfio_pci: and pci: aliases
#   4. a venv with virtme-ng (vng) in CACHE_DIR/venv
#   5. CACHE_DIR/nvme.ext4: a small ext4 image for the guest's NVMe (the
#      guest opens it with snapshot=on and never changes it)
#   6. CACHE_DIR/env: KEY='value' lines (sourceable) read by tests/vm/guest.py
# With --libvirt, also installs libvirt from bookworm-backports on the host
# with a policy-rc.d that stops any daemon from being started.
set -euo pipefail

VNG_VERSION=1.42            # virtme-ng, pinned: its CLI and guest init matter
KSERIES=6.12                # Debian kernel series to test against
FLAVOUR=amd64
APT_INSTALL=(apt-get -o DPkg::Lock::Timeout=300 -y --no-install-recommends install)
HOST_PKGS=(
    busybox-static udev kmod file binutils e2fsprogs         # vng + the guest
    gcc-12 make libelf1                                      # module build
    python3-venv python3-pytest python3-pytest-mock          # harness + guest
    python3-lxml python3-tenacity                            # product, in guest
)
# QEMU >= 8: its igb is a real SR-IOV PF (VFs 8086:10ca) for the host-safety tests.
# Only QEMU's own packages and firmware come from bookworm-backports; whatever
# else -t bookworm-backports would drag in (e.g. pipewire 1.4 for qemu-system-gui)
# is held at bookworm.
QEMU_MIN_MAJOR=8
QEMU_FROM_BACKPORTS='^(qemu-.*|seabios|ipxe-qemu)$'
NVME_IMAGE_MIB=8            # the guest NVMe's ext4 image
LIBVIRT_PKGS=(libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients python3-libvirt)

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MODULE_SRC=$HERE/module

die() { echo "provision: ERROR: $*" >&2; exit 1; }
trap 'echo "provision: ERROR: line $LINENO failed: $BASH_COMMAND" >&2' ERR
log() { echo "provision: $*" >&2; }

want_libvirt=0
kver_arg=${VFIO_LIBVIRT_TEST_KVER:-}
cache=""
while [ $# -gt 0 ]; do
    case $1 in
        --libvirt) want_libvirt=1 ;;
        --kver) [ $# -ge 2 ] || die "--kver needs a value (e.g. 6.12.117+deb12)"; kver_arg=$2; shift ;;
        --kver=*) kver_arg=${1#--kver=} ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [ -z "$cache" ] || die "only one CACHE_DIR allowed"; cache=$1 ;;
    esac
    shift
done
cache=${cache:-${VFIO_LIBVIRT_TEST_CACHE:-/var/cache/vfio-libvirt-tests}}
mkdir -p "$cache" || die "cannot create cache dir $cache"
cache=$(cd "$cache" && pwd -P)
[ "$(uname -m)" = x86_64 ] || die "only x86_64 hosts are supported"

# One provisioning at a time per cache dir.
exec 9>>"$cache/.lock"
flock -w 900 9 || die "another provision.sh holds $cache/.lock"

PATH=$PATH:/usr/sbin:/sbin
t0=$(date +%s)

# ---------------------------------------------------------------- 1. apt
pkg_missing() {
    local p missing=()
    for p in "$@"; do
        # strip /release suffixes
        if [ "$(dpkg-query -W -f='${Status}' "${p%%/*}" 2>/dev/null)" != "install ok installed" ]; then
            missing+=("$p")
        fi
    done
    echo "${missing[@]:-}"
}

apt_updated=0
apt_install() {     # apt_install [apt-get options...] -- pkgs...
    local opts=() pkgs=()
    while [ "$1" != -- ]; do opts+=("$1"); shift; done; shift
    pkgs=("$@")
    [ "$(id -u)" = 0 ] || die "need root to install: ${pkgs[*]} (or install them yourself)"
    log "apt-get install ${pkgs[*]}"
    if ! DEBIAN_FRONTEND=noninteractive "${APT_INSTALL[@]}" "${opts[@]}" "${pkgs[@]}" >&2; then
        [ $apt_updated = 1 ] && die "apt-get install failed: ${pkgs[*]}"
        log "apt-get install failed; running apt-get update once and retrying"
        apt-get -o DPkg::Lock::Timeout=300 update >&2 || die "apt-get update failed"
        apt_updated=1
        DEBIAN_FRONTEND=noninteractive "${APT_INSTALL[@]}" "${opts[@]}" "${pkgs[@]}" >&2 \
            || die "apt-get install failed: ${pkgs[*]}"
    fi
}

read -r -a missing <<<"$(pkg_missing "${HOST_PKGS[@]}")"
if [ ${#missing[@]} -gt 0 ]; then
    apt_install -- "${missing[@]}"
fi

qemu_major() {  # major version of qemu-system-x86_64, 0 when there is none
    local v
    v=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9][0-9]*\)\..*/\1/p')
    echo "${v:-0}"
}

# Packages `apt-get -t bookworm-backports install qemu-system-x86` would take from
# backports that are not QEMU's own: each becomes PKG/bookworm on the real install.
qemu_holds() {
    local sim
    sim=$(apt-get -s -o DPkg::Lock::Timeout=300 --no-install-recommends \
          -t bookworm-backports install qemu-system-x86 2>&1) || { echo "$sim" >&2; return 1; }
    awk '/^Inst / && /[Bb]ackports/ {print $2}' <<<"$sim" | { grep -vE "$QEMU_FROM_BACKPORTS" || true; } \
        | sed 's|$|/bookworm|' | tr '\n' ' '
}

if [ "$(qemu_major)" -lt $QEMU_MIN_MAJOR ]; then
    [ "$(id -u)" = 0 ] || die "need root to install QEMU >= $QEMU_MIN_MAJOR from bookworm-backports"
    holds=$(qemu_holds) || {
        [ $apt_updated = 0 ] || die "cannot plan the QEMU install from bookworm-backports"
        log "apt-get update (planning the QEMU install from bookworm-backports)"
        apt-get -o DPkg::Lock::Timeout=300 update >&2 || die "apt-get update failed"
        apt_updated=1
        holds=$(qemu_holds) || die "cannot plan the QEMU install from bookworm-backports"
    }
    read -r -a holds <<<"$holds"
    [ ${#holds[@]} -eq 0 ] || log "held at bookworm while QEMU comes from backports: ${holds[*]}"
    apt_install -t bookworm-backports -- qemu-system-x86 "${holds[@]}"
    # the held ones are QEMU's dependencies, not wanted for themselves
    [ ${#holds[@]} -eq 0 ] || apt-mark auto "${holds[@]%/bookworm}" >/dev/null
fi
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found after install"
[ "$(qemu_major)" -ge $QEMU_MIN_MAJOR ] \
    || die "QEMU $(qemu_major) < $QEMU_MIN_MAJOR after install (is bookworm-backports in apt sources?)"

# ---------------------------------------------------------------- 2. kernel
kernel_complete() { [ -f "$cache/kernel/$1/.vlt-unpacked" ]; }

pkgs_for() {  # kernel packages for a Debian ABI name like 6.12.117+deb12
    echo "linux-image-$1-$FLAVOUR-unsigned linux-headers-$1-$FLAVOUR linux-headers-$1-common linux-kbuild-$1"
}

have_candidates() {
    local p
    for p in $(pkgs_for "$1"); do
        # (no "| grep -q" under pipefail: an early grep exit fails the pipe)
        case $(apt-cache policy "$p" 2>/dev/null) in *"Candidate: "[0-9]*) ;; *) return 1 ;; esac
    done
}

newest_available() {
    local v
    for v in $(apt-cache search --names-only "^linux-image-${KSERIES//./\\.}\.[0-9]+\+deb12-$FLAVOUR-unsigned\$" 2>/dev/null \
               | sed -n "s/^linux-image-\([^ ]*\)-$FLAVOUR-unsigned .*/\1/p" | sort -rV); do
        if have_candidates "$v"; then echo "$v"; return 0; fi
    done
    return 1
}

abi=""
if [ -n "$kver_arg" ]; then
    abi=${kver_arg%-"$FLAVOUR"}            # accept 6.12.117+deb12 or 6.12.117+deb12-amd64
elif [ -f "$cache/env" ]; then
    # Keep the kernel we already have: a second run must change nothing.
    prev=$(sed -n "s/^VLT_KVER='\(.*\)'$/\1/p" "$cache/env")
    if [ -n "$prev" ] && kernel_complete "$prev"; then abi=${prev%-"$FLAVOUR"}; fi
fi
if [ -z "$abi" ]; then
    abi=$(newest_available) || {
        log "no linux-image-$KSERIES.*+deb12 with headers and kbuild found; apt-get update"
        [ "$(id -u)" = 0 ] && apt-get -o DPkg::Lock::Timeout=300 update >&2 && apt_updated=1
        abi=$(newest_available) || die "no Debian $KSERIES kernel packages available (is bookworm-backports or bookworm-security in apt sources?)"
    }
fi
kver=$abi-$FLAVOUR
kroot=$cache/kernel/$kver
moddir=$kroot/lib/modules/$kver
hdrs=$kroot/usr/src/linux-headers-$kver

if ! kernel_complete "$kver"; then
    have_candidates "$abi" || die "kernel packages for $abi are not available from apt: $(pkgs_for "$abi")"
    log "fetching Debian kernel $kver"
    rm -rf "$kroot" "$cache/debs"
    mkdir -p "$cache/debs" "$kroot"
    # shellcheck disable=SC2046
    (cd "$cache/debs" && apt-get -o APT::Sandbox::User=root download $(pkgs_for "$abi") >&2) \
        || die "apt-get download failed for $(pkgs_for "$abi")"
    for deb in "$cache"/debs/*.deb; do
        dpkg -x "$deb" "$kroot" || die "dpkg -x $deb failed"
    done
    rm -rf "$cache/debs"
    [ -f "$kroot/boot/vmlinuz-$kver" ] || die "no vmlinuz in the unpacked image"
    [ -f "$hdrs/Makefile" ] || die "no headers in $hdrs"
    # The headers' Makefile includes /usr/src/linux-headers-<abi>-common by an
    # absolute path; point it (and the build/source links) at the unpacked tree.
    sed -i "s|^include /usr/src/|include $kroot/usr/src/|" "$hdrs/Makefile"
    ln -sfn "$hdrs" "$moddir/build"
    ln -sfn "$kroot/usr/src/linux-headers-$abi-common" "$moddir/source"
    echo "$kver" >"$kroot/.vlt-unpacked"
fi

# ---------------------------------------------------------------- 3. modules
src_hash=$( (echo "$kver"; cd "$MODULE_SRC" && for f in $(ls | sort); do echo "$f"; cat "$f"; done) | sha256sum | cut -d' ' -f1)
stamp=$kroot/.vlt-modules
if [ "$(cat "$stamp" 2>/dev/null)" != "$src_hash" ]; then
    log "building test modules against $kver"
    build=$cache/build/modules
    rm -rf "$build"; mkdir -p "$build"
    cp "$MODULE_SRC"/* "$build/"
    make -C "$hdrs" M="$build" CONFIG_DEBUG_INFO_BTF_MODULES= -j"$(nproc)" modules >"$build/build.log" 2>&1 \
        || { tail -n 40 "$build/build.log" >&2; die "module build failed (log: $build/build.log)"; }
    dest=$moddir/updates/vfio-libvirt-test
    rm -rf "$dest"; mkdir -p "$dest"
    cp "$build"/*.ko "$dest/"
    depmod -b "$kroot" "$kver" || die "depmod failed"
    for a in 'vfio_pci:v\*d\*sv\*sd\*bc\*sc\*i\* vfio_pci$' \
             'vfio_pci:v00001AF4d00001041sv\*sd\*bc\*sc\*i\* vlt_virtio_vfio_pci$' \
             'vfio_pci:v00001AF4d\*sv\*sd\*bc\*sc\*i\* vlt_vendor_vfio_pci$' \
             'pci:v00001234d000011E8sv\*sd\*bc\*sc\*i\* vlt_slow_host$'; do
        grep -q "^alias $a" "$moddir/modules.alias" || die "modules.alias lacks: alias $a"
    done
    echo "$src_hash" >"$stamp"
fi

# ---------------------------------------------------------------- 4. virtme-ng
venv=$cache/venv
if [ "$(cat "$venv/.vlt-vng" 2>/dev/null)" != "$VNG_VERSION" ] || ! "$venv/bin/vng" --version >/dev/null 2>&1; then
    log "installing virtme-ng $VNG_VERSION into $venv"
    rm -rf "$venv"
    /usr/bin/python3 -m venv "$venv" || die "python3 -m venv failed (python3-venv installed?)"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "virtme-ng==$VNG_VERSION" >&2 \
        || die "pip install virtme-ng==$VNG_VERSION failed"
    compgen -G "$venv/lib/python3*/site-packages/virtme/guest/bin/virtme-ng-init" >/dev/null \
        || die "virtme-ng-init missing from the virtme-ng wheel"
    echo "$VNG_VERSION" >"$venv/.vlt-vng"
fi

# ---------------------------------------------------------------- 5. NVMe image
# A small ext4 filesystem with one known file; made once (a second run keeps it,
# the guest only ever opens it with snapshot=on).
nvme_image=$cache/nvme.ext4
nvme_stamp="ext4 ${NVME_IMAGE_MIB}MiB v1"
if [ "$(cat "$cache/.vlt-nvme" 2>/dev/null)" != "$nvme_stamp" ] || [ ! -s "$nvme_image" ]; then
    log "making the guest NVMe image $nvme_image (${NVME_IMAGE_MIB} MiB ext4)"
    seed=$(mktemp -d "$cache/.nvme-seed.XXXXXX")
    echo "vfio-libvirt test NVMe" >"$seed/vfio-libvirt-test.txt"
    tmpimg=$(mktemp "$cache/.nvme.ext4.XXXXXX")
    # fixed UUID and hash seed: the same image on every machine
    mkfs.ext4 -q -F -L vltnvme -U 6e766d65-0000-4000-8000-766c746e766d \
        -E root_owner=0:0,hash_seed=6e766d65-0000-4000-8000-766c746e766d \
        -d "$seed" "$tmpimg" "${NVME_IMAGE_MIB}M" >&2 || { rm -rf "$seed" "$tmpimg"; die "mkfs.ext4 failed"; }
    rm -rf "$seed"
    chmod 644 "$tmpimg"
    mv -f "$tmpimg" "$nvme_image"
    echo "$nvme_stamp" >"$cache/.vlt-nvme"
fi

# ---------------------------------------------------------------- 6. env
envtmp=$(mktemp "$cache/.env.XXXXXX")
cat >"$envtmp" <<EOF
# written by tests/vm/provision.sh; read by tests/vm/guest.py
VLT_CACHE='$cache'
VLT_KVER='$kver'
VLT_KERNEL_ROOT='$kroot'
VLT_VMLINUZ='$kroot/boot/vmlinuz-$kver'
VLT_MODULES_DIR='$moddir'
VLT_VENV_BIN='$venv/bin'
VLT_VNG='$venv/bin/vng'
VLT_VNG_VERSION='$VNG_VERSION'
VLT_TEST_MODULES='vlt_virtio_vfio_pci:vlt-virtio-vfio vlt_vendor_vfio_pci:vlt-vendor-vfio vlt_slow_host:vlt-slow-host'
VLT_NVME_IMAGE='$nvme_image'
EOF
if cmp -s "$envtmp" "$cache/env"; then rm -f "$envtmp"; else mv "$envtmp" "$cache/env"; log "wrote $cache/env"; fi

# ---------------------------------------------------------------- 7. libvirt
if [ $want_libvirt = 1 ]; then
    # libvirt 11.x from bookworm-backports; systemd-container is held to
    # bookworm's so that -t bookworm-backports does not drag in systemd 254.
    read -r -a missing <<<"$(pkg_missing "${LIBVIRT_PKGS[@]}")"
    need=0
    [ ${#missing[@]} -gt 0 ] && need=1
    case $(libvirtd --version 2>/dev/null) in *" "[1-9][0-9].*) ;; *) need=1 ;; esac
    if [ $need = 1 ]; then
        [ "$(id -u)" = 0 ] || die "need root to install libvirt"
        # Our own policy-rc.d for the duration (any existing one is put back).
        policy=/usr/sbin/policy-rc.d
        [ -e $policy ] && cp -a $policy "$cache/.policy-rc.d.saved"
        restore_policy() {
            if [ -e "$cache/.policy-rc.d.saved" ]; then mv -f "$cache/.policy-rc.d.saved" $policy
            else rm -f $policy; fi
        }
        trap restore_policy EXIT
        printf '#!/bin/sh\n# vfio-libvirt provision.sh: start no daemons\nexit 101\n' >$policy
        chmod 755 $policy
        daemons() { ps -eo comm= | grep -xE 'libvirtd|virt[a-z]*d|dnsmasq' | sort | tr '\n' ' ' || true; }
        pre=$(daemons)
        set +e
        (apt_install -t bookworm-backports -- "${LIBVIRT_PKGS[@]}" systemd-container/bookworm)
        rc=$?
        set -e
        restore_policy
        trap - EXIT
        [ $rc = 0 ] || die "libvirt install failed"
        post=$(daemons)
        [ "$pre" = "$post" ] || log "WARNING: daemons appeared during the libvirt install: $post (left alone)"
    fi
    libvirtd --version >&2 || die "libvirtd not usable"
fi

log "ready in $(( $(date +%s) - t0 ))s: kernel $kver, env $cache/env"
