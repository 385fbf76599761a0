"""libvirt tier: a real libvirtd in a QEMU guest (host side here, guest side in guest/)."""
