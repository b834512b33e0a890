"""bench/profile_kv_growth.py on CPU (tiny checkpoint): one record per added KV group, for two engines."""
from __future__ import annotations

import json
import sys

from bench import profile_kv_growth


def test_every_group_after_the_first_is_timed(demo_tiny_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "demo-tiny").symlink_to(demo_tiny_dir)
    out = tmp_path / "growth.json"
    monkeypatch.setattr(sys, "argv", ["profile_kv_growth.py", "--device", "cpu", "--preset", "tiny", "--slots", "4",
                                      "--max-seq-len", "768", "--work", str(tmp_path), "--json", str(out)])
    profile_kv_growth.main()
    rows = json.loads(out.read_text())
    for engine in (1, 2):
        groups = [r for r in rows if r["engine"] == engine and r["event"] == "group"]
        assert [g["slots"] for g in groups] == [1, 2]  # first group 1 of 4 slots: then 1, then 2
        assert all(g["s"] >= 0 for g in groups)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary) == {"summary", "first_engine", "second_engine_kernels_compiled"}
