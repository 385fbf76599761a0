"""A byte-level look at a domain XML: can it assign a host PCI device at all?

libvirtd runs the hook for every event of every domain, and importing lxml and the
planner costs several times a bare interpreter start.  A domain with only USB, SCSI or
mdev hostdevs, or with `<interface type='network'>`, assigns no PCI device, and this
says so without parsing.  It errs one way only: anything it does not recognise
(a hostdev without a type, an odd attribute, an entity, a comment) answers True and
the real parser decides.  No imports: this runs before anything else is loaded.
"""

_NOT_PCI_HOSTDEV_TYPES = (b"usb", b"scsi", b"scsi_host", b"mdev")
_SPACE = b" \t\r\n"


def may_assign_pci(data: bytes) -> bool:
    """False only when `data` certainly has no PCI `<hostdev>` and no `<interface type='hostdev'>`."""
    for tag in _start_tags(data, b"<hostdev"):
        if tag is None:
            return True
        mode = _attribute(tag, b"mode")
        if mode is not None and mode != b"subsystem":
            if mode == b"capabilities":
                continue  # LXC storage/misc/net: never a PCI device
            return True
        if _attribute(tag, b"type") not in _NOT_PCI_HOSTDEV_TYPES:
            return True
    for tag in _start_tags(data, b"<interface"):
        if tag is None or _attribute(tag, b"type") in (None, b"hostdev", b"?"):
            return True
    return False


def _start_tags(data: bytes, opening: bytes):
    """Each start tag's text after `opening` (None for one that cannot be read)."""
    pos = 0
    while (start := data.find(opening, pos)) != -1:
        pos = start + len(opening)
        after = data[pos:pos + 1]
        if after.isalnum() or (after and after in b"-_.:"):
            continue  # <hostdevices …>, <interfaces …>: another element
        end = data.find(b">", pos)
        yield None if end == -1 else data[pos:end]
        pos = max(pos, end)


def _attribute(tag: bytes, name: bytes) -> bytes | None:
    """The value of attribute `name`; None if absent, b"?" if it cannot be read plainly."""
    pos = 0
    while (at := tag.find(name, pos)) != -1:
        pos = at + len(name)
        if at == 0 or tag[at - 1:at] not in _SPACE:
            continue  # part of another name (e.g. "subtype")
        rest = tag[pos:].lstrip(_SPACE)
        if not rest.startswith(b"="):
            continue
        rest = rest[1:].lstrip(_SPACE)
        quote = rest[:1]
        if quote not in (b"'", b'"'):
            return b"?"
        end = rest.find(quote, 1)
        value = rest[1:end] if end != -1 else b"?"
        return b"?" if b"&" in value else value
    return None
