// SPDX-License-Identifier: GPL-2.0-only
/*
 * vfio-libvirt test fixture: a plain (non-VFIO) PCI host driver whose probe()
 * and remove() can be made slow.
 *
 * It matches QEMU's "edu" device (1234:11e8), which no in-kernel driver
 * claims, and does nothing with it.  probe() and remove() each msleep() for
 * probe_ms / remove_ms milliseconds (module parameters, writable under
 * /sys/module/vlt_slow_host/parameters/).  msleep() sleeps uninterruptibly,
 * so a write to unbind or drivers_probe stays in the kernel (D state) for
 * that long: what a real driver stuck in its remove or probe does to the
 * process that wrote.
 *
 * The read-only parameter "busy" counts the probe()/remove() calls under way:
 * the sysfs driver link says nothing of that, it appears before probe() runs
 * and goes before remove() does.
 */
#include <linux/delay.h>
#include <linux/module.h>
#include <linux/pci.h>

#define VLT_DRIVER_NAME	"vlt-slow-host"

static unsigned int probe_ms;
module_param(probe_ms, uint, 0644);
MODULE_PARM_DESC(probe_ms, "milliseconds probe() sleeps (uninterruptibly)");

static unsigned int remove_ms;
module_param(remove_ms, uint, 0644);
MODULE_PARM_DESC(remove_ms, "milliseconds remove() sleeps (uninterruptibly)");

static atomic_t busy = ATOMIC_INIT(0);

static int vlt_busy_get(char *buf, const struct kernel_param *kp)
{
	return sysfs_emit(buf, "%d\n", atomic_read(&busy));
}

static const struct kernel_param_ops vlt_busy_ops = {
	.get	= vlt_busy_get,
};
module_param_cb(busy, &vlt_busy_ops, NULL, 0444);
MODULE_PARM_DESC(busy, "probe()/remove() calls under way (read-only)");

static int vlt_slow_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	unsigned int ms = READ_ONCE(probe_ms);

	atomic_inc(&busy);
	if (ms)
		msleep(ms);
	atomic_dec(&busy);
	pci_info(pdev, "bound by test host driver " VLT_DRIVER_NAME " (probe slept %u ms)\n", ms);
	return 0;
}

static void vlt_slow_remove(struct pci_dev *pdev)
{
	unsigned int ms = READ_ONCE(remove_ms);

	atomic_inc(&busy);
	if (ms)
		msleep(ms);
	atomic_dec(&busy);
	pci_info(pdev, "released by test host driver " VLT_DRIVER_NAME " (remove slept %u ms)\n", ms);
}

static const struct pci_device_id vlt_slow_ids[] = {
	{ PCI_DEVICE(0x1234, 0x11e8) },	/* QEMU edu */
	{ }
};
MODULE_DEVICE_TABLE(pci, vlt_slow_ids);

static struct pci_driver vlt_slow_driver = {
	.name		= VLT_DRIVER_NAME,
	.id_table	= vlt_slow_ids,
	.probe		= vlt_slow_probe,
	.remove		= vlt_slow_remove,
};
module_pci_driver(vlt_slow_driver);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("vfio-libvirt test: host driver for 1234:11e8 with slow probe/remove");
