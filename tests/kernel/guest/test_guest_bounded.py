"""Bounded waits against a real kernel: a driver that sleeps in remove() or probe().

The test host driver vlt_slow_host (tests/vm/module) owns three QEMU `edu` devices,
each alone in its IOMMU group; its probe()/remove() msleep() for probe_ms/remove_ms,
so a write to unbind or drivers_probe stays in the kernel (D state) that long, as
under a real driver that hangs in its remove or probe.

(a) A write still in the kernel at the deadline (bind_seconds for prepare,
restore_seconds for release): the hook answers libvirt on time, exit 1, one stderr
line naming the device, the write and "stuck", with its stdout/stderr closed (the
test's communicate() returns); the journal says "stuck" while the write is in the
kernel, `vfio-libvirt status` shows it, and a detached process (the entry's pid)
puts the device back on its original driver and drops the entry once the write
returns.  Throughout, a device off its original driver always has a journal entry.
(b) Devices in separate IOMMU groups switch side by side: three cost about one.

Timing under TCG: a hook run spends seconds starting Python over 9p before its
deadline even starts, so a deadline is measured from the moment the stuck write
entered the driver (the module counts the probe()/remove() calls under way in its
read-only parameter "busy"; a sampler watches it), and a call with nothing to wait
for against the same call on an idle domain.  Bytecode goes to a cache in /tmp (an
installed product has its .pyc; the repo here is read-only).  (b) compares the time
the driver spends in probe()/remove() (first call in -> last out), not wall times.

Every test starts and ends with the three devices on vlt-slow-host, the module's
parameters at 0 and no process of the product left behind (the `slow` fixture,
conftest.py).  The support code (Bounded, Watch, the checks) is in guest_bounded.py.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.kernel.guest.guest_bounded import (
    ORIGINAL,
    SLACK,
    STUCK_MS,
    Watch,
    assert_answered,
    assert_answered_after_write,
    assert_status_stuck,
    assert_stuck_line,
    busy,
    set_param,
    stuck_helper,
    wait_settled,
)
from tests.kernel.guest.guest_xml import domain, hostdev

pytestmark = pytest.mark.real_sysfs

# ORIGINAL (vlt-slow-host), SLACK (2 s past a deadline) and STUCK_MS (15 s in the driver)
# are shared with the support code: see guest_bounded.py.
SLOW_MS = 3000         # (b): each remove() and probe() this long
PARALLEL_FACTOR = 1.6  # (b): three groups may cost at most this many times one


# ---------------------------------------------------- (a) a write that outlives the deadline


def test_prepare_stuck_in_remove_answers_on_time_and_puts_the_device_back_later(slow):
    dev = slow.devices[0]
    slow.configure(bind_seconds=3, restore_seconds=3)
    xml = domain("vm-stuck", hostdev(dev.bdf))
    set_param("remove_ms", STUCK_MS)
    with Watch(slow, [dev], never=("bound",)) as watch:
        run = slow.hook("vm-stuck", "prepare", "begin", xml, 60)
        began = watch.entered(run.started, f"\n{run.describe()}")
        assert_answered_after_write(run, began, slow.bind_seconds)
        assert_stuck_line(run, dev.bdf, ("unbind",))
        assert busy() == 1, "the remove() is no longer under way: raise STUCK_MS"
        helper = stuck_helper(slow, dev.bdf, run.pid)

        # libvirt answers a failed start with release: it must not wait for the write
        # either; meanwhile the admin asks for the status
        with ThreadPoolExecutor(1) as pool:
            status = pool.submit(slow.status)
            release = slow.hook("vm-stuck", "release", "end", xml, 60)
            rows = status.result(timeout=120)
        assert busy() == 1, "the remove() ended before the release and status did: raise STUCK_MS"
        assert_status_stuck(rows, dev.bdf)
        assert dev.driver != "vfio-pci"

        settled = wait_settled(slow, dev, helper)
    watch.check()
    idle = slow.idle_release()
    print(f"\nprepare stuck in remove() ({STUCK_MS} ms): answered {run.ended - began:.1f} s after "
          f"remove() began (whole run {run.seconds:.1f} s); release during it {release.seconds:.1f} s "
          f"(idle release {idle.seconds:.1f} s); back on {ORIGINAL} {settled - began:.1f} s after "
          f"remove() began; states {watch.seen[dev.bdf]}")
    assert_answered(release, idle.seconds + slow.restore_seconds + SLACK,
                    f" (an idle release took {idle.seconds:.1f} s)")


def test_release_stuck_in_probe_answers_on_time_and_puts_the_device_back_later(slow):
    dev = slow.devices[0]
    slow.configure(bind_seconds=3, restore_seconds=3)
    xml = domain("vm-stuck", hostdev(dev.bdf))
    with Watch(slow, [dev]) as watch:
        run = slow.hook("vm-stuck", "prepare", "begin", xml, 120)
        assert run.answered and run.rc == 0, run.describe()
        assert dev.driver == "vfio-pci"
        assert slow.journal()[dev.bdf]["status"] == "bound"

        set_param("probe_ms", STUCK_MS)
        release = slow.hook("vm-stuck", "release", "end", xml, 60)
        began = watch.entered(release.started, f"\n{release.describe()}")
        assert_answered_after_write(release, began, slow.restore_seconds)
        assert_stuck_line(release, dev.bdf, ("probe",))
        assert busy() == 1, "the probe() is no longer under way: raise STUCK_MS"
        helper = stuck_helper(slow, dev.bdf, release.pid)
        rows = slow.status()
        assert busy() == 1, "the probe() ended before status did: raise STUCK_MS"
        assert_status_stuck(rows, dev.bdf)

        settled = wait_settled(slow, dev, helper)
    watch.check()
    print(f"\nrelease stuck in probe() ({STUCK_MS} ms): answered {release.ended - began:.1f} s after "
          f"probe() began (whole run {release.seconds:.1f} s); back on {ORIGINAL} "
          f"{settled - began:.1f} s after; states {watch.seen[dev.bdf]}")


# ------------------------------------------------- (b) separate IOMMU groups side by side


def test_three_groups_switch_side_by_side(slow, record_property):
    """remove() and probe() take SLOW_MS each: three groups must cost about one.

    Cost = the time the driver spends in remove() (prepare) or probe() (release), from
    the first call entering to the last leaving, sampled every 0.1 s: three devices one
    after another would take three times as long.  The hooks' wall times are printed
    too (under TCG they are mostly the interpreter starting).
    """
    slow.configure(bind_seconds=30, restore_seconds=30)
    set_param("remove_ms", SLOW_MS)
    set_param("probe_ms", SLOW_MS)
    spans: dict[str, float] = {}
    walls: dict[str, float] = {}
    with Watch(slow, slow.devices) as watch:
        for label, devices in (("one", slow.devices[:1]), ("three", slow.devices)):
            name = f"vm-{label}"
            xml = domain(name, *(hostdev(d.bdf) for d in devices))
            for op, subop, target in (("prepare", "begin", "vfio-pci"), ("release", "end", ORIGINAL)):
                run = slow.hook(name, op, subop, xml, 60)
                assert run.answered and run.rc == 0, run.describe()
                assert [d.driver for d in devices] == [target] * len(devices), run.describe()
                assert busy() == 0
                time.sleep(3 * watch.interval)  # an idle sample after the run
                spans[f"{op} {label}"] = watch.in_driver(run.started, time.monotonic(),
                                                         f"\n{run.describe()}")
                walls[f"{op} {label}"] = run.seconds
            assert slow.journal() == {}
    watch.check()
    line = ", ".join(f"{k} {spans[k]:.1f} s (hook {walls[k]:.1f} s)" for k in spans)
    record_property("side_by_side_seconds", line)
    print(f"\nremove()/probe() {SLOW_MS} ms each, time in the driver: {line}")
    for op in ("prepare", "release"):
        one, three = spans[f"{op} one"], spans[f"{op} three"]
        assert one > SLOW_MS / 1000 * 0.9, (
            f"{op} of one device: {one:.1f} s in the driver, the slow driver was not in it")
        assert three < PARALLEL_FACTOR * one, (
            f"{op}: three devices in three IOMMU groups spent {three:.1f} s in the driver, one "
            f"{one:.1f} s (want < {PARALLEL_FACTOR}x): the groups did not switch side by side ({line})")
