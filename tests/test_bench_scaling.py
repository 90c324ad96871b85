"""The scaling benchmark draws its four plots (docs/benchmarks.md shows them)."""

from __future__ import annotations

from benchmarks import bench_scaling  # needs matplotlib (the dev extra): fails loudly without


def test_draw_writes_one_png_per_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_scaling, "PLOTS", tmp_path)
    two = {"a": [(2, 1.0), (4, 2.0)], "b": [(2, 0.5), (4, 0.7)]}
    run_length = {
        "store write per step (ms)": [(10_000, 0.1), (30_000, 0.1)],
        "store bytes per step (KB)": [(10_000, 1.6), (30_000, 1.6)],
        "dashboard cold refresh (s)": [(10_000, 0.06), (30_000, 0.1)],
        "dashboard live refresh, +100 steps (s)": [(10_000, 0.05), (30_000, 0.05)],
    }
    bench_scaling._draw(
        {"penalties": two, "input_size": two, "metrics": two, "run_length": run_length}
    )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        f"scaling_{n}.png" for n in ("input_size", "metrics", "penalties", "run_length")
    ]
    for path in tmp_path.iterdir():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
