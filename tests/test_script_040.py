"""The issue's "done when": a script written against recsys-recoder 0.4.0's public API
(tests/recoder040_script.py, checked to run on 0.4.0 itself) runs on recoder_dist with only the
import path changed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("recoder040_script.py")


def _ported_script(tmp_path) -> object:
    """The script with ``recoder`` replaced by ``recoder_dist`` in its imports, and nothing
    else, loaded as a module."""
    lines = SCRIPT.read_text().splitlines(keepends=True)
    ported = []
    for line in lines:
        if line.startswith(("from recoder.", "from recoder import", "        from recoder.")):
            line = line.replace("from recoder", "from recoder_dist", 1)
        ported.append(line)
    changed = [a for a, b in zip(lines, ported) if a != b]
    assert changed and all("import" in line for line in changed)
    path = tmp_path / "recoder_dist_script.py"
    path.write_text("".join(ported))
    spec = importlib.util.spec_from_file_location("recoder_dist_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def in_process(monkeypatch, ray_session):
    """The script names no num_workers (0.4.0 has none); pin its Recoder to this process so
    that no Ray Train worker group starts."""
    from recoder_dist.model import Recoder

    monkeypatch.setattr(Recoder, "workers", property(lambda self: 0))


def test_script_written_for_recoder040_runs(tmp_path, in_process, capsys):
    _ported_script(tmp_path).main(annoy=False)
    print(capsys.readouterr().out)


def test_script_written_for_recoder040_runs_with_annoy(tmp_path, in_process):
    pytest.importorskip(
        "annoy", reason="annoy is an optional extra: pip install recoder-dist[annoy]"
    )
    _ported_script(tmp_path).main(annoy=True)
