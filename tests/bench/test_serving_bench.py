"""`python -m bench.serving` end to end on the tiny model on a CPU (the CI smoke): both modes
run at every concurrency, every request returns audio, the table, JSON and plot are written,
and the run ends with the summary line. Nothing is timed against a target here."""

from pathlib import Path

import pytest

pytest.importorskip("qwen_tts", reason="needs the engine extra")

from bench.report import read_json
from bench.serving import MODES, main, table

pytestmark = pytest.mark.engine


def test_tiny_run_measures_both_modes_at_each_concurrency(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "serving.json"

    main(["--device", "cpu", "--concurrency", "1,2", "--rounds", "2", "--voices", "2",
          "--out", str(out)])  # fmt: skip

    results = read_json(out)
    levels = results["levels"]
    assert [level["concurrency"] for level in levels] == [1, 2]
    for level in levels:
        for mode in MODES:
            measured = level[mode]
            assert measured["requests"] == 2 * level["concurrency"]
            assert measured["audio_seconds"] > 0
            assert measured["latency_p50"] <= measured["latency_p95"]
            assert 0 < measured["first_frame_p50"] <= measured["latency_p95"]
        assert level["speedup"] == pytest.approx(
            level["batched"]["audio_seconds_per_second"]
            / level["serial"]["audio_seconds_per_second"]
        )
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    assert table(results) in printed
    assert printed.rstrip().endswith("serving: concurrency=8 batched/serial=n/a")
