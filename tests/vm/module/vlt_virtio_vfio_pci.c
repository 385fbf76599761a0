// SPDX-License-Identifier: GPL-2.0-only
/* Test variant driver: exact match on virtio-net (modern), 1af4:1041. */
#define VLT_DRIVER_NAME	"vlt-virtio-vfio"
#define VLT_VENDOR	0x1af4
#define VLT_DEVICE	0x1041
#define VLT_DESC	"vfio-libvirt test: variant driver for 1af4:1041"
#include "vlt_vfio_variant.h"
