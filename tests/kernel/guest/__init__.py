"""Tests that run inside the kernel tier's QEMU guest, against its real /sys."""
