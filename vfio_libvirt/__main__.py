"""`python -m vfio_libvirt` is the same as the `vfio-libvirt` command."""

from vfio_libvirt.cli import main

raise SystemExit(main())
