"""Dataset adapters (Last.fm, generic CSV) and item vectors that never see held-out pairs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from sim_helpers import LASTFM, lastfm, lastfm_slice, tiny

from sottovoce._errors import SottovoceError
from sottovoce.sim._datasets import (
    Dataset,
    DatasetError,
    Interaction,
    TagAssignment,
    _truncated_svd,
    build_item_vectors,
    cooccurrence_vectors,
    load_interactions_csv,
    load_lastfm,
    sample_users,
    tag_vectors,
)
from sottovoce.sim._evaluate import split_holdout


def _unit_or_zero(vectors: dict[str, np.ndarray], dim: int = 16) -> None:
    for item, vector in vectors.items():
        assert vector.shape == (dim,), item
        norm = float(np.linalg.norm(vector))
        assert norm == 0.0 or math.isclose(norm, 1.0, rel_tol=1e-9), (item, norm)


# --- Last.fm -------------------------------------------------------------------------------


def test_lastfm_loads_every_play_count() -> None:
    data = lastfm()
    assert (len(data.users), len(data.items), data.size) == (1892, 17632, 92834)
    rows = data.interactions["2"]
    assert len(rows) == 50 and Interaction("51", None, "play", 13883.0) in rows
    assert all(r.event_type == "play" and r.value > 0 and r.timestamp is None for r in rows)
    assert data.artists["51"] == "51" and data.titles["289"] == "Britney Spears"
    assert len(data.tags) > 180_000


def test_lastfm_slice_is_deterministic_and_prefers_active_users() -> None:
    full = lastfm()
    one = load_lastfm(LASTFM, users=40, seed=7)
    assert one.users == sample_users(full, 40, seed=7).users
    assert one.users != sample_users(full, 40, seed=8).users and len(one.users) == 40
    assert all(one.interactions[u] == full.interactions[u] for u in one.users)
    assert all(len(one.interactions[u]) >= 10 for u in one.users)
    assert set(one.items) == {r.item for u in one.users for r in one.interactions[u]}
    # tags of everyone on the slice's artists stay: they describe the catalog
    assert {t.user for t in one.tags} - set(one.users)
    assert {t.item for t in one.tags} <= set(one.items) and set(one.titles) <= set(one.items)
    few = sample_users(full, 1_800, seed=0, min_interactions=50)
    assert all(len(few.interactions[u]) == 50 for u in few.users)
    with pytest.raises(DatasetError) as caught:
        sample_users(full, 5_000)
    assert caught.value.code == "dataset_too_small"


def test_lastfm_missing_folder_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as caught:
        load_lastfm(tmp_path / "nowhere")
    assert caught.value.code == "dataset_missing"
    (tmp_path / "user_artists.dat").write_text("userID\tartistID\tweight\n2\t51\t-3\n")
    (tmp_path / "user_taggedartists.dat").write_text("userID\tartistID\ttagID\tday\tmonth\tyear\n")
    (tmp_path / "artists.dat").write_text("id\tname\turl\tpictureURL\n")
    with pytest.raises(DatasetError, match=r"user_artists.dat, line 2, field 'weight'"):
        load_lastfm(tmp_path)


def test_lastfm_tag_vectors_place_similar_artists_together() -> None:
    data = lastfm()
    split = split_holdout(data, seed=0)
    vectors = build_item_vectors(data, train=split.train)
    _unit_or_zero(vectors)
    tagged = {t.item for t in data.tags}
    assert not any(np.any(vectors[i]) for i in data.items if i not in tagged)
    assert 11_500 < sum(1 for v in vectors.values() if np.any(v)) < 12_133  # some lost all tags
    # Britney Spears (289) sits closer to Christina Aguilera (292) than to Iron Maiden (917)
    britney = vectors["289"]
    assert float(britney @ vectors["292"]) > float(britney @ vectors["917"]) + 0.5


def test_lastfm_vectors_ignore_tags_on_held_out_pairs() -> None:
    """A tag that a user applied to an artist held out for that user changes nothing; the same
    tag on one of their training artists does (so the check can fail)."""
    data = lastfm_slice(25)
    split = split_holdout(data, seed=0)
    user = split.evaluated[0]
    held = sorted(split.heldout[user])[0]
    kept = next(r.item for r in split.train[user])
    base = build_item_vectors(data, train=split.train)

    def with_tag(item: str) -> dict[str, np.ndarray]:
        probe = TagAssignment(user, item, "probe-tag")
        changed = Dataset.build(
            data.name, data.interactions, artists=data.artists, tags=[*data.tags, probe, probe]
        )
        return build_item_vectors(changed, train=split.train)

    on_held = with_tag(held)
    assert all(np.array_equal(base[i], on_held[i]) for i in data.items)
    on_kept = with_tag(kept)
    assert not np.allclose(base[kept], on_kept[kept])


def test_tag_vectors_exclude_pairs_exactly() -> None:
    data = tiny()
    only = TagAssignment("u0", "i3", "rare")  # the only use of tag "rare"
    with_row = tag_vectors([*data.tags, only], items=data.items, exclude_pairs={("u0", "i3")})
    without = tag_vectors(
        [t for t in data.tags if (t.user, t.item) != ("u0", "i3")], items=data.items
    )
    assert all(np.array_equal(with_row[i], without[i]) for i in data.items)
    counted = tag_vectors([*data.tags, only], items=data.items)
    assert not np.allclose(counted["i3"], without["i3"])
    _unit_or_zero(counted)
    assert not np.any(counted["i29"])  # nobody tagged it: the zero vector


def test_truncated_svd_finds_the_leading_structure() -> None:
    """The randomized path (both sides longer than k + oversampling) against numpy's dense
    SVD, on a rank-16 matrix plus sparse noise."""
    rng = np.random.default_rng(4)
    signal = rng.standard_normal((300, 16)) @ rng.standard_normal((16, 200))
    dense = signal * (rng.random((300, 200)) < 0.3) + 0.01 * rng.standard_normal((300, 200))
    rows, cols = np.nonzero(dense)
    u, s = _truncated_svd(rows, cols, dense[rows, cols], shape=dense.shape, k=16, seed=0)
    exact_u, exact_s, _ = np.linalg.svd(dense, full_matrices=False)
    np.testing.assert_allclose(s, exact_s[:16], rtol=2e-3)
    overlap = np.abs(u[:, :8].T @ exact_u[:, :8])  # well-separated leading directions
    np.testing.assert_allclose(np.diag(overlap), 1.0, atol=1e-3)
    small_u, small_s = _truncated_svd(rows % 12, cols, dense[rows, cols], shape=(12, 200), k=16,
                                      seed=0)  # fmt: skip
    assert small_u.shape == (12, 12) and small_s.shape == (12,)


def test_tags_that_tell_nothing_apart_give_zero_vectors() -> None:
    tags = [TagAssignment("u", "a", "rock"), TagAssignment("v", "b", "rock")]
    vectors = tag_vectors(tags, items=["a", "b", "c"])
    assert all(not np.any(v) for v in vectors.values())


def test_tag_vectors_are_deterministic() -> None:
    data = tiny()
    one = tag_vectors(data.tags, items=data.items, seed=1)
    two = tag_vectors(list(reversed(data.tags)), items=data.items, seed=1)
    assert all(np.array_equal(one[i], two[i]) for i in data.items)


# --- Generic CSV ---------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_with_event_types_and_times(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "events.csv",
        (
            "user_id,item_id,timestamp,event_type\n"
            "ann,song-1,2024-03-01T10:00:00+01:00,play\n"
            "ann,song-2,1709290800,complete\n"
            "ann,song-3,1709290800000,like\n"
            "ann,song-4,,skip\n"
            "\n"
            "bob,song-1,2024-03-01 09:00:00,dislike\n"
        ),
    )
    data = load_interactions_csv(path)
    assert data.users == ("ann", "bob") and data.items == ("song-1", "song-2", "song-3", "song-4")
    ann = data.interactions["ann"]
    assert [r.event_type for r in ann] == ["play", "complete", "like", "skip"]
    assert [r.timestamp for r in ann] == [1709283600000, 1709290800000, 1709290800000, None]
    assert data.interactions["bob"][0].timestamp == 1709283600000  # naive: read as UTC
    assert data.positives("ann") == {"song-1", "song-2", "song-3"}
    assert data.positives("bob") == frozenset() and data.artists["song-1"] is None
    assert data.name == "events" and not data.item_vectors


def test_csv_with_values_and_item_features(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "counts.csv",
        "user_id,item_id,timestamp,value\nann,a,,3\nann,b,,0.5\nbob,a,,12\n",
    )
    features = _write(
        tmp_path / "items.csv", "item_id,artist_id,f1,f2,f3\na,x,1,0,0\nb,,0,2,0\nc,y,3,4,0\n"
    )
    data = load_interactions_csv(path, item_features=features)
    assert data.interactions["ann"] == (
        Interaction("a", None, "play", 3.0),
        Interaction("b", None, "play", 0.5),
    )
    assert data.items == ("a", "b", "c")  # c: in the catalog, nobody played it
    assert dict(data.artists) == {"a": "x", "b": None, "c": "y"}
    vectors = build_item_vectors(data, train=data.interactions)
    assert vectors["c"].tolist() == [3.0, 4.0, 0.0]


def test_csv_vectors_come_from_training_interactions_only(tmp_path: Path) -> None:
    rows = ["user_id,item_id,timestamp,value"]
    rows += [f"u{u},i{(u + k) % 12},,{k + 1}" for u in range(10) for k in range(6)]
    rows += ["u0,lonely,,5"]  # only u0 has it
    data = load_interactions_csv(_write(tmp_path / "plays.csv", "\n".join(rows) + "\n"))
    train = {u: tuple(r for r in data.interactions[u] if r.item != "lonely") for u in data.users}
    vectors = build_item_vectors(data, train=train)
    _unit_or_zero(vectors)
    assert not np.any(vectors["lonely"])  # its only interaction is held out
    assert sum(1 for v in vectors.values() if np.any(v)) == 12
    assert all(
        np.array_equal(v, cooccurrence_vectors(train, items=data.items)[i])
        for i, v in vectors.items()
    )
    # whatever else the held-out side holds, the vectors stay the same
    more = _write(tmp_path / "more.csv", "\n".join([*rows, "u1,i0,,900", "u2,lonely,,7"]) + "\n")
    bigger = load_interactions_csv(more)
    again = build_item_vectors(bigger, train=train)
    assert all(np.array_equal(again[i], vectors[i]) for i in data.items)
    listened = build_item_vectors(data, train=data.interactions)
    assert np.any(listened["lonely"])  # counted once it is training data


BAD_CSV = [
    ("", 1, None, "empty file"),
    ("user,item,when,event_type\n", 1, None, "the header must be"),
    ("user_id,item_id,timestamp,event_type\nann,a,,listen\n", 2, "event_type", "is not one of"),
    ("user_id,item_id,timestamp,value\nann,a,,0\n", 2, "value", "positive weight"),
    ("user_id,item_id,timestamp,value\nann,a,,\n", 2, "value", "not a number"),
    ("user_id,item_id,timestamp,value\nann,a,,nan\n", 2, "value", "not a finite number"),
    ("user_id,item_id,timestamp,value\nann,a,yesterday,1\n", 2, "timestamp", "not a timestamp"),
    ("user_id,item_id,timestamp,value\nann,a,,1\nan n,a,,1\n", 3, "user_id", "without whitespace"),
    ("user_id,item_id,timestamp,value\nann,,,1\n", 2, "item_id", "1 to 100 characters"),
    ("user_id,item_id,timestamp,value\nann,a,,1\nann,b,1\n", 3, None, "expected 4 fields"),
    ("user_id,item_id,timestamp,value\n", None, None, "no interaction rows"),
]


@pytest.mark.parametrize(("text", "line", "field", "message"), BAD_CSV)
def test_bad_csv_rows_are_typed_errors(
    tmp_path: Path, text: str, line: int | None, field: str | None, message: str
) -> None:
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(DatasetError, match=message) as caught:
        load_interactions_csv(path)
    error = caught.value
    assert isinstance(error, SottovoceError) and error.code == "dataset_invalid"
    assert (error.path, error.line, error.field) == (path, line, field)
    assert str(error).startswith(str(path) + (f", line {line}" if line else ""))


BAD_FEATURES = [
    ("item_id\na\n", 1, None, "no feature columns"),
    ("id,f1\na,1\n", 1, None, "must start with item_id"),
    ("item_id,f1,f2\na,1,2\na,3,4\n", 3, "item_id", "appears twice"),
    ("item_id,f1,f2\na,1,loud\n", 2, "f2", "not a number"),
    ("item_id,artist_id,f1\na,the band,1\n", 2, "artist_id", "without whitespace"),
    ("item_id,f1\n", None, None, "no item rows"),
]


@pytest.mark.parametrize(("text", "line", "field", "message"), BAD_FEATURES)
def test_bad_item_features_are_typed_errors(
    tmp_path: Path, text: str, line: int | None, field: str | None, message: str
) -> None:
    plays = _write(tmp_path / "plays.csv", "user_id,item_id,timestamp,value\nann,a,,1\n")
    features = _write(tmp_path / "items.csv", text)
    with pytest.raises(DatasetError, match=message) as caught:
        load_interactions_csv(plays, item_features=features)
    assert (caught.value.path, caught.value.line, caught.value.field) == (features, line, field)


def test_missing_or_undecodable_csv(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as caught:
        load_interactions_csv(tmp_path / "absent.csv")
    assert caught.value.code == "dataset_missing" and "absent.csv" in str(caught.value)
    binary = tmp_path / "latin.csv"
    binary.write_bytes(b"user_id,item_id,timestamp,value\nann,caf\xe9,,1\n")
    with pytest.raises(DatasetError, match="line 2: not UTF-8") as caught:
        load_interactions_csv(binary)
    assert caught.value.code == "dataset_invalid"
