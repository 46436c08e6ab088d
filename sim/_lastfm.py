"""The HetRec 2011 Last.fm 2K adapter: users' play counts per artist, the public's tags on the
artists and the artists' names, read in place from the dataset's folder into a
:class:`~._data.Dataset` (an item is an artist)."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from sottovoce.sim._data import (
    MAX_ID_LENGTH,
    Dataset,
    DatasetError,
    Interaction,
    TagAssignment,
    check_id,
    number,
    sample_users,
)

_FILES = ("user_artists.dat", "user_taggedartists.dat", "artists.dat")


def load_lastfm(
    path: Path | str,
    *,
    users: int | None = None,
    seed: int = 0,
    min_artists: int = 10,
) -> Dataset:
    """HetRec 2011 Last.fm 2K: users' play counts per artist (an item is an artist).

    Every (user, artist, weight) row becomes one ``play`` interaction with ``value`` = the play
    count and no timestamp. ``users`` keeps a deterministic random sample (by ``seed``) of that
    many users among those with at least ``min_artists`` artists (:func:`sample_users`); the
    items are the artists those users listened to. Tag assignments on those artists are kept
    from *all* users: they are the public catalog's description of the artists, not the
    sampled users' behaviour.
    """
    root = Path(path)
    if not root.is_dir():
        raise DatasetError("no such Last.fm directory", path=root, code="dataset_missing")
    for name in _FILES:
        if not (root / name).is_file():
            raise DatasetError(
                f"missing {name}: is this the HetRec 2011 Last.fm 2K folder?",
                path=root,
                code="dataset_missing",
            )
    per_user: dict[str, list[Interaction]] = defaultdict(list)
    plays = root / "user_artists.dat"
    for line, (user, artist, weight) in _rows(plays, ("userID", "artistID", "weight")):
        count = number(weight, path=plays, line=line, name="weight")
        if count <= 0:
            raise DatasetError("a play count must be > 0", path=plays, line=line, field="weight")
        per_user[user].append(Interaction(artist, None, "play", count))
    tagging = ("userID", "artistID", "tagID", "day", "month", "year")
    tags = [TagAssignment(*row[:3]) for _, row in _rows(root / "user_taggedartists.dat", tagging)]
    names = ("id", "name", "url", "pictureURL")
    titles = {row[0]: row[1] for _, row in _rows(root / "artists.dat", names, ids=1)}
    listened = {i.item for rows in per_user.values() for i in rows}
    full = Dataset.build(
        "lastfm-hetrec2011-2k",
        per_user,
        artists={a: a for a in listened},  # an item is an artist
        tags=tags,
        titles={a: t for a, t in titles.items() if a in listened},
    )
    if users is None:
        return full
    return sample_users(full, users, seed=seed, min_interactions=min_artists)


def _rows(path: Path, columns: Sequence[str], *, ids: int = 2) -> list[tuple[int, list[str]]]:
    """(line number, fields) of a tab-separated file with the given header; the first ``ids``
    fields are checked as ids."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # some HetRec files are Latin-1
    lines = text.splitlines()
    if not lines or lines[0].split("\t")[: len(columns)] != list(columns):
        header = "<tab>".join(columns)
        raise DatasetError(f"expected the tab-separated header {header}", path=path, line=1)
    # One match per line covers the common case; a line that fails is then diagnosed.
    good = re.compile("\t".join([rf"[^\s]{{1,{MAX_ID_LENGTH}}}"] * ids) + r"(\t|$)").match
    rows = []
    for line, content in enumerate(lines[1:], start=2):
        if not content.strip():
            continue
        fields = content.split("\t")
        if len(fields) < len(columns) or not good(content):
            if len(fields) < len(columns):
                raise DatasetError(
                    f"expected {len(columns)} tab-separated fields, got {len(fields)}",
                    path=path,
                    line=line,
                )
            for name, value in zip(columns[:ids], fields[:ids], strict=True):
                check_id(value, path=path, line=line, name=name)
        rows.append((line, fields))
    return rows
