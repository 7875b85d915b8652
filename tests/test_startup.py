"""Commands that train nothing import nothing they do not use (torch above all: about 2 s of a start).

Each command runs in a fresh interpreter, which then reports which heavy packages it imported; times
are measured by benchmarks/startup.py, not here.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import TINY_DATA, tiny_run_overrides
from normbench.config import SCHEMAS

HEAVY = ("torch", "torchvision", "pandas", "matplotlib", "hydra", "scipy")

PROBE = """
import json, sys
sys.argv = ["normbench", *json.loads(sys.argv[1])]
from normbench.cli import main
try:
    main()
except SystemExit:
    pass
print("IMPORTED " + json.dumps(sorted(m for m in {heavy} if m in sys.modules)))
"""


def imported_by(*args: str) -> set[str]:
    """The heavy packages `normbench ARGS` imports, run in a fresh interpreter."""
    code = PROBE.format(heavy=repr(HEAVY))
    out = subprocess.run([sys.executable, "-c", code, json.dumps([str(a) for a in args])], capture_output=True,
                         text=True, timeout=300)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("IMPORTED ")), None)
    assert line is not None, out.stdout + out.stderr
    return set(json.loads(line[len("IMPORTED "):]))


def test_version_imports_nothing_heavy():
    assert imported_by("--version") == set()


def test_list_imports_nothing_heavy():
    assert imported_by("list") == set()


def test_list_shows_the_config_groups_then_the_presets():
    from typer.testing import CliRunner

    from normbench.cli import app
    from normbench.config import GROUPS

    output = CliRunner().invoke(app, ["list"]).output
    headings = [line.split()[0] for line in output.splitlines() if line.rstrip().endswith("=NAME)")]
    assert headings == [*GROUPS, "experiment"]


def test_config_imports_no_torch_and_no_pandas():
    assert imported_by("config", *TINY_DATA, "norm=gn", "batch_size=4") == {"hydra"}


def test_a_config_error_imports_no_torch():
    assert "torch" not in imported_by("config", "norm=nope")


def test_report_of_a_small_folder_imports_no_torch(tmp_path):
    from normbench.config import compose
    from normbench.runner import execute

    execute(compose(tiny_run_overrides(tmp_path)))
    imported = imported_by("report", tmp_path / "default")
    assert (tmp_path / "default" / "report.md").is_file()
    assert "torch" not in imported and "pandas" in imported


@pytest.mark.parametrize("group, registry", [("norm", "normbench.norms:NORMS"), ("model", "normbench.models:MODELS"),
                                             ("data", "normbench.data:DATASETS")])
def test_the_torch_free_schema_table_names_exactly_the_registered_entries(group, registry):
    """Validation (config/rules.py) knows the choices from SCHEMAS, without torch; the builders are
    registered in torch modules. One list may not drift from the other."""
    import importlib

    module, name = registry.split(":")
    assert set(SCHEMAS[group]) == set(getattr(importlib.import_module(module), name).names())
