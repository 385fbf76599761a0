from pathlib import Path

import pytest

from tests.support.aliasgen import VFIO_LINES, generate
from vfio_libvirt.aliases import AliasTable, parse_builtin_modinfo, parse_modules_alias
from vfio_libvirt.errors import InputError, OperationError

VIRTIO_NET = "pci:v00001AF4d00001041sv00001AF4sd00001100bc02sc00i00"
E1000E = "pci:v00008086d000010D3sv00008086sd00000000bc02sc00i00"
GPU = "pci:v000010DEd00002204sv00001458sd00004043bc03sc00i00"
CATCH_ALL = "alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci"


def table(*lines: str) -> AliasTable:
    return AliasTable(parse_modules_alias("\n".join(lines) + "\n"))


def ranking(res):
    return [(c.module, c.wildcards) for c in res.candidates]


def test_exact_device_beats_catch_all():
    res = table(CATCH_ALL, "alias vfio_pci:v00001AF4d00001041sv*sd*bc*sc*i* virtio_vfio_pci").resolve(
        VIRTIO_NET
    )
    assert ranking(res) == [("virtio_vfio_pci", 5), ("vfio_pci", 7)]
    assert res.best.pattern == "vfio_pci:v00001AF4d00001041sv*sd*bc*sc*i*"


def test_vendor_only_beats_catch_all_but_loses_to_device():
    res = table(
        "alias vfio_pci:v00001AF4d*sv*sd*bc*sc*i* vendor_vfio",
        CATCH_ALL,
        "alias vfio_pci:v00001AF4d00001041sv*sd*bc*sc*i* virtio_vfio_pci",
    ).resolve(VIRTIO_NET)
    assert ranking(res) == [("virtio_vfio_pci", 5), ("vendor_vfio", 6), ("vfio_pci", 7)]


def test_subsystem_specific_alias_wins_and_only_for_its_subsystem():
    t = table(
        CATCH_ALL,
        "alias vfio_pci:v000010DEd00002204sv*sd*bc*sc*i* gpu_any",
        "alias vfio_pci:v000010DEd00002204sv00001458sd00004043bc*sc*i* gpu_gigabyte",
    )
    assert ranking(t.resolve(GPU)) == [("gpu_gigabyte", 3), ("gpu_any", 5), ("vfio_pci", 7)]
    other = GPU.replace("sv00001458", "sv00001043")
    assert ranking(t.resolve(other)) == [("gpu_any", 5), ("vfio_pci", 7)]


def test_class_based_alias_with_file2alias_trailing_star():
    # file2alias appends '*' after a full class: 4 id wildcards + the trailing one = 5
    t = table(CATCH_ALL, "alias vfio_pci:v*d*sv*sd*bc03sc00i00* vga_vfio")
    assert ranking(t.resolve(GPU)) == [("vga_vfio", 5), ("vfio_pci", 7)]
    assert ranking(t.resolve(E1000E)) == [("vfio_pci", 7)]


@pytest.mark.parametrize("order", ["class-first", "device-first"])
def test_ties_go_to_the_earlier_line_in_either_order(order):
    device = "alias vfio_pci:v000010DEd00002204sv*sd*bc*sc*i* by_device"
    by_class = "alias vfio_pci:v*d*sv*sd*bc03sc00i00* by_class"
    lines = [by_class, device] if order == "class-first" else [device, by_class]
    res = table(CATCH_ALL, *lines).resolve(GPU)
    expected_first = "by_class" if order == "class-first" else "by_device"
    assert res.best.module == expected_first
    assert [c.wildcards for c in res.candidates] == [5, 5, 7]


def test_same_module_with_several_matching_aliases_lists_each_alias():
    t = table(
        "alias vfio_pci:v000015B3d*sv*sd*bc*sc*i* mlx5_vfio_pci",
        "alias vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_vfio_pci",
        CATCH_ALL,
    )
    res = t.resolve("pci:v000015B3d0000101Esv000015B3sd00000001bc02sc00i00")
    assert ranking(res) == [("mlx5_vfio_pci", 5), ("mlx5_vfio_pci", 6), ("vfio_pci", 7)]


def test_identical_alias_declared_twice_is_listed_once():
    res = table(CATCH_ALL, CATCH_ALL).resolve(E1000E)
    assert ranking(res) == [("vfio_pci", 7)]


def test_decoy_prefixes_are_not_ours():
    text = "\n".join(
        [
            "alias vfio_pcix:v*d*sv*sd*bc*sc*i* decoy1",
            "alias vfio_pci_v*d*sv*sd*bc*sc*i* decoy2",
            "alias pci:v*d*sv*sd*bc*sc*i* decoy3",
            "# alias vfio_pci:v*d*sv*sd*bc*sc*i* commented",
            "xalias vfio_pci:v*d*sv*sd*bc*sc*i* decoy4",
            "alias vfio_pci:v*d*sv*sd*bc*sc*i*",  # no module
            "alias vfio_pci:v*d*sv*sd*bc*sc*i* ../evil",  # unsafe module name
            "alias vfio_pci:v*d*sv*sd*bc*sc*i* -r",
        ]
    )
    assert parse_modules_alias(text) == []


def test_no_match_at_all():
    res = table("alias vfio_pci:v00001AF4d00001041sv*sd*bc*sc*i* virtio_vfio_pci").resolve(E1000E)
    assert res.best is None
    assert res.to_json() == {
        "modalias": E1000E, "module": None, "alias": None, "wildcards": None, "candidates": []
    }


@pytest.mark.parametrize("bad", ["", "pci:v*", "usb:v1234p5678", VIRTIO_NET + "x", VIRTIO_NET.lower()])
def test_modalias_is_validated(bad):
    with pytest.raises(InputError, match="modalias"):
        table(CATCH_ALL).resolve(bad)


def test_builtin_vfio_pci_resolves(tmp_path: Path):
    (tmp_path / "modules.alias").write_text(
        "alias vfio_pci:v00001AF4d00001041sv*sd*bc*sc*i* virtio_vfio_pci\nalias pci:v*d*sv* other\n"
    )
    (tmp_path / "modules.builtin.modinfo").write_bytes(
        b"vfio_pci.license=GPL v2\0vfio_pci.alias=vfio_pci:v*d*sv*sd*bc*sc*i*\0"
        b"vfio_pci.description=VFIO PCI\0e1000e.alias=pci:v00008086d000010D3sv*sd*bc*sc*i*\0"
    )
    t = AliasTable.load(tmp_path)
    assert ranking(t.resolve(VIRTIO_NET)) == [("virtio_vfio_pci", 5), ("vfio_pci", 7)]
    assert t.resolve(E1000E).best.source == "builtin"


def test_builtin_only_kernel(tmp_path: Path):
    (tmp_path / "modules.builtin.modinfo").write_bytes(b"vfio_pci.alias=vfio_pci:v*d*sv*sd*bc*sc*i*\0")
    assert AliasTable.load(tmp_path).resolve(E1000E).best.module == "vfio_pci"


def test_builtin_parser_ignores_other_keys_and_bad_names():
    data = b"x.alias=pci:v*\0vfio_pci.aliasx=vfio_pci:v*\0../x.alias=vfio_pci:v*d*\0"
    assert parse_builtin_modinfo(data) == []


def test_missing_modules_dir_is_an_operation_error(tmp_path: Path):
    with pytest.raises(OperationError, match=r"no modules\.alias"):
        AliasTable.load(tmp_path)


def test_missing_alias_file_is_bad_input(tmp_path: Path):
    with pytest.raises(InputError, match="not found"):
        AliasTable.load(tmp_path, tmp_path / "nope")


def test_real_size_alias_file(tmp_path: Path):
    text = generate()
    assert 26_000 < text.count("\n") < 28_000
    path = tmp_path / "modules.alias"
    path.write_text(text)
    t = AliasTable.load(tmp_path)
    assert [(a.module, a.wildcards) for a in t.aliases] == [
        (line.split()[2], line.count("*")) for line in VFIO_LINES
    ]
    assert ranking(t.resolve(VIRTIO_NET)) == [("virtio_vfio_pci", 5), ("vfio_pci", 7)]
    assert ranking(t.resolve(E1000E)) == [("vfio_pci", 7)]


def test_first_and_last_line_without_newline():
    assert len(parse_modules_alias(CATCH_ALL)) == 1
    assert len(parse_modules_alias("alias x y\n" + CATCH_ALL)) == 1
