"""The device package's modules each fit in a head: a few hundred lines, read top to bottom."""

from __future__ import annotations

import ast
from pathlib import Path

import sottovoce.device

DEVICE = Path(sottovoce.device.__file__).resolve().parent
LIMIT = 400


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_every_device_module_is_under_the_limit_and_says_what_it_is_for() -> None:
    modules = sorted(DEVICE.glob("*.py"))
    assert len(modules) > 20  # the glob found the package
    over = {path.name: n for path in modules if (n := _lines(path)) > LIMIT}
    assert over == {}
    trees = {path.name: ast.parse(path.read_text(encoding="utf-8")) for path in modules}
    undocumented = [name for name, tree in trees.items() if not ast.get_docstring(tree)]
    assert undocumented == []


def test_the_split_modules_keep_their_old_import_paths() -> None:
    # Other parts (the simulator, the benchmarks, the store) import these from the modules
    # that held them before the split; each is the one object its new module defines.
    from sottovoce.device import _local_training, _personalize, _ranker, _ranker_layout, _rerank
    from sottovoce.device import _tflite_ops as ops

    for name in ("FEATURES", "PARAMETER_COUNT", "STATE_SIZE", "RankerError", "default_model_path"):
        assert getattr(_ranker, name) is getattr(_ranker_layout, name), name
    for name in ("check_builtin_only", "check_builtin_only_bytes", "model_ops", "operator_codes"):
        assert getattr(_ranker, name) is getattr(ops, name), name
    for name in ("CHUNK_SIZE", "RankedItem", "Ranking", "RerankOptions"):
        assert getattr(_personalize, name) is getattr(_rerank, name), name
    assert _personalize.LocalRound is _local_training.LocalRound
    assert sottovoce.device.Personalizer is _personalize.Personalizer
