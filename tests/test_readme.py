"""README numbers regenerate from results/*.json (DESIGN §5)."""

from __future__ import annotations

import json

from evotok.readme import BLOCK, README, RENDERERS, render_readme


def test_readme_starts_with_the_two_commands():
    text = README.read_text()
    blocks = text.split("```")
    assert "make demo" in blocks[1] and "make test" in blocks[1]


def test_readme_blocks_agree_with_results():
    text = README.read_text()
    names = [m.group("name") for m in BLOCK.finditer(text)]
    assert names, "README has no results blocks"
    assert set(names) <= set(RENDERERS)
    assert render_readme(text) == text, "README.md disagrees with results/: run `python -m evotok.readme`"


def test_renderer_reads_the_json(tmp_path):
    (tmp_path / "bench_data.json").write_text(json.dumps({
        "date": "d", "cpu_count": 2,
        "rows": [{"resolution": 32, "images": 10, "seconds": 0.5, "images_per_s": 20.0}],
    }))
    text = "x\n<!-- results:bench_data -->\nold\n<!-- /results:bench_data -->\n"
    out = render_readme(text, tmp_path)
    assert "| 32 px | 10 | 0.50 | 20 |" in out and "old" not in out
