"""The benchmark entry point runs a tiny subset and writes JSON, Markdown and PNG."""

import json

from benchmarks import _common
from benchmarks.__main__ import main


def _committed_tables():
    return {p.name: p.read_bytes() for p in sorted(_common.COMMITTED.iterdir())}


def test_quick_costate_suite_writes_results(tmp_path, monkeypatch):
    """By default results go to ./adjoint-bench in the working directory; the committed
    tables are left untouched."""
    before = _committed_tables()
    monkeypatch.chdir(tmp_path)
    assert main(["--quick", "--only", "costate"]) == 0
    assert _committed_tables() == before
    tmp_path = tmp_path / "adjoint-bench"
    data = json.loads((tmp_path / "costate_quick.json").read_text())
    assert data["metadata"]["jax"] and data["sizes"]["width"] == 64
    for row in data["timings"]:
        assert row["costate_s"] > 0 and row["jax_grad_s"] > 0 and row["forward_s"] > 0
        assert row["costate_over_jax_grad"] == row["costate_s"] / row["jax_grad_s"]
    assert {r["layout"] for r in data["compile"]} == {"tuple", "stacked"}
    assert "costate/jax.grad" in (tmp_path / "costate_quick.md").read_text()
    assert (tmp_path / "costate_quick.png").read_bytes()[:4] == b"\x89PNG"
    assert "Benchmark summary" in (tmp_path / "summary_quick.md").read_text()
