// SPDX-License-Identifier: GPL-2.0-only
/* Test variant driver: any device of vendor 1af4 (6 wildcards in its alias). */
#define VLT_DRIVER_NAME	"vlt-vendor-vfio"
#define VLT_VENDOR	0x1af4
#define VLT_DEVICE	PCI_ANY_ID
#define VLT_DESC	"vfio-libvirt test: variant driver for any 1af4 device"
#include "vlt_vfio_variant.h"
