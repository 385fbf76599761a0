"""The little the CLI asks of libvirt itself, via libvirt-python, imported lazily.

Never imported by the hook: libvirtd runs the hook while holding locks, and a hook
that calls back into libvirt deadlocks.  Connections are read-only unless a command
changes libvirt state (attach, detach, adopt).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from vfio_libvirt.errors import InputError, OperationError

INSTALL_HINT = "libvirt-python is not installed (Debian: apt install python3-libvirt)"


def libvirt_module(alternative: str = ""):
    """libvirt-python, imported on first use, with its stderr chatter switched off.

    libvirt's default error handler prints every error to stderr itself
    ("libvirt: XML-RPC error : Failed to connect socket…"), before the exception we
    turn into our one line; a no-op handler leaves the reporting to us.
    `alternative` is how the command can do without libvirt (e.g. "pass --xml FILE"),
    for commands that have one.
    """
    try:
        import libvirt
    except ImportError:
        raise OperationError(INSTALL_HINT + (f"; or {alternative}" if alternative else "")) from None
    libvirt.registerErrorHandler(_ignore_error, None)  # cheap, and the same handler every time
    return libvirt


def _ignore_error(_ctx: object, _err: object) -> None:
    return None


@contextmanager
def connect(uri: str | None, *, write: bool = False) -> Iterator[object]:
    libvirt = libvirt_module()
    try:
        conn = libvirt.open(uri) if write else libvirt.openReadOnly(uri)
    except libvirt.libvirtError as err:
        raise OperationError(f"cannot connect to libvirt ({uri or 'default URI'}): {err}") from None
    try:
        yield conn
    finally:
        conn.close()


def lookup(conn, name: str):
    libvirt = libvirt_module()
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError:
        raise InputError(f"no domain named {name!r} at {conn.getURI()}") from None


def xml_of(dom, *, inactive: bool = False, secure: bool = False) -> bytes:
    """Live XML for a running domain (what the hook gets), else the persistent one.

    `secure` adds the secrets (graphics passwords…) libvirt otherwise leaves out: a
    command that redefines the domain from this XML must ask for them or delete them.
    It needs a read-write connection.
    """
    libvirt = libvirt_module()
    flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive or not dom.isActive() else 0
    if secure:
        flags |= libvirt.VIR_DOMAIN_XML_SECURE
    return dom.XMLDesc(flags).encode()


def domain_xml(name: str, uri: str | None) -> bytes:
    """The XML the hook would get, for the commands that could be given it as --xml instead."""
    libvirt_module(alternative="pass --xml FILE")
    with connect(uri) as conn:
        return xml_of(lookup(conn, name))


def running_domains(uri: str | None) -> dict[str, bytes]:
    """Name → live XML of every running domain (for `status` and `doctor`)."""
    with connect(uri) as conn:
        return {dom.name(): xml_of(dom) for dom in conn.listAllDomains() if dom.isActive()}

