"""README numbers regenerate from results/*.json (DESIGN §5)."""

from __future__ import annotations

import json

from evotok.readme import BLOCK, README, render_readme, renderer


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    blocks = text.split("```")
    assert "make demo" in blocks[1] and "make test" in blocks[1]


def test_readme_blocks_agree_with_results():
    text = README.read_text()
    names = [m.group("name") for m in BLOCK.finditer(text)]
    assert names, "README has no results blocks"
    for name in names:
        renderer(name)  # raises naming a block without a renderer
    assert render_readme(text) == text, "README.md disagrees with results/: run `python -m evotok.readme`"


def test_renderer_reads_the_json(tmp_path):
    (tmp_path / "bench_data.json").write_text(json.dumps({
        "date": "d", "cpu_count": 2,
        "rows": [{"resolution": 32, "images": 10, "seconds": 0.5, "images_per_s": 20.0}],
    }))
    text = "x\n<!-- results:bench_data -->\nold\n<!-- /results:bench_data -->\n"
    out = render_readme(text, tmp_path)
    assert "| 32 px | 10 | 0.50 | 20 |" in out and "old" not in out


def test_sweep_blocks_render_by_prefix_and_an_unknown_block_is_named(tmp_path):
    import pytest

    text = "<!-- results:sweep_nosuch -->\nold\n<!-- /results:sweep_nosuch -->\n"
    assert "record-sweep nosuch" in render_readme(text, tmp_path)  # not recorded: the command that records it
    with pytest.raises(KeyError, match="'bogus'"):
        render_readme("<!-- results:bogus -->\nx\n<!-- /results:bogus -->\n", tmp_path)


def test_recorded_tiny_runs_meet_the_stage_targets():
    """The recorded `evotok pipeline tiny` runs (what the README shows) meet the stage 0/1 targets;
    re-recording a run that misses one fails here."""
    from evotok.readme import RESULTS

    teacher = json.loads((RESULTS / "teacher_tiny.json").read_text())["scalars"]
    assert teacher["zeroshot_shape"] >= 0.9 and teacher["zeroshot_count"] >= 0.9
    tok = json.loads((RESULTS / "tokenizer_evotok_tiny.json").read_text())
    per_depth, lpix, lsem = tok["per_depth"], 4, 16
    assert len(per_depth["psnr"]) == lsem
    assert per_depth["psnr"][lpix - 1] >= 24.0
    assert min(per_depth["usage"]) >= 0.5
    assert per_depth["clipsim_sem"][lsem - 1] - per_depth["clipsim_sem"][0] >= 0.15
    # within the step budget the tiny config records for 10 minutes on a 2-core machine (the schedule counts steps)
    from evotok.config import load_config

    max_steps = load_config("tokenizer/evotok_tiny", stage="tokenizer").trainer.max_steps
    assert tok["step"] <= max_steps == 5600 and tok["curve"][-1]["step"] < max_steps
