"""One user per line: the NGCF/LightGCN format (``user item item ...``; Gowalla, Yelp2018,
Amazon-book, in ``train.txt`` and ``test.txt``) and the counted format of CiteULike
(line *u* is user *u*: ``count item item ...``).

Loaders return DataFrames with columns ``user``, ``item``, ``value`` (1.0), ids as in the files.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recoder_dist.data.dataset import RecommendationDataset
from recoder_dist.datasets._parsing import bad_line, check_count
from recoder_dist.datasets.download import cache_dir, fetch_file, verify

_NOT_DIGIT_OR_SPACE = re.compile(rb"[^0-9 \t\r\n]")


def read_user_items(path: str | os.PathLike) -> pd.DataFrame:
    """``user item item ...`` per line (a user may have no item).

    Raises:
        ValueError: naming the line: an empty line, a token that is not a non-negative integer,
            a user on two lines, an item twice on a line.
    """
    path = Path(path)
    lines, tokens, lengths = _tokenize(path)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    users = tokens[starts]
    _check_unique_users(path, users)
    return _pairs(path, users, tokens, starts, lengths - 1)


def read_counted_user_items(path: str | os.PathLike) -> pd.DataFrame:
    """Line *u* (0-based) is user *u*: ``count item item ...`` (CiteULike's ``users.dat``).

    Raises:
        ValueError: naming the line: an empty line, a token that is not a non-negative integer,
            a count that differs from the number of items that follow, an item twice on a line.
    """
    path = Path(path)
    lines, tokens, lengths = _tokenize(path)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    counts = tokens[starts]
    wrong = np.flatnonzero(counts != lengths - 1)
    if len(wrong):
        line = int(wrong[0])
        reason = f"the count says {counts[line]} items, the line has {lengths[line] - 1}"
        raise bad_line(path, line + 1, reason, lines[line])
    return _pairs(path, np.arange(len(lines)), tokens, starts, lengths - 1)


def _tokenize(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Lines, all integer tokens, and the number of tokens of each line."""
    data = path.read_bytes()
    bad = _NOT_DIGIT_OR_SPACE.search(data)
    if bad:
        lineno = data.count(b"\n", 0, bad.start()) + 1
        text = data.split(b"\n")[lineno - 1].decode("utf-8", errors="replace")
        raise bad_line(
            path, lineno, f"unexpected character {bad.group().decode('latin-1')!r}", text
        )
    lines = data.decode("ascii").split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    if not lines:
        raise ValueError(f"{path} holds no records")
    fields = [line.split() for line in lines]
    lengths = np.fromiter(map(len, fields), dtype=np.int64, count=len(fields))
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
        raise bad_line(path, int(empty[0]) + 1, "empty line", lines[empty[0]])
    try:
        tokens = np.array(list(itertools.chain.from_iterable(fields)), dtype=np.int64)
    except OverflowError:
        raise ValueError(f"{path} holds a number too large for an id") from None
    return lines, tokens, lengths


def _check_unique_users(path: Path, users: np.ndarray) -> None:
    order = np.argsort(users, kind="stable")
    repeated = np.flatnonzero(users[order][1:] == users[order][:-1])
    if len(repeated):
        first, second = sorted(order[repeated[0] : repeated[0] + 2])
        raise bad_line(path, int(second) + 1, f"user {users[second]} is also on line {first + 1}")


def _pairs(path, users, tokens, starts, num_items) -> pd.DataFrame:
    is_item = np.ones(len(tokens), dtype=bool)
    is_item[starts] = False
    line_of = np.repeat(np.arange(len(users)), num_items)
    items = tokens[is_item]
    order = np.lexsort((items, line_of))
    twice = np.flatnonzero(
        (line_of[order][1:] == line_of[order][:-1]) & (items[order][1:] == items[order][:-1])
    )
    if len(twice):
        line = int(line_of[order][twice[0]])
        raise bad_line(path, line + 1, f"item {items[order][twice[0]]} appears twice")
    return pd.DataFrame(
        {
            "user": np.repeat(users, num_items).astype(np.int64),
            "item": items,
            "value": np.ones(len(items), dtype=np.float32),
        }
    )


@dataclass(frozen=True)
class TrainTest:
    """A fixed split: each user's training items and test items."""

    train: pd.DataFrame
    test: pd.DataFrame

    def datasets(self) -> tuple[RecommendationDataset, RecommendationDataset]:
        """``(train, test)`` datasets over ids as in the files (rows ``0..max user``, columns
        ``0..max item``): train holds the training items, test has them as input and the
        test items as target (the NGCF/LightGCN protocol: all-item ranking, training items
        excluded)."""
        shape = (
            int(max(self.train.user.max(), self.test.user.max())) + 1,
            int(max(self.train.item.max(), self.test.item.max())) + 1,
        )
        train, test = (
            sp.csr_matrix((f.value.to_numpy(), (f.user.to_numpy(), f.item.to_numpy())), shape)
            for f in (self.train, self.test)
        )
        return RecommendationDataset(train), RecommendationDataset(train, test)


@dataclass(frozen=True)
class LineFormatRelease:
    """``train.txt``/``test.txt`` of a public split; digests and counts None where unknown."""

    url: str  # folder holding train.txt and test.txt
    train_sha256: str | None
    test_sha256: str | None
    num_train: int | None
    num_test: int | None


_LIGHTGCN = "https://raw.githubusercontent.com/kuandeng/LightGCN/master/Data"

# Gowalla's digests and counts are those of the copy in ../shared/data, the LightGCN split; if
# the files served at the URL ever differ from it, the download is refused (pass the digests).
# Yelp2018 and Amazon-book: digests UNKNOWN (no trusted copy here), so their downloads need
# train_sha256=/test_sha256=; their counts are the published ones (LightGCN's logs, and the
# Open-CF-Benchmarks tables of the same files).
LINE_FORMAT_RELEASES: dict[str, LineFormatRelease] = {
    "gowalla": LineFormatRelease(
        f"{_LIGHTGCN}/gowalla",
        "0f086326b28a56c2e6dcb81d86ee72d4ccb7eed3a8d26788392356d8f51111cc",
        "099a2a73924e4b754dc6efd730d764f492321b53c38eb93298850c83acf57be3",
        810_128,
        217_242,
    ),
    "yelp2018": LineFormatRelease(f"{_LIGHTGCN}/yelp2018", None, None, 1_237_259, 324_147),
    "amazon-book": LineFormatRelease(f"{_LIGHTGCN}/amazon-book", None, None, 2_380_730, 603_378),
}


def load_train_test(folder: str | os.PathLike) -> TrainTest:
    """``train.txt`` and ``test.txt`` of ``folder``, in the ``user item item ...`` format."""
    folder = Path(folder)
    return TrainTest(read_user_items(folder / "train.txt"), read_user_items(folder / "test.txt"))


def load_lightgcn(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    train_sha256: str | None = None,
    test_sha256: str | None = None,
) -> TrainTest:
    """A split of NGCF/LightGCN: ``"gowalla"``, ``"yelp2018"`` or ``"amazon-book"``.

    Args:
        name: the dataset.
        data_dir: a folder holding ``train.txt`` and ``test.txt``; when None they are
            downloaded once into the cache folder.
        train_sha256, test_sha256: digests to check instead of the pinned ones; required to
            download a dataset whose digests are unknown.

    Raises:
        ValueError: a malformed line (named), a digest or a number of interactions that differs.
    """
    if name not in LINE_FORMAT_RELEASES:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(LINE_FORMAT_RELEASES)}")
    release = LINE_FORMAT_RELEASES[name]
    frames = []
    for part, sha256, expected in (
        ("train", train_sha256 or release.train_sha256, release.num_train),
        ("test", test_sha256 or release.test_sha256, release.num_test),
    ):
        path = _local_or_fetched(
            f"{release.url}/{part}.txt", sha256, data_dir, Path(name) / f"{part}.txt"
        )
        frame = read_user_items(path)
        check_count(path, "interactions", len(frame), expected)
        frames.append(frame)
    return TrainTest(*frames)


CITEULIKE_A_URL = "https://raw.githubusercontent.com/js05212/citeulike-a/master/users.dat"
# The copy in ../shared/data; its README says 204,987 user-item pairs, the file holds 204,986.
CITEULIKE_A_SHA256 = "53211d82c14ff261e595634d285ed9fbf8049cf81dcb751d924d695b9612a02c"
CITEULIKE_A_USERS, CITEULIKE_A_PAIRS = 5_551, 204_986


def load_citeulike_a(
    data_dir: str | os.PathLike | None = None, *, sha256: str | None = None
) -> pd.DataFrame:
    """CiteULike-a's ``users.dat`` (5,551 users' libraries), verified by SHA-256.

    Args:
        data_dir: a folder holding ``users.dat``; when None it is downloaded once into the cache.
        sha256: a digest to check instead of the pinned one.
    """
    path = _local_or_fetched(
        CITEULIKE_A_URL, sha256 or CITEULIKE_A_SHA256, data_dir, Path("citeulike-a/users.dat")
    )
    frame = read_counted_user_items(path)
    check_count(path, "users", int(frame.user.max()) + 1, CITEULIKE_A_USERS)
    check_count(path, "user-item pairs", len(frame), CITEULIKE_A_PAIRS)
    return frame


def _local_or_fetched(url: str, sha256: str | None, data_dir, cached: Path) -> Path:
    if data_dir is None:
        return fetch_file(url, sha256, cache_dir() / cached)
    path = Path(data_dir) / cached.name
    if sha256:
        return verify(path, sha256)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    return path
