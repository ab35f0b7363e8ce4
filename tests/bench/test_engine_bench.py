"""`python -m bench.engine` end to end at the tiny size on a CPU: both loops run, the table and
the JSON have every row. Nothing is timed against a target: CPU numbers of a tiny model mean
nothing for a GPU."""

from pathlib import Path

import pytest

pytest.importorskip("qwen_tts", reason="needs the engine extra")

from bench.engine import main, table
from bench.report import read_json

pytestmark = pytest.mark.engine


def test_tiny_run_writes_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "engine.json"
    args = "--size tiny --device cpu --batch 1,3 --frames 4 --prompt 8 --warmup 1 --repeats 1"

    main([*args.split(), "--out", str(out)])

    results = read_json(out)
    rows = results["sizes"]["tiny"]
    assert [(row["batch"], row["frames"]) for row in rows] == [(1, 4), (3, 4)]
    for row in rows:
        for loop in ("stock", "fast"):
            assert row[loop]["seconds"] > 0
            assert row[loop]["ms_per_frame"] == pytest.approx(1000 * row[loop]["seconds"] / 4)
        assert row["speedup"] == pytest.approx(row["stock"]["seconds"] / row["fast"]["seconds"])
    printed = capsys.readouterr().out
    assert table(results) in printed
    assert printed.count("| tiny |") == 4
