"""Loaders on the real files of ../shared/data (counts from its README), corrupt and truncated
copies of them refused by name and line, and the download path over a loopback HTTP server."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import os
import socket
import threading
import zipfile

import numpy as np
import pandas as pd
import pytest

from recoder_dist.datasets import (
    line_format,
    load_citeulike_a,
    load_events,
    load_lightgcn,
    load_ml100k,
    load_movielens,
    movielens,
    read_counted_user_items,
    read_ml1m_ratings,
    read_ratings_csv,
    read_user_items,
)
from recoder_dist.datasets.download import (
    Digest,
    DownloadError,
    fetch_file,
    fetch_zip_member,
    sha256_of,
)
from tests.conftest import shared_data

# ------------------------------------------------------------------ the real files


def test_ml100k_counts_and_first_rows():
    ratings = load_movielens("ml-100k", shared_data("ml-100k"))
    assert (len(ratings), ratings.user.nunique(), ratings.item.nunique()) == (100_000, 943, 1_682)
    assert list(ratings.columns) == ["user", "item", "value", "rating", "timestamp"]
    # u.data's first line: 196 242 3 881250949
    assert ratings.iloc[0].tolist() == [196, 242, 3.0, 3.0, 881250949]
    assert ratings.rating.between(1, 5).all() and (ratings.value == ratings.rating).all()
    pd.testing.assert_frame_equal(load_ml100k(shared_data("ml-100k")), ratings)


def test_ml_latest_small_counts_match_a_naive_parse():
    path = shared_data("ml-latest-small") / "ratings.csv"
    ratings = load_movielens("ml-latest-small", path.parent)
    assert (len(ratings), ratings.user.nunique(), ratings.item.nunique()) == (100_836, 610, 9_724)
    with open(path) as f:
        lines = f.read().splitlines()[1:]
    naive = [line.split(",") for line in lines]
    assert ratings.user.tolist() == [int(r[0]) for r in naive]
    assert ratings.item.tolist() == [int(r[1]) for r in naive]
    assert np.array_equal(ratings.rating, np.array([float(r[2]) for r in naive], np.float32))
    assert ratings.timestamp.tolist() == [int(r[3]) for r in naive]


def test_ml1m_format_reads_the_same_ratings(tmp_path):
    """No ML-1M copy here: u.data rewritten with '::' is read back identically."""
    ml100k = load_ml100k(shared_data("ml-100k"))
    path = tmp_path / "ratings.dat"
    source = (shared_data("ml-100k") / "u.data").read_text()
    path.write_text(source.replace("\t", "::"))
    pd.testing.assert_frame_equal(read_ml1m_ratings(path), ml100k)
    # The published count of ML-1M (1,000,209) catches a file that is not ML-1M's.
    with pytest.raises(ValueError, match=r"100,000 ratings, expected 1,000,209"):
        load_movielens("ml-1m", tmp_path)


def test_ml_1m_implicit_through_the_generic_csv_loader():
    events = load_events(shared_data("ml-1m-implicit") / "interactions.csv")
    assert (len(events), events.user.nunique(), events.item.nunique()) == (571_531, 5_949, 2_810)
    assert list(events.columns) == ["user", "item", "value"] and (events.value == 1).all()
    assert events.user.dtype == np.int64 and events.item.dtype == np.int64


def test_gowalla_counts_and_pairs_match_a_naive_parse():
    folder = shared_data("gowalla")
    split = load_lightgcn("gowalla", folder)
    assert (len(split.train), len(split.test)) == (810_128, 217_242)
    assert split.train.user.nunique() == split.test.user.nunique() == 29_858
    assert pd.concat([split.train.item, split.test.item]).nunique() == 40_981
    naive = set()
    with open(folder / "test.txt") as f:
        for line in f:
            user, *items = (int(token) for token in line.split())
            naive.update((user, item) for item in items)
    assert set(zip(split.test.user.tolist(), split.test.item.tolist())) == naive
    train, test = split.datasets()
    assert train.interactions.shape == (29_858, 40_981) and test.target.nnz == 217_242


def test_citeulike_counts_and_pairs_match_a_naive_parse():
    folder = shared_data("citeulike-a")
    libraries = load_citeulike_a(folder)
    counts = (len(libraries), libraries.user.nunique(), libraries.item.nunique())
    assert counts == (204_986, 5_551, 16_980)
    naive = set()
    with open(folder / "users.dat") as f:
        for user, line in enumerate(f):
            _, *items = (int(token) for token in line.split())
            naive.update((user, item) for item in items)
    assert set(zip(libraries.user.tolist(), libraries.item.tolist())) == naive


# ------------------------------------------------------- corrupt and truncated copies


def corrupt_copy(tmp_path, source, name, edit) -> os.PathLike:
    """``source``'s lines, changed by ``edit(lines)``, written to ``tmp_path / name``."""
    with open(source, newline="") as f:
        lines = f.read().split("\n")
    path = tmp_path / name
    path.write_text("\n".join(edit(lines)))
    return path


def replace_line(number, text):
    def edit(lines):
        lines[number - 1] = text
        return lines

    return edit


def refused(reader, path, where):
    with pytest.raises(ValueError) as error:
        reader(path)
    message = str(error.value)
    assert str(path) in message and where in message, message
    return message


U_DATA = ("ml-100k", "u.data")
CORRUPT_U_DATA = [
    ("truncated", lambda lines: lines[:500] + [lines[500][:5]], "line 501"),
    ("non-integer id", replace_line(7, "12\tx9\t3\t881250949"), "line 7"),
    ("fractional id", replace_line(8, "12\t1.5\t3\t881250949"), "line 8"),
    ("negative id", replace_line(9, "-3\t5\t3\t881250949"), "line 9"),
    ("NaN rating", replace_line(10, "12\t7\tnan\t881250949"), "line 10"),
    ("missing rating", replace_line(11, "12\t7\t\t881250949"), "line 11"),
    ("extra field", replace_line(12, "12\t7\t3\t881250949\t1"), "line 12"),
    ("empty line", replace_line(13, ""), "line 13"),
    ("extra field on every line", lambda lines: [x and x + "\t0" for x in lines], "line 1"),
]


@pytest.mark.parametrize(
    "edit, where", [c[1:] for c in CORRUPT_U_DATA], ids=[c[0] for c in CORRUPT_U_DATA]
)
def test_corrupt_u_data_is_refused_by_line(tmp_path, edit, where):
    path = corrupt_copy(tmp_path, shared_data(U_DATA[0]) / U_DATA[1], "u.data", edit)
    refused(movielens.read_ml100k_ratings, path, where)


def test_u_data_cut_inside_its_last_field_is_refused_by_its_digest(tmp_path):
    source = (shared_data("ml-100k") / "u.data").read_bytes()
    (tmp_path / "u.data").write_bytes(source[:-3])  # the last timestamp loses its end
    movielens.read_ml100k_ratings(tmp_path / "u.data")  # well-formed: only the digest tells
    with pytest.raises(ValueError, match="SHA-256"):
        load_ml100k(tmp_path)


def test_corrupt_ratings_csv_is_refused_by_line(tmp_path):
    source = shared_data("ml-latest-small") / "ratings.csv"
    header = corrupt_copy(tmp_path, source, "a.csv", replace_line(1, "user,item,rating,time"))
    refused(read_ratings_csv, header, "line 1")
    extra = corrupt_copy(tmp_path, source, "b.csv", replace_line(3, "1,3,4.0,964981247,9"))
    refused(read_ratings_csv, extra, "line 3")
    cut = corrupt_copy(tmp_path, source, "c.csv", lambda lines: lines[:1000] + ["610,16"])
    refused(read_ratings_csv, cut, "line 1001")
    inf = corrupt_copy(tmp_path, source, "d.csv", replace_line(4, "1,6,inf,964982224"))
    refused(read_ratings_csv, inf, "line 4")


def test_corrupt_ratings_dat_is_refused_by_line(tmp_path):
    source = (shared_data("ml-100k") / "u.data").read_text().replace("\t", "::")
    (tmp_path / "ratings.dat").write_text(source)
    lines = corrupt_copy(tmp_path, tmp_path / "ratings.dat", "bad.dat", replace_line(6, "1::2::3"))
    refused(read_ml1m_ratings, lines, "line 6")
    tab = corrupt_copy(
        tmp_path, tmp_path / "ratings.dat", "tab.dat", replace_line(2, "1::2\t::3::4")
    )
    refused(read_ml1m_ratings, tab, "line 2")


GOWALLA_TRAIN = ("gowalla", "train.txt")
CORRUPT_LINE_FORMAT = [
    ("letter", replace_line(4, "3 12 x 17"), "line 4"),
    ("decimal point", replace_line(5, "4 12.0 17"), "line 5"),
    ("empty line", replace_line(6, ""), "line 6"),
    ("user twice", replace_line(7, "2 5 6"), "line 7"),
    ("item twice", replace_line(8, "7 5 6 5"), "line 8"),
]


@pytest.mark.parametrize(
    "edit, where", [c[1:] for c in CORRUPT_LINE_FORMAT], ids=[c[0] for c in CORRUPT_LINE_FORMAT]
)
def test_corrupt_line_format_is_refused_by_line(tmp_path, edit, where):
    path = corrupt_copy(tmp_path, shared_data("gowalla") / "train.txt", "train.txt", edit)
    message = refused(read_user_items, path, where)
    if "twice" in message:
        assert "also on line 3" in message or "5 appears twice" in message


def test_truncated_gowalla_is_refused(tmp_path):
    folder = shared_data("gowalla")
    (tmp_path / "train.txt").write_bytes((folder / "train.txt").read_bytes()[:2_000_000])
    (tmp_path / "test.txt").write_bytes((folder / "test.txt").read_bytes())
    read_user_items(tmp_path / "train.txt")  # cut lines are still well-formed lines
    with pytest.raises(ValueError, match="SHA-256"):
        load_lightgcn("gowalla", tmp_path)
    # Without digests, the published numbers of interactions catch it.
    with pytest.raises(ValueError, match=r"expected 810,128"):
        load_lightgcn("gowalla", tmp_path, train_sha256=sha256_of(tmp_path / "train.txt"))


def test_corrupt_citeulike_is_refused_by_line(tmp_path):
    source = shared_data("citeulike-a") / "users.dat"
    cut = corrupt_copy(tmp_path, source, "a.dat", lambda lines: lines[:99] + [lines[99][:40]])
    message = refused(read_counted_user_items, cut, "line 100")
    assert "the count says" in message
    assert read_counted_user_items(source).shape[0] == 204_986
    wrong_count = corrupt_copy(tmp_path, source, "b.dat", replace_line(3, "3 517 791"))
    refused(read_counted_user_items, wrong_count, "line 3")
    (tmp_path / "users.dat").write_bytes(source.read_bytes()[:-2])  # inside the last item
    with pytest.raises(ValueError, match="SHA-256"):
        load_citeulike_a(tmp_path)


EVENTS_CSV = "user,item,score,when\n1,10,1.0,100\n2,11,2.5,200\n3,10,1.0,300\n"
CORRUPT_EVENTS = [
    ("missing id", "4,,1.0,400", "line 5", "item missing"),
    ("fractional id", "4,1.5,1.0,400", "line 5", "not a non-negative integer"),
    ("text id", "u4,12,1.0,400", "line 5", "not a non-negative integer"),
    ("negative id", "-4,12,1.0,400", "line 5", "not a non-negative integer"),
    ("NaN value", "4,12,nan,400", "line 5", "not a finite number"),
    ("missing value", "4,12,,400", "line 5", "not a finite number"),
    ("missing timestamp", "4,12,1.0,", "line 5", "when missing"),
    ("too few fields", "4,12", "line 5", "not a finite number"),
    ("too many fields", "4,12,1.0,400,9", "line 5", "Expected 4 fields"),
]


@pytest.mark.parametrize(
    "line, where, what", [c[1:] for c in CORRUPT_EVENTS], ids=[c[0] for c in CORRUPT_EVENTS]
)
def test_corrupt_events_csv_is_refused_by_line(tmp_path, line, where, what):
    path = tmp_path / "events.csv"
    path.write_text(EVENTS_CSV + line + "\n")
    read = functools.partial(load_events, value_col="score", timestamp_col="when")
    message = refused(read, path, where)
    assert what in message, message


def test_events_csv_and_parquet_read_the_same(tmp_path):
    (tmp_path / "events.csv").write_text(EVENTS_CSV)
    table = pd.read_csv(tmp_path / "events.csv")
    table.to_parquet(tmp_path / "events.parquet")
    read = functools.partial(load_events, value_col="score", timestamp_col="when")
    expected = pd.DataFrame(
        {
            "user": np.array([1, 2, 3]),
            "item": np.array([10, 11, 10]),
            "value": np.array([1.0, 2.5, 1.0], np.float32),
            "timestamp": np.array([100, 200, 300]),
        }
    )
    pd.testing.assert_frame_equal(read(tmp_path / "events.csv"), expected)
    pd.testing.assert_frame_equal(read(tmp_path / "events.parquet"), expected)
    strings = load_events(tmp_path / "events.csv", integer_ids=False)
    assert strings.user.tolist() == ["1", "2", "3"] and (strings.value == 1).all()
    with pytest.raises(ValueError, match="no column 'rating'"):
        load_events(tmp_path / "events.csv", value_col="rating")


def test_corrupt_parquet_is_refused(tmp_path):
    table = pd.DataFrame({"user": [1.0, None, 3.0], "item": [10, 11, 12]})
    table.to_parquet(tmp_path / "nulls.parquet")
    refused(load_events, tmp_path / "nulls.parquet", "row 1")
    (tmp_path / "events.csv").write_text(EVENTS_CSV)
    pd.read_csv(tmp_path / "events.csv").to_parquet(tmp_path / "whole.parquet")
    data = (tmp_path / "whole.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    refused(load_events, tmp_path / "cut.parquet", "not a readable Parquet file")


# ------------------------------------------------------------- download, over loopback


@pytest.fixture
def server():
    """Serves files from a folder on 127.0.0.1 and records the paths requested."""
    started = []

    def serve(folder):
        requests = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
        started.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}", requests

    yield serve
    for httpd in started:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("RECODER_DIST_CACHE", str(folder))
    return folder


def test_movielens_download_verifies_and_reuses_the_cache(tmp_path, server, cache, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "ml-100k.zip", "w") as zf:
        zf.write(shared_data("ml-100k") / "u.data", "ml-100k/u.data")
    url, requests = server(served)
    release = dataclasses.replace(movielens.RELEASES["ml-100k"], url=f"{url}/ml-100k.zip")
    monkeypatch.setitem(movielens.RELEASES, "ml-100k", release)
    monkeypatch.delenv(movielens.DATA_DIR_ENV, raising=False)

    assert len(load_ml100k()) == 100_000
    assert requests == ["/ml-100k.zip"]
    assert sha256_of(cache / "ml-100k" / "u.data") == release.sha256
    assert len(load_ml100k()) == 100_000 and len(requests) == 1  # from the cache
    with open(cache / "ml-100k" / "u.data", "ab") as f:
        f.write(b"1\t2\t3\t4\n")  # a cached copy that no longer matches is fetched again
    assert len(load_ml100k()) == 100_000 and len(requests) == 2


def test_a_download_with_another_digest_is_refused(tmp_path, server):
    served = tmp_path / "served"
    served.mkdir()
    with zipfile.ZipFile(served / "data.zip", "w") as zf:
        zf.writestr("data/ratings.csv", "userId,movieId,rating,timestamp\n1,2,3.0,4\n")
    (served / "not-a-zip.zip").write_text("hello")
    url, requests = server(served)
    folder = tmp_path / "cache"
    with pytest.raises(ValueError, match="refused data/ratings.csv .* SHA-256"):
        fetch_zip_member(f"{url}/data.zip", "data/ratings.csv", "0" * 64, folder)
    assert not (folder / "data" / "ratings.csv").exists()
    assert list(folder.iterdir()) == []  # no temporary file left behind
    with pytest.raises(ValueError, match="is not a zip holding"):
        fetch_zip_member(f"{url}/not-a-zip.zip", "data/ratings.csv", "0" * 64, folder)
    with pytest.raises(ValueError, match="refused"):
        fetch_file(f"{url}/not-a-zip.zip", "0" * 64, folder / "file")
    assert len(requests) == 3 and not (folder / "file").exists()


def test_no_download_without_a_pinned_digest(tmp_path, server, cache, monkeypatch):
    url, requests = server(tmp_path)
    release = dataclasses.replace(movielens.RELEASES["ml-latest"], url=f"{url}/ml-latest.zip")
    monkeypatch.setitem(movielens.RELEASES, "ml-latest", release)
    with pytest.raises(ValueError, match="no digest is pinned"):
        load_movielens("ml-latest")
    with pytest.raises(ValueError, match="no digest is pinned"):
        load_lightgcn("yelp2018")
    with pytest.raises(ValueError, match="64 hex digits"):
        load_movielens("ml-latest", sha256="abc")
    assert requests == []


@pytest.mark.parametrize(
    ("algorithm", "value", "message"),
    [("md5", "c4d9eecf", "32 hex digits"), ("sha1", "0" * 40, "unknown digest algorithm")],
)
def test_malformed_digests_are_refused(algorithm, value, message):
    with pytest.raises(ValueError, match=message):
        Digest(algorithm, value)


# ml-1m's ratings.dat is u.data with '::'; ml-20m's and ml-25m's ratings.csv has ml-latest-small's
# format. Each zip holds the ratings file where GroupLens' zip holds it, beside another file.
ZIPPED_RELEASES = {
    "ml-1m": (
        lambda: (shared_data("ml-100k") / "u.data").read_text().replace("\t", "::"),
        lambda: load_ml100k(shared_data("ml-100k")),
    ),
    "ml-20m": (
        lambda: (shared_data("ml-latest-small") / "ratings.csv").read_text(),
        lambda: load_movielens("ml-latest-small", shared_data("ml-latest-small")),
    ),
}
ZIPPED_RELEASES["ml-25m"] = ZIPPED_RELEASES["ml-20m"]


def served_release(name, served, url, monkeypatch):
    """A zip laid out as GroupLens' ``name``.zip, served at ``url``; returns the release
    pointing there (expecting the number of ratings written) and the expected ratings."""
    ratings, expected = ZIPPED_RELEASES[name]
    release = movielens.RELEASES[name]
    with zipfile.ZipFile(served / f"{name}.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{name}/README.txt", "not the ratings")
        zf.writestr(release.member, ratings())
    expected = expected()
    release = dataclasses.replace(release, url=f"{url}/{name}.zip", num_ratings=len(expected))
    monkeypatch.setitem(movielens.RELEASES, name, release)
    return release, expected


@pytest.mark.parametrize("name", sorted(ZIPPED_RELEASES))
def test_a_zip_whose_md5_is_not_the_published_one_is_refused(
    name, tmp_path, server, cache, monkeypatch
):
    url, requests = server(tmp_path)
    pinned = movielens.RELEASES[name].archive_digest
    assert pinned.algorithm == "md5" and movielens.RELEASES[name].sha256 is None
    release, _ = served_release(name, tmp_path, url, monkeypatch)
    actual = hashlib.md5((tmp_path / f"{name}.zip").read_bytes()).hexdigest()
    with pytest.raises(ValueError) as error:
        load_movielens(name)
    assert f"refused {name}.zip from {release.url}" in str(error.value)
    assert f"MD5 is {actual}, expected {pinned.hexdigest}" in str(error.value)
    assert requests == [f"/{name}.zip"]
    assert [p for p in cache.rglob("*") if p.is_file()] == []  # nothing of it is kept


@pytest.mark.parametrize("name", sorted(ZIPPED_RELEASES))
def test_a_zip_with_the_published_md5_is_read_and_cached(
    name, tmp_path, server, cache, monkeypatch
):
    url, requests = server(tmp_path)
    release, expected = served_release(name, tmp_path, url, monkeypatch)
    # The same zip, now with its own MD5 pinned as the published one.
    md5 = hashlib.md5((tmp_path / f"{name}.zip").read_bytes()).hexdigest()
    release = dataclasses.replace(release, archive_digest=Digest("md5", md5))
    monkeypatch.setitem(movielens.RELEASES, name, release)

    pd.testing.assert_frame_equal(load_movielens(name), expected)
    cached = cache / release.member
    assert cached.is_file() and len(requests) == 1
    assert not list(cache.glob("*.zip")) and not list(cache.glob("tmp*"))
    pd.testing.assert_frame_equal(load_movielens(name), expected)
    assert len(requests) == 1  # from the cache, recognized by the SHA-256 recorded beside it
    with open(cached, "a") as f:
        f.write(f"1{',' if name != 'ml-1m' else '::'}2\n")  # a cached copy that changed
    pd.testing.assert_frame_equal(load_movielens(name), expected)
    assert len(requests) == 2


@pytest.fixture
def unreachable_url():
    """A URL on a local port bound but not listening: connecting is refused, as without a
    network, immediately and on any machine."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_failed_download_names_the_url_and_leaves_nothing(
    tmp_path, server, unreachable_url, cache
):
    with pytest.raises(DownloadError) as error:
        fetch_file(f"{unreachable_url}/train.txt", "0" * 64, cache / "gowalla" / "train.txt")
    assert isinstance(error.value, ConnectionError)
    assert f"could not download {unreachable_url}/train.txt (" in str(error.value)
    assert "refused" in error.value.reason and "data_dir" in error.value.fix
    url, _ = server(tmp_path)  # reachable, but the file is not there
    with pytest.raises(
        DownloadError, match=r"missing\.zip \(HTTP Error 404: .*\); --data-dir DIR$"
    ):
        fetch_zip_member(f"{url}/missing.zip", "x/u.data", "0" * 64, cache, fix="--data-dir DIR")
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_lightgcn_download_checks_the_pinned_digests(server, cache, monkeypatch):
    url, requests = server(shared_data("gowalla"))
    release = dataclasses.replace(line_format.LINE_FORMAT_RELEASES["gowalla"], url=url)
    monkeypatch.setitem(line_format.LINE_FORMAT_RELEASES, "gowalla", release)
    split = load_lightgcn("gowalla")
    assert (len(split.train), len(split.test)) == (810_128, 217_242)
    assert sorted(requests) == ["/test.txt", "/train.txt"]
    load_lightgcn("gowalla")
    assert len(requests) == 2
    assert sha256_of(cache / "gowalla" / "train.txt") == release.train_sha256
