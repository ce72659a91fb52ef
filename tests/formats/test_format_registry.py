"""The format registry: one record per format, read by the run record, `load`'s `kernels`
refusal, the CLI's help and the README's tables (which must list what the registries hold)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from omniquant import checks, cli, formats
from omniquant.config import OmniQuantConfig, WeightQuant
from omniquant.errors import ConfigError, ExportError, ModelError
from omniquant.formats import REGISTRY, check_format_holds, get_format
from omniquant.models import REGISTRY as FAMILIES
from omniquant.runfile import record_problem

README = Path(__file__).resolve().parents[2] / "README.md"


def table_rows(header: str) -> list[list[str]]:
    """The body rows of the README's Markdown table whose header starts with `header`."""
    lines = README.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[first + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_the_registry_names_each_format_once_and_the_record_reads_them():
    assert tuple(REGISTRY) == formats.FORMATS
    assert all(f.name == name for name, f in REGISTRY.items())
    assert formats.PACKED_FORMATS == ("compressed-tensors", "omniquant-packed", "gguf")
    for name in REGISTRY:
        assert (
            record_problem({"config": OmniQuantConfig().to_dict(), "format": {"name": name}})
            is None
        )
    bad = record_problem({"config": OmniQuantConfig().to_dict(), "format": {"name": "onnx"}})
    assert bad is not None and all(name in bad for name in REGISTRY)


def test_unknown_and_unresolved_formats_are_refused():
    with pytest.raises(ConfigError, match="format must be auto or one of fake, compressed"):
        get_format("onnx")
    with pytest.raises(ConfigError, match="auto"):
        get_format("auto")
    check_format_holds("auto", OmniQuantConfig(WeightQuant(3, 48)), {"x": 64})  # holds all


@pytest.mark.parametrize(
    "fmt, weight, refused",
    [
        ("fake", WeightQuant(3, 48), None),
        ("omniquant-packed", WeightQuant(3, 48), None),
        ("compressed-tensors", WeightQuant(3, 64), "not 3"),
        ("compressed-tensors", WeightQuant(4, 48), "does not divide its width 64"),
        ("gguf", WeightQuant(4, 48), "not a multiple of 32"),
        ("gguf", WeightQuant(3, 64), None),  # exact, as 4-bit blocks
    ],
)
def test_each_format_checks_its_own_settings(fmt, weight, refused):
    config = OmniQuantConfig(weight)
    if refused is None:
        check_format_holds(fmt, config, {"model.layers.0.mlp.up_proj": 64})
    else:
        with pytest.raises(ExportError, match=refused):
            check_format_holds(fmt, config, {"model.layers.0.mlp.up_proj": 64})


def test_kernels_are_refused_with_each_formats_own_reason():
    for name, fmt in REGISTRY.items():
        if fmt.kernels is None:
            checks.check_kernels_source("m", name)
        else:
            with pytest.raises(ModelError, match=re.escape(fmt.kernels[:40])):
                checks.check_kernels_source("m", name)
    assert {n for n, f in REGISTRY.items() if f.kernels} == {"compressed-tensors", "gguf"}


def test_the_cli_help_and_choices_come_from_the_registry():
    parser = cli.build_parser()
    quantize = parser._subparsers._group_actions[0].choices["quantize"]
    export = parser._subparsers._group_actions[0].choices["export"]
    fmt = {a.dest: a for a in quantize._actions}["format"]
    assert fmt.choices == [*REGISTRY, "auto"] and all(
        f.holds in fmt.help for f in REGISTRY.values()
    )
    packed = {a.dest: a for a in export._actions}["format"]
    assert packed.choices == [*formats.PACKED_FORMATS, "auto"]
    assert REGISTRY["fake"].holds not in packed.help


def test_the_readme_format_table_lists_the_registry():
    names = [re.match(r"`([\w-]+)`", row[0]).group(1) for row in table_rows("| format |")]
    assert names == [*REGISTRY, "auto"]


def test_the_readme_family_table_lists_every_registered_family():
    classes = [row[1].strip("`") for row in table_rows("| family | Hugging Face class |")]
    assert set(FAMILIES) <= set(classes)
    for row in table_rows("| family | Hugging Face class |"):
        family = FAMILIES.get(row[1].strip("`"))
        if family is None:
            continue
        assert row[3].startswith("yes") == (not isinstance(family.gguf, str)), row
        assert row[4].startswith("yes") == (family.native is None), row
