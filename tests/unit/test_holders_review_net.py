"""The holder reader against a hostile review, networks and the console: default routes
outside the main table, the console on a boot GPU without a driver, a secondary GPU
that is not the console, and ip or sysfs content that used to crash the reader."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.simhost import VIRTIO_NET, SimHost, holder_lines, read_holders
from tests.support.simkernel import SimKernel
from tests.unit.test_holders import GPU, GPU_ALIAS, IGB, NIC, PF
from vfio_libvirt.holders import HolderReader

GPU2 = "0000:02:00.0"


@pytest.fixture
def host() -> SimHost:
    kernel = SimKernel(Path(os.environ["VFIO_LIBVIRT_SYSFS_ROOT"]))
    kernel.add_device(NIC, VIRTIO_NET, group="4", driver="virtio-pci")
    kernel.add_device(GPU, GPU_ALIAS, group="1", pci_class=0x030000, driver=None)
    kernel.add_device(GPU2, GPU_ALIAS, group="2", pci_class=0x030000, driver="nouveau")
    return SimHost(kernel)


read = read_holders
lines = holder_lines


# --- 6. default routes in every table ---------------------------------------------------------
def test_a_default_route_in_a_policy_routing_table(host):
    host.netdev(NIC, "eth0")
    host.ip_link("eth0")
    host.ip_route("eth0", "192.0.2.1", table="100")
    host.ip_route("eth0", "2001:db8::1", table="main")
    host.ip_route("eth0", None, kind="local", table="local")  # local, broadcast…: not a route out
    host.ip_route("eth0", None, kind="blackhole", table="200")
    reader = HolderReader(host.root, host.ip_command())
    assert [line for line in lines(read(host, NIC, reader)) if line[0] == "critical"] == [
        ("critical", "route", "eth0 carries the default route via 192.0.2.1 (table 100)"),
        ("critical", "route", "eth0 carries the IPv6 default route via 2001:db8::1"),
    ]
    assert host.ip_calls() == ["-j -4 route show table all", "-j -6 route show table all",
                               "-j -d addr show"]


# --- 7./8. the console ----------------------------------------------------------------------
def test_the_firmware_framebuffer_of_a_driverless_boot_gpu_is_the_console(host):
    host.boot_vga(GPU, "1")
    host.firmware_framebuffer("fb0", "efi-framebuffer")
    host.vtconsoles(fbcon_bind="1")
    host.process(900, "Xorg", fds=("/dev/fb0",))
    assert lines(read(host, GPU)) == [
        ("critical", "fbcon", "fb0 (efifb) drives the console on this boot VGA device"),
        ("in_use", "process", "900 (Xorg) has /dev/fb0 open"),
        ("info", "drm", f"{GPU} is the boot VGA device"),
    ]
    assert read(host, GPU2).holders == ()  # not the boot VGA device: not its framebuffer


def test_a_firmware_framebuffer_without_fbcon_is_only_said(host):
    host.boot_vga(GPU, "1")
    host.firmware_framebuffer("fb0", "simple-framebuffer")
    host.vtconsoles(fbcon_bind="0")
    assert read(host, GPU).verdict == "free"
    assert ("info", "fbcon", "fb0 (simplefb) is the firmware framebuffer on this boot VGA "
            "device; binding vfio-pci removes it") in lines(read(host, GPU))


def test_a_secondary_gpus_framebuffer_is_in_use_not_the_console(host):
    host.kernel.add_device("0000:06:00.0", GPU_ALIAS, group="7", pci_class=0x030000,
                           driver="amdgpu")
    host.framebuffer(GPU2, "fb0")
    host.framebuffer("0000:06:00.0", "fb1")
    host.vtconsoles(fbcon_bind="1")
    assert lines(read(host, "0000:06:00.0")) == [
        ("in_use", "fbcon", "fb1 is a framebuffer (fbcon could use it)")]
    assert lines(read(host, GPU2)) == [("critical", "fbcon", "fb0 drives the console (fbcon)")]


def test_the_boot_gpus_framebuffer_is_the_console_whatever_its_number(host):
    host.framebuffer(GPU2, "fb1")
    host.boot_vga(GPU2, "1")
    host.vtconsoles(fbcon_bind="1")
    assert lines(read(host, GPU2))[0] == ("critical", "fbcon", "fb1 drives the console (fbcon)")


# --- 9. robustness --------------------------------------------------------------------------
def test_a_superscript_numvfs_is_garbage_not_a_crash(host):
    host.kernel.add_device(PF, IGB, group="20", driver="igb")
    (host.device(PF) / "sriov_numvfs").write_text("\u00b2\n")
    assert read(host, PF).holders == ()


@pytest.mark.parametrize("route", [
    {"dst": ["x"], "dev": "eth0"}, {"dst": {"a": 1}, "dev": "eth0"}, {"dst": "default", "dev": ["eth0"]},
    {"dst": "default", "dev": "eth0", "type": ["local"]}, {"dst": "default", "dev": "eth0", "table": [1]},
    {"dst": "default", "nexthops": [5, {"dev": {}}, {"dev": "eth0", "gateway": 7}]},
    {"dst": "default", "nexthops": {"dev": "eth0"}}, {"dst": "default", "dev": "eth0", "gateway": ["g"]},
])
def test_odd_route_json_never_crashes(host, route):
    host.netdev(NIC, "eth0")
    host.ip_link("eth0")
    host._ip["route"].append(route)
    host._write_ip()
    found = read(host, NIC)
    assert all(h.name == "eth0" for h in found.holders)


@pytest.mark.parametrize("link", [
    {"ifname": "eth0", "addr_info": 5}, {"ifname": "eth0", "addr_info": "x", "flags": "UP"},
    {"ifname": "eth0", "flags": ["UP"], "addr_info": [{"local": ["x"], "scope": ["global"]}]},
    {"ifname": "eth0", "flags": ["UP"], "addr_info": [{"local": "10.0.0.1\n", "prefixlen": {},
                                                      "scope": "global"}]},
    {"ifname": "eth0", "master": 5, "linkinfo": []}, {"ifname": ["eth0"]},
])
def test_odd_addr_json_never_crashes(host, link):
    host.netdev(NIC, "eth0")
    host._ip["addr"].append(link)
    host._write_ip()
    for holder in read(host, NIC).holders:
        assert "\n" not in str(holder)


def test_deeply_nested_ip_json_is_an_unknown_not_a_crash(host):
    host.netdev(NIC, "eth0")
    host.ip_garbage("[" * 100000 + "]" * 100000)
    (unknown,) = read(host, NIC).holders
    assert (unknown.severity, unknown.kind) == ("critical", "unknown")
