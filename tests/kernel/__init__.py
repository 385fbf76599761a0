"""Kernel tier: a real kernel in a QEMU guest (host side here, guest side in guest/)."""
