"""The command line on real data: prepare, train, evaluate, recommend, similar-items; and its
errors."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest

from recoder_dist.cli import main, parsers
from recoder_dist.datasets import StrongSplitConfig, load_prepared, movielens, prepare
from recoder_dist.model import Recoder
from recoder_dist.nn import DynamicAutoencoder
from recoder_dist.presets import PRESETS, preset
from recoder_dist.similarity import item_vectors
from recoder_dist.training.snapshot import load_snapshot
from tests.conftest import shared_data


def run(capsys, *argv) -> tuple[int, dict | None, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return code, json.loads(lines[-1]) if lines else None, err


@pytest.fixture(scope="module")
def prepared(prepared_ml100k):
    return prepared_ml100k


def brute_force_neighbours(vectors: np.ndarray, k: int) -> list[tuple[list[int], list[float]]]:
    """Each item's ``k`` nearest other items (numbers) and cosines: every other item's cosine
    in float64, fully sorted by cosine, then by number."""
    unit = vectors.astype(np.float64) / np.linalg.norm(vectors, axis=1, keepdims=True)
    cosines = unit @ unit.T
    found = []
    for i, row in enumerate(cosines):
        order = [j for j in np.lexsort((np.arange(len(row)), -row)) if j != i][:k]
        found.append((order, row[order].tolist()))
    return found


@pytest.mark.slow
def test_train_evaluate_recommend(ray_session, prepared, tmp_path, capsys, caplog):
    config = tmp_path / "train.yaml"
    config.write_text("epochs: 2\nbatch-size: 100\nhidden: [64]\n")
    code, trained, _ = run(
        capsys,
        "--config",
        str(config),
        "train",
        "--data",
        str(prepared),
        "--checkpoint-dir",
        str(tmp_path / "ck"),
        "--workers",
        "0",
        "--precision",
        "bf16",
        "--profile",
    )
    assert code == 0 and trained["epoch"] == 2  # the config file's epochs
    assert trained["test"]["eval_users"] == 100
    assert "does not evaluate" not in caplog.text  # no validation asked (--eval-freq 0)
    # The last epoch's phases, one value per rank (here one: in-process).
    assert {"forward", "backward", "optimizer", "batches_cpu"} <= set(trained["profile"])
    assert all(len(seconds) == 1 for seconds in trained["profile"].values())
    assert trained["profile"]["forward"][0] > 0

    code, evaluated, _ = run(
        capsys,
        "evaluate",
        "--checkpoint",
        trained["checkpoint"],
        "--data",
        str(prepared),
        "--workers",
        "0",
    )
    assert code == 0 and evaluated == trained["test"]

    code, written, _ = run(
        capsys,
        "recommend",
        "--checkpoint",
        trained["checkpoint"],
        "--data",
        str(prepared),
        "--output",
        str(tmp_path / "recs"),
        "--top-k",
        "10",
    )
    assert code == 0 and written["users"] == 100
    table = pq.read_table(tmp_path / "recs").to_pylist()
    data = load_prepared(prepared)
    item_index, user_index = data.item_id_map, data.user_id_map
    assert len(table) == 100
    for row in table:
        seen = set(data.split.test.interactions[user_index[row["user"]]].indices.tolist())
        recommended = [item_index[item] for item in row["rank_items"]]
        assert len(recommended) == 10 and not seen & set(recommended)
    assert {row["user"] for row in table} == {
        raw for raw, i in user_index.items() if data.split.test.interactions[i].nnz
    }

    similar = ["similar-items", "--checkpoint", trained["checkpoint"], "--data", str(prepared)]
    similar += ["--output", str(tmp_path / "similar")]
    # --gpus on a Ray without GPUs: the search runs on CPU (the same code), with a warning.
    code, written, _ = run(capsys, *similar, "--top-k", "5", "--workers", "2", "--gpus")
    num_items = len(item_index)
    assert code == 0 and written["items"] == num_items
    table = {row["item"]: row for row in pq.read_table(tmp_path / "similar").to_pylist()}
    restored = Recoder(DynamicAutoencoder(), num_workers=0)
    restored.init_from_model_file(trained["checkpoint"])
    expected = brute_force_neighbours(item_vectors(restored), 5)
    raw_of = {i: raw for raw, i in item_index.items()}
    assert sorted(table) == sorted(raw_of.values())
    for i, (neighbours, cosines) in enumerate(expected):
        row = table[raw_of[i]]
        assert row["similar_items"] == [raw_of[j] for j in neighbours], i
        np.testing.assert_allclose(row["similarities"], cosines, atol=1e-5)

    code, _, err = run(capsys, *similar, "--top-k", str(num_items))
    assert code == 2 and f"--top-k must be in [1, {num_items - 1}]" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--data", "missing-folder", "--checkpoint-dir", "x"], "no split.json"),
        (["evaluate", "--checkpoint", "missing.model", "--data", "x"], "no snapshot file"),
        (
            ["similar-items", "--checkpoint", "missing.model", "--data", "x", "--output", "o"],
            "no split.json",
        ),
        (["--config", "missing.yaml", "demo"], "no such file"),
        (
            ["prepare", "--dataset", "ml-100k", "--output", "o", "--test-users", "0"],
            "--test-users must be >= 1 (train evaluates on them), got 0",
        ),
        (
            ["prepare", "--dataset", "ml-100k", "--output", "o", "--val-fraction", "0.3"],
            "--val-fraction is a --split weak setting",
        ),
        (["prepare", "--dataset", "ml-100k", "--output", __file__], "is a file, not a folder"),
        (
            ["prepare", "--dataset", "ml-100k", "--output", "o", "--split", "weak"]
            + ["--test-users", "50"],
            "--val-users and --test-users are --split strong settings",
        ),
        (
            ["prepare", "--dataset", "ml-100k", "--output", "o", "--input", "events.csv"],
            "--input is for --dataset events; ml-100k is read from --data-dir",
        ),
        (
            ["prepare", "--dataset", "events", "--output", "o", "--data-dir", "d"],
            "--data-dir is for the MovieLens datasets",
        ),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("recoder-dist: error:")


def test_verbose_logs_where_a_user_mistake_was_met(ray_session, capsys, caplog):
    argv = ["evaluate", "--checkpoint", "missing.model", "--data", "x"]
    with caplog.at_level(logging.DEBUG, logger="recoder_dist"):
        logging.getLogger("recoder_dist").setLevel(logging.INFO)  # as without --verbose
        assert main(argv) == 2
        assert "where the error was met" not in caplog.text  # the one line only
        assert main(["--verbose", *argv]) == 2
    assert "where the error was met" in caplog.text and "Traceback" in caplog.text
    assert capsys.readouterr().err.count("recoder-dist: error:") == 2


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.yaml", "epochs: [1\n", "not valid YAML: while parsing a flow sequence"),
        ("bad.json", "{epochs: 1", "not valid JSON: Expecting property name"),
    ],
)
def test_a_config_that_does_not_parse_is_named_in_one_line(capsys, tmp_path, name, text, message):
    config = tmp_path / name
    config.write_text(text)
    assert main(["--config", str(config), "train", "--data", "x", "--checkpoint-dir", "y"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--config {config}: {message}" in err[0]


def test_an_empty_path_is_refused_not_taken_for_the_current_folder(capsys):
    """A quoted, unset shell variable (--output "$OUT") would write the split here."""
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--dataset", "ml-100k", "--output", ""])
    assert exit_info.value.code == 2
    assert "argument --output: an empty path" in capsys.readouterr().err


def test_a_split_without_test_users_is_refused_before_training(
    ray_session, tmp_path, capsys, caplog
):
    events = movielens.load_movielens("ml-100k", shared_data("ml-100k"))
    prepare(events, tmp_path / "no-test", StrongSplitConfig(50, 0), positive_above=3.5)
    argv = ["train", "--data", str(tmp_path / "no-test"), "--checkpoint-dir", str(tmp_path)]
    assert main([*argv, "--workers", "0"]) == 2
    assert "has no test users, which train evaluates" in capsys.readouterr().err
    assert "epoch 1/" not in caplog.text  # no epoch trained
    assert not list(tmp_path.glob("*.model"))


def test_bad_flags_exit_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", "x", "--checkpoint-dir", "y", "--model", "svd"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown model 'svd'; choose one of autoencoder, mf" in err[0]
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"epochz": 3}))
    assert main(["--config", str(config), "train", "--data", "x", "--checkpoint-dir", "y"]) == 2
    assert "unknown settings ['epochz']" in capsys.readouterr().err


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """MovieLens zips at a local port bound but not listening, so that every download is refused
    as without a network; an empty cache and no $RECODER_DIST_ML100K."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        host = f"http://127.0.0.1:{sock.getsockname()[1]}"
        for name, release in movielens.RELEASES.items():
            moved = dataclasses.replace(release, url=f"{host}/{name}.zip")
            monkeypatch.setitem(movielens.RELEASES, name, moved)
        monkeypatch.setenv("RECODER_DIST_CACHE", str(tmp_path / "cache"))
        monkeypatch.delenv(movielens.DATA_DIR_ENV, raising=False)
        yield host


@pytest.mark.parametrize(
    ("argv", "name", "fixes"),
    [
        (["prepare", "--dataset", "ml-1m", "--output", "out"], "ml-1m", ["--data-dir DIR"]),
        (["prepare", "--dataset", "ml-25m", "--output", "out"], "ml-25m", ["--data-dir DIR"]),
        (["demo"], "ml-100k", ["--data-dir DIR", "RECODER_DIST_ML100K=DIR"]),
    ],
)
def test_no_network_is_one_line_and_exit_2(argv, name, fixes, offline, tmp_path, capsys):
    assert main([str(tmp_path / a) if a == "out" else a for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recoder-dist: error: could not download")
    assert f"{offline}/{name}.zip" in err[0] and all(fix in err[0] for fix in fixes)
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_no_network_on_the_real_command_line(offline, tmp_path):
    """The whole stderr of the command, logging included: one line, no traceback."""
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import dataclasses, sys
        from recoder_dist.cli import main
        from recoder_dist.datasets import movielens
        release = movielens.RELEASES["ml-1m"]
        movielens.RELEASES["ml-1m"] = dataclasses.replace(release, url="{offline}/ml-1m.zip")
        sys.exit(main(["prepare", "--dataset", "ml-1m", "--output", "{out}"]))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    err = done.stderr.splitlines()
    assert len(err) == 1, done.stderr
    assert err[0].startswith(f"recoder-dist: error: could not download {offline}/ml-1m.zip (")
    assert "refused); " in err[0] and "ratings.dat as --data-dir DIR" in err[0]


def test_prepare_writes_disjoint_users(prepared):
    split = load_prepared(prepared).split
    parts = [split.train.users, split.validation.users, split.test.users]
    assert sum(len(p) for p in parts) == len(np.unique(np.concatenate(parts)))


@pytest.mark.slow
def test_the_demo_prints_a_short_console_and_learns():
    """The main job as a user runs it (its own local Ray, 2 workers, 40 epochs): at most 40
    lines, none of Ray's own (those stay in Ray's log files), and an autoencoder well above
    popularity (NDCG@100 ~0.24 on these users; ~0.43 after the demo's 40 epochs)."""
    done = subprocess.run(
        [sys.executable, "-m", "recoder_dist", "demo", "--data-dir", str(shared_data("ml-100k"))],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (done.stdout + done.stderr).splitlines()
    assert len(lines) <= 40, "\n".join(lines)
    ray_internals = ("pid=", "SplitCoordinator", "PlacementGroupCleaner", "Ray", "ray.", "INFO")
    assert not [ln for ln in lines if any(word in ln for word in ray_internals)], "\n".join(lines)
    metrics = {
        name: float(next(ln for ln in lines if ln.strip().startswith(name)).split()[-1])
        for name in ("Recall@20", "Recall@50", "NDCG@100")
    }
    assert metrics["NDCG@100"] > 0.35, metrics
    assert 0 < metrics["Recall@20"] < metrics["Recall@50"] < 1, metrics


def test_a_preset_sets_the_flags_and_given_flags_win(ray_session, prepared, tmp_path, capsys):
    """--preset gowalla: tied weights, every item scored; --epochs on the command line wins
    over the preset's 24."""
    code, trained, _ = run(
        capsys,
        "train",
        "--preset",
        "gowalla",
        "--epochs",
        "1",
        "--data",
        str(prepared),
        "--checkpoint-dir",
        str(tmp_path / "ck"),
        "--workers",
        "0",
    )
    assert code == 0 and trained["epoch"] == 1
    params = load_snapshot(trained["checkpoint"]).model_params
    assert params["is_constrained"] is True and params["hidden_layers"] == [200]

    code = main(["train", "--preset", "nope", "--data", "x", "--checkpoint-dir", "y"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nope'; known: [" in err and "'recoder-0.4.0'" in err


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_names_only_train_flags_with_values_they_accept(name, capsys):
    """A preset's key that is not a flag of `train` would be set and silently ignored: the
    preset written out as flags parses, to the preset's values."""
    main, commands = parsers()
    argv = []
    for key, value in preset(name).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, dict):  # --model-param NAME=VALUE, one a setting
            for setting, given in value.items():
                argv += [flag, f"{setting}={json.dumps(given)}"]
        else:
            argv += [flag, *map(str, value if isinstance(value, list) else [value])]
    try:
        args = commands["train"].parse_args(["--data", "d", "--checkpoint-dir", "c", *argv])
    except SystemExit:  # argparse printed which flag or value it refused
        pytest.fail(f"{name}: train refuses {argv}: {capsys.readouterr().err}")
    assert {key: getattr(args, key) for key in preset(name)} == preset(name)
    assert commands["train"] is not main


def test_a_storage_outage_is_one_line_from_here_a_worker_or_the_controller(monkeypatch, capsys):
    """Past the retry bound the run stops with one line naming the URI and exits 1 (not a
    user's mistake, which exits 2), whether the error was raised in this process, by every
    worker, or by Ray Train's controller; another error keeps its traceback."""
    import ray.train

    import recoder_dist.cli as cli
    from recoder_dist.retry import StorageUnavailableError

    outage = StorageUnavailableError("storage unavailable: upload s3://b/run/x failed 3 times")
    argv = ["train", "--data", "d", "--checkpoint-dir", "c"]
    for raised in (
        outage,
        ray.train.WorkerGroupError("workers failed", {0: outage, 1: outage}),
        ray.train.ControllerError(outage),
    ):

        def fail(args, raised=raised):
            raise raised

        monkeypatch.setattr(cli, "_train", fail)
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"recoder-dist: error: {outage}"]
    monkeypatch.setattr(cli, "_train", lambda args: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError, match="disk"):
        main(argv)


@pytest.mark.slow
def test_a_bad_event_met_by_a_ray_data_task_is_one_line_and_so_is_a_recommendation_run(
    prepared, tmp_path
):
    """The whole stderr of the real command line on its own local Ray. A bad id is met in a
    Ray Data task: Ray Data logs the task's traceback as the dataset aborts and appends its
    retry advice to the error; the user sees the error's own line alone. A recommend run that
    succeeds starts Ray quietly, not through Ray Data with its INFO lines and progress (what
    is left: our line naming the checkpoint, and a line of Ray's C++ core worker on the
    scoring actors' restarts, which Python's logging does not reach)."""
    events = tmp_path / "events.csv"
    events.write_text("user,item\n1,2\nu7,3\n")
    command = [sys.executable, "-m", "recoder_dist"]
    done = subprocess.run(
        [*command, "prepare", "--dataset", "events", "--input", str(events)]
        + ["--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == [
        f"recoder-dist: error: {events}: user 'u7' is not a non-negative integer"
    ]

    recoder = Recoder(DynamicAutoencoder([16]), num_workers=0, seed=0)
    recoder.train(load_prepared(prepared).split.train, batch_size=100)
    checkpoint = recoder.save_state(str(tmp_path / "model"))
    done = subprocess.run(
        [*command, "recommend", "--checkpoint", checkpoint, "--data", str(prepared)]
        + ["--output", str(tmp_path / "recs"), "--top-k", "5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert lines[0] == f"loaded {checkpoint} (epoch 1)", done.stderr
    assert not [ln for ln in lines[1:] if "core_worker.cc" not in ln], done.stderr
