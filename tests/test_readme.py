"""The README's quick start runs as written (with an ephemeral metrics port)."""

import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.concurrent

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _quick_start() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quick start") :]
    return re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)


def test_readme_quick_start_runs(tmp_path):
    code = _quick_start()
    assert "port=9464" in code
    script = tmp_path / "quick_start.py"
    script.write_text(code.replace("port=9464", "port=0"))
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert [round(float(v), 4) for v in lines[0].split()] == [6.5, 0.1425, 10.375]
    assert float(lines[-1]) < 0.1, lines[-1]
    assert (tmp_path / "runs" / "quickstart.db").exists()
