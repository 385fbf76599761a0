"""The little the CLI asks of libvirt itself, via libvirt-python, imported lazily.

Never imported by the hook: libvirtd runs the hook while holding locks, and a hook
that calls back into libvirt deadlocks.
"""

from __future__ import annotations

from vfio_libvirt.errors import InputError, OperationError


def _libvirt():
    try:
        import libvirt
    except ImportError:
        raise OperationError(
            "libvirt-python is not installed (Debian: apt install python3-libvirt); "
            "or pass --xml FILE"
        ) from None
    return libvirt


def domain_xml(name: str, uri: str | None) -> bytes:
    """The domain's XML as libvirt would give it to the hook: live if running, else inactive."""
    libvirt = _libvirt()
    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError as err:
        raise OperationError(f"cannot connect to libvirt ({uri or 'default URI'}): {err}") from None
    try:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError:
            raise InputError(f"no domain named {name!r} at {conn.getURI()}") from None
        flags = 0 if dom.isActive() else libvirt.VIR_DOMAIN_XML_INACTIVE
        return dom.XMLDesc(flags).encode()
    finally:
        conn.close()
