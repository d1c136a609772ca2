"""How joining a cluster and unexpected errors end: one line of clipbatch's, without a traceback."""

from __future__ import annotations

import pytest
import ray
from ray._private.utils import check_version_info

from clipbatch.cli import main
from clipbatch.pipeline.session import version_mismatch


def test_a_version_mismatch_is_one_line_with_both_versions():
    """Ray's own check, given a cluster of another version, and its several lines made one."""
    with pytest.raises(RuntimeError) as raised:
        check_version_info({"ray_version": "2.9.3", "python_version": "3.10.12"}, "this machine",
                           raise_on_mismatch=True)
    line = version_mismatch("10.0.0.1:6379", str(raised.value))
    assert "\n" not in line and line.startswith("the Ray cluster at 10.0.0.1:6379 runs Ray 2.9.3 on Python 3.10.12")
    assert f"this machine Ray {ray.__version__} on Python" in line and "ray[data]==2.9.3" in line


def test_an_unexpected_error_is_one_line_unless_debug(tmp_path, capsys):
    (tmp_path / "_manifest.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("clipbatch: error: JSONDecodeError: ") and "--debug" in err[0]
    with pytest.raises(ValueError):
        main(["report", str(tmp_path), "--debug"])
