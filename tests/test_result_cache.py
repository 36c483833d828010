"""One on-disk format for finished results: reuse only under an equal key, old files still read."""

import json
import os

import pytest

from satm_jax.experiment import configs, pipeline, result_cache
from tests.helpers import read_json, tiny_overrides


def test_a_result_is_reused_only_under_an_equal_key(tmp_path):
    p = str(tmp_path / "r.json")
    assert result_cache.load(p, {"a": 1}) is None  # absent
    result_cache.store(p, {"a": (1, 2)}, {"accs": [1.0, 2.0]})
    assert read_json(p) == {"key": {"a": [1, 2]}, "complete": True, "accs": [1.0, 2.0]}
    assert result_cache.load(p, {"a": (1, 2)}) == {"accs": [1.0, 2.0]}  # tuples as stored
    assert result_cache.load(p, {"a": (1, 3)}) is None


@pytest.mark.parametrize(
    "content",
    ['{"key": {"a": 1}, "accs": [1.0', '{"key": {"a": 1}, "accs": [1.0]}', "[1, 2]", ""],
    ids=["truncated", "incomplete", "not_an_object", "empty"],
)
def test_unreadable_or_unfinished_files_are_computed_again(tmp_path, content):
    p = tmp_path / "r.json"
    p.write_text(content)
    assert result_cache.load(str(p), {"a": 1}) is None


def test_reserved_fields_cannot_be_overwritten_by_a_payload(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        result_cache.store(str(tmp_path / "r.json"), {"a": 1}, {"complete": False})


def test_old_files_are_read_through_the_legacy_reader(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"k": 1, "accs": [3.0]}))
    legacy = lambda d: ({"k": d["k"]}, {"accs": d["accs"]}) if "k" in d else None  # noqa: E731
    assert result_cache.load(str(p), {"k": 1}, legacy=legacy) == {"accs": [3.0]}
    assert result_cache.load(str(p), {"k": 2}, legacy=legacy) is None
    assert result_cache.load(str(p), {"k": 1}) is None  # without a reader: not reused


@pytest.mark.slow
def test_a_workdir_of_the_old_format_is_reused_without_recomputing(tmp_path, digits):
    # Runs and baselines finished before the common format: rewrite the files in the old
    # layout, run again, and nothing is computed (same rows, "reused" logged for each).
    over = tiny_overrides()
    cfg = configs.make_run_config("digits", 1, "mtt", overrides=over)
    wd = str(tmp_path)
    first = pipeline.train_and_evaluate([cfg], wd, dataset=digits, progress=False, log=[].append)
    rpath = os.path.join(wd, "runs", cfg.name, "result.json")
    new = read_json(rpath)
    old_run = {
        "config": new["key"]["config"],
        "rows": new["rows"],
        "ood": None,
        "flatness": None,
        "complete": True,
    }
    with open(rpath, "w") as f:
        json.dump(old_run, f)
    for name in os.listdir(os.path.join(wd, "baselines")):
        bpath = os.path.join(wd, "baselines", name)
        doc = read_json(bpath)
        with open(bpath, "w") as f:
            json.dump({"key": doc["key"], "accs": doc["accs"]}, f)
    logs = []
    again = pipeline.train_and_evaluate([cfg], wd, dataset=digits, progress=False, log=logs.append)
    assert [r["accs"] for r in again["results"]] == [r["accs"] for r in first["results"]]
    assert sum("reused from" in m for m in logs) == 3, logs  # random, the run, full
    assert not any("distilling" in m for m in logs)
