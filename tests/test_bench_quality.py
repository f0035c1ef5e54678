"""The quality benchmark: equal read-outs for every method, the calibrated choice as headline, a
verdict by the noise, resumable; and the cache benchmark's ratio."""

import json

import pytest
from rich.console import Console

from gendd_deploy.bench.quality import run_cache_ratio, run_quality, summarise, verdict

pytestmark = pytest.mark.usefixtures("one_thread")

# a small calibration grid keeps the tiny run short; the choice rule is the real one
CHEAP = ("distill.epochs=1", "calibrate.steps=[1]", "calibrate.draws=[1]", "calibrate.guidance=[1.0]", "calibrate.runtime='torch'")


def test_labelled_setting_gives_every_method_the_same_readouts_and_a_verdict(tiny_context, tmp_path):
    mk = lambda ov: tiny_context(*CHEAP, *ov)  # noqa: E731
    out = tmp_path / "q.json"
    result = run_quality(mk, [0], out, Console(quiet=True), settings=["labelled"])
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["rows"] and saved["partial"] is False
    by = {}
    for r in saved["rows"]:
        by.setdefault(r["method"], set()).add(r["readout"])
    assert set(by) == {"ce", "kd", "gendd"}
    for method in ("ce", "kd"):
        assert by[method] == {"calibrated", "own", "fit_ce", "fit_ridge"}
    assert by["gendd"] == {"calibrated", "own", "fit_ce", "fit_ridge", "fit_sampler", "ddim0", "published", "published_floored"}
    # every student trains for the same total epochs (gendd: stage 1 + gendd) and is scored on all test images
    assert len({r["total_epochs"] for r in saved["rows"]}) == 1
    assert all(0 <= r["mean"] <= 100 and r["values"] for r in saved["rows"])
    # the calibrated read-out is the one calibrate chose, scored on the test images
    for run in saved["runs"]:
        assert run["chosen"] and run["sampler"].split("/")[1] == "sampler"
        if run["chosen"].startswith("linear "):
            assert run["readouts"]["calibrated"] == pytest.approx(run["readouts"][run["chosen"].split()[1]], abs=1e-6)
    [v] = saved["verdicts"]
    assert v["setting"] == "labelled" and v["verdict"].startswith("tie") and v["rival"] in ("ce", "kd")


def test_headline_is_the_calibrated_choice_not_the_test_maximum():
    runs = [
        {"setting": "labelled", "method": m, "seed": s, "total_epochs": 3, "readouts": ro}
        for s in (0, 1, 2)
        for m, ro in (
            ("kd", {"calibrated": 88.0 + s / 10, "own": 87.0, "fit_ce": 90.0 + s / 10}),  # calibrate chose a head below kd's test maximum
            ("ce", {"calibrated": 87.0 + s / 10, "own": 87.0, "fit_ce": 87.1}),
            ("gendd", {"calibrated": 89.0 + s / 10 + (0.01 if s == 1 else 0.0), "fit_ce": 89.5, "ddim0": 91.0}),
        )
    ]
    rows, verdicts = summarise(runs)
    kd = {r["readout"]: r for r in rows if r["method"] == "kd"}
    assert kd["calibrated"]["mean"] == pytest.approx(88.1) and kd["fit_ce"]["mean"] > kd["calibrated"]["mean"]
    [v] = verdicts
    # gendd vs kd (the best plain method by its calibrated student), paired: +1.0 each seed
    assert v["rival"] == "kd" and v["gendd"] == [89.0, 89.11, 89.2] and v["rival_values"] == [88.0, 88.1, 88.2]
    assert v["diff_mean"] == pytest.approx(1.0, abs=0.01) and v["verdict"] == "GenDD ahead"


def test_verdict_is_a_tie_inside_the_noise_and_behind_outside_it():
    assert verdict("s", 3, {0: 90.0, 1: 88.0, 2: 91.0}, {0: 89.0, 1: 89.0, 2: 89.5}, "kd")["verdict"] == "tie"
    assert verdict("s", 3, {0: 88.0, 1: 88.1, 2: 88.2}, {0: 89.0, 1: 89.2, 2: 89.1}, "kd")["verdict"] == "GenDD behind"
    assert verdict("s", 3, {0: 95.0}, {0: 80.0}, "kd")["verdict"].startswith("tie (one seed")


class _StopAfterFirstStudent(Console):
    """The bench prints one line per finished student: stop (as Ctrl-C would) at the first."""

    def print(self, *args, **kwargs):
        if args and "seed" in str(args[0]):
            raise KeyboardInterrupt
        return super().print(*args, **kwargs)


def test_a_stopped_bench_resumes_without_retraining(tiny_context, tmp_path):
    mk = lambda ov: tiny_context(*CHEAP, *ov)  # noqa: E731
    out = tmp_path / "q.json"
    with pytest.raises(KeyboardInterrupt):
        run_quality(mk, [0], out, _StopAfterFirstStudent(quiet=True), settings=["labelled"])
    first = json.loads(out.read_text())
    assert first["partial"] is True and len(first["runs"]) == 1  # written after the first student
    store = tiny_context().store
    [student] = store.list(stage="student")
    created = student.manifest["created"]
    result = run_quality(mk, [0], out, Console(quiet=True), settings=["labelled"])
    assert result["runs"][0]["student"] == first["runs"][0]["student"] == student.ref
    again = next(a for a in store.list(stage="student") if a.ref == student.ref)
    assert again.manifest["created"] == created  # reused, not retrained
    assert len(store.list(stage="student")) == 3 and result["partial"] is False


def test_cache_benchmark_ratio(tiny_context, tmp_path):
    mk = lambda ov: tiny_context(*ov)  # noqa: E731
    result = run_cache_ratio(mk, ["kd"], 1, tmp_path / "c.json", Console(quiet=True))
    row = result["rows"][0]
    assert row["ratio"] > 0 and row["cached_s_per_epoch"] > 0 and row["online_s_per_epoch"] > 0
