"""vfio-libvirt: bind the PCI devices a libvirt domain is given to their best VFIO driver.

The package follows the kernel's own split for vfio_pci_core: pure modules do the
thinking (pci, domain, aliases, plan), exactly one module touches sysfs (sysfs), one
keeps state (state), and the libvirt hook and the CLI only wire them together.
"""

__version__ = "0.1.0"
