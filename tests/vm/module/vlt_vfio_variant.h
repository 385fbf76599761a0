/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * vfio-libvirt test fixture: a minimal VFIO PCI "variant" driver.
 *
 * It adds nothing to the device; it exists so that the kernel tier of the
 * vfio-libvirt tests has a real driver built on the kernel's vfio_pci_core
 * that publishes a vfio_pci:... alias in modules.alias, exactly like the
 * vendor variant drivers (mlx5_vfio_pci, virtio_vfio_pci, ...) do.
 *
 * Each including .c file defines before including this header:
 *   VLT_DRIVER_NAME   the PCI driver name (deliberately != the module name)
 *   VLT_VENDOR        PCI vendor id to match
 *   VLT_DEVICE        PCI device id to match (PCI_ANY_ID allowed)
 *   VLT_DESC          MODULE_DESCRIPTION text
 *
 * The id table uses PCI_DRIVER_OVERRIDE_DEVICE_VFIO, so the driver only ever
 * binds a device whose driver_override names it, and modpost emits
 * "vfio_pci:v...d...sv*sd*bc*sc*i*" aliases for it.
 */
#include <linux/module.h>
#include <linux/pci.h>
#include <linux/vfio.h>
#include <linux/vfio_pci_core.h>

static int vlt_open_device(struct vfio_device *core_vdev)
{
	struct vfio_pci_core_device *cdev =
		container_of(core_vdev, struct vfio_pci_core_device, vdev);
	int err;

	err = vfio_pci_core_enable(cdev);
	if (err)
		return err;
	vfio_pci_core_finish_enable(cdev);
	return 0;
}

/* Every callback is the generic vfio_pci_core one: no device specifics. */
static const struct vfio_device_ops vlt_vfio_ops = {
	.name		= VLT_DRIVER_NAME,
	.init		= vfio_pci_core_init_dev,
	.release	= vfio_pci_core_release_dev,
	.open_device	= vlt_open_device,
	.close_device	= vfio_pci_core_close_device,
	.ioctl		= vfio_pci_core_ioctl,
	.device_feature	= vfio_pci_core_ioctl_feature,
	.read		= vfio_pci_core_read,
	.write		= vfio_pci_core_write,
	.mmap		= vfio_pci_core_mmap,
	.request	= vfio_pci_core_request,
	.match		= vfio_pci_core_match,
	.bind_iommufd	= vfio_iommufd_physical_bind,
	.unbind_iommufd	= vfio_iommufd_physical_unbind,
	.attach_ioas	= vfio_iommufd_physical_attach_ioas,
	.detach_ioas	= vfio_iommufd_physical_detach_ioas,
};

static int vlt_probe(struct pci_dev *pdev, const struct pci_device_id *id)
{
	struct vfio_pci_core_device *cdev;
	int err;

	cdev = vfio_alloc_device(vfio_pci_core_device, vdev, &pdev->dev,
				 &vlt_vfio_ops);
	if (IS_ERR(cdev))
		return PTR_ERR(cdev);

	dev_set_drvdata(&pdev->dev, cdev);
	err = vfio_pci_core_register_device(cdev);
	if (err) {
		vfio_put_device(&cdev->vdev);
		return err;
	}
	pci_info(pdev, "bound by test variant driver " VLT_DRIVER_NAME "\n");
	return 0;
}

static void vlt_remove(struct pci_dev *pdev)
{
	struct vfio_pci_core_device *cdev = dev_get_drvdata(&pdev->dev);

	vfio_pci_core_unregister_device(cdev);
	vfio_put_device(&cdev->vdev);
}

static const struct pci_device_id vlt_ids[] = {
	{ PCI_DRIVER_OVERRIDE_DEVICE_VFIO(VLT_VENDOR, VLT_DEVICE) },
	{ }
};
MODULE_DEVICE_TABLE(pci, vlt_ids);

static struct pci_driver vlt_driver = {
	.name			= VLT_DRIVER_NAME,
	.id_table		= vlt_ids,
	.probe			= vlt_probe,
	.remove			= vlt_remove,
	.err_handler		= &vfio_pci_core_err_handlers,
	.driver_managed_dma	= true,
};
module_pci_driver(vlt_driver);

MODULE_LICENSE("GPL");
MODULE_DESCRIPTION(VLT_DESC);
