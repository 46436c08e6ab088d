"""The catalog cache reads a scan's vectors as one array: the same vectors, rows and fitted
matrix as reading each row alone (``fit_vector`` per track)."""

from __future__ import annotations

import numpy as np
import pytest

from sottovoce.device._errors import CatalogError
from sottovoce.device._features import ITEM_DIM, fit_rows, fit_vector
from sottovoce.device._store_catalog import CatalogCache


def _rows(widths: list[int], seed: int) -> list[tuple[str, str | None, bytes]]:
    rng = np.random.default_rng(seed)
    rows = []
    for n, width in enumerate(widths):
        vector = rng.standard_normal(width).astype(np.float32)
        if n == 2:
            vector[:] = 0.0  # a zero vector stays zero
        rows.append((f"t{n}", None if n % 3 == 0 else f"a{n % 4}", vector.tobytes()))
    return rows


@pytest.mark.parametrize("widths", [[24] * 7, [ITEM_DIM + 8] * 5, [ITEM_DIM] * 3])
def test_a_scan_reads_what_each_row_alone_gives(widths: list[int]) -> None:
    cache = CatalogCache()
    first, second = _rows(widths, 1), _rows(widths, 2)
    second = [(f"u{t}", a, b) for t, a, b in second]
    cache.add(iter(first))
    cache.add(iter(second))  # a second load appends rows
    cache.add(iter([]))
    every = first + second
    assert list(cache.rows) == [t for t, _, _ in every]
    assert list(cache.rows.values()) == list(range(len(every)))
    for track, artist, blob in every:
        alone = np.frombuffer(blob, dtype=np.float32).astype(np.float64)
        assert cache.entries[track][0] == artist
        assert np.array_equal(cache.entries[track][1], alone)
        assert np.array_equal(cache.vectors[track], alone)
        fitted = cache.fitted[cache.rows[track]]
        assert np.array_equal(fitted, fit_vector(alone).astype(np.float32))
    with pytest.raises(ValueError, match="read-only"):
        cache.vectors["t1"][0] = 1.0  # handed out, never changed in place
    codes = cache.artist_of_row.tolist()
    assert codes == [-1 if a is None else cache.artist_codes[a] for _, a, _ in every]


def test_vectors_of_several_sizes_are_a_typed_error_that_loads_nothing() -> None:
    cache = CatalogCache()
    cache.add(iter(_rows([24, 24], 1)))
    with pytest.raises(CatalogError, match="several sizes"):
        cache.add(iter([(f"u{t}", a, b) for t, a, b in _rows([24, 8, 40], 2)]))
    assert list(cache.rows) == ["t0", "t1"] and len(cache.fitted) == 2


def test_fit_rows_of_a_matrix_equals_fit_rows_of_its_rows() -> None:
    matrix = np.random.default_rng(3).standard_normal((6, 40))
    matrix[4] = 0.0
    assert np.array_equal(fit_rows(matrix), fit_rows(list(matrix)))
    assert np.array_equal(fit_rows(matrix[:, :8]), fit_rows([*matrix[:, :8]]))
    assert fit_rows(np.zeros((0, 40))).shape == (0, ITEM_DIM)
