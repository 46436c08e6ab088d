"""The install stays small for devices and the folders map onto one import root."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("fastapi", "uvicorn", "torch", "tensorflow", "opacus")


def test_base_requirements_pull_nothing_heavy() -> None:
    base = [r for r in metadata.requires("sottovoce") or [] if "extra ==" not in r]
    assert base, "no requirements found"
    for requirement in base:
        assert not requirement.lower().startswith(HEAVY), requirement


def test_torch_if_ever_required_is_pinned_exactly() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    every = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        every += extra
    for requirement in every:
        if requirement.replace(" ", "").lower().startswith("torch"):
            assert requirement.replace(" ", "") == "torch==2.13.0", requirement


def test_device_import_loads_no_server_or_ml_framework() -> None:
    code = (
        "import sys, sottovoce.device, sottovoce.policy\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)  # fmt: skip
    assert result.stdout.strip() == "[]"


def test_folders_install_under_one_import_root() -> None:
    import sottovoce.device
    import sottovoce.policy

    for module, folder in ((sottovoce.device, "device"), (sottovoce.policy, "policy")):
        assert Path(module.__file__ or "").resolve().parent == ROOT / folder
    for folder in ("device", "sync", "aggregator", "policy", "sim", "tests", "bench"):
        assert (ROOT / folder).is_dir(), folder
