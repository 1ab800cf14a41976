"""`raydistill sweep` without training: the runs it plans and the headline figures it computes."""

from __future__ import annotations

import pytest

from raydistill.config import SweepConfig, build_config
from raydistill.errors import ConfigError
from raydistill.models.students import student_parameters
from raydistill.recipes.sweep import Run, ladder, sweep_runs, train_config
from raydistill.recipes.sweep_report import results_markdown, summarize, write_results

TRAIN = {"seq_len": 32, "micro_batch_size": 2, "steps": 4, "warmup_steps": 1, "log_every": 2, "num_workers": 2,
         "zero_stage": 1, "lr": 0.003}
VOCAB = 4096
QWEN = {"family": "qwen2", "hidden": 96, "layers": 2, "heads": 4, "kv_heads": 2}


def test_plan_covers_every_baseline_and_the_second_seed():
    cfg = SweepConfig(shards="s", output="o", sizes=["small", "micro", "tiny"], train=TRAIN)
    runs = sweep_runs(cfg, VOCAB)
    assert runs[:6] == [Run("kd", "micro", 0), Run("ce", "micro", 0), Run("online_kd", "micro", 0),
                        Run("kd", "micro", 1), Run("ce", "micro", 1), Run("online_kd", "micro", 1)]
    # smallest first, both seeds, online KD there only
    assert {(r.kind, r.size) for r in runs[6:]} == {("kd", "tiny"), ("ce", "tiny"), ("kd", "small"), ("ce", "small")}
    assert len({r.name for r in runs}) == len(runs)


def test_a_mixed_ladder_runs_smallest_first_by_parameters(tmp_path):
    from raydistill.models.sizes import build_llama

    build_llama(vocab_size=VOCAB, hidden=64, layers=4, heads=4).save_pretrained(tmp_path / "teacher")
    sizes = ["small", QWEN, {"teacher_fraction": {"depth": 0.25}}, "micro", {"size": "tiny", "name": "tiny-2"},
             {"family": "llama", "hidden": 128, "layers": 2, "heads": 4, "name": "like-small"}]
    cfg = SweepConfig(shards="s", output="o", sizes=sizes, seeds=[0], online_kd_sizes=["like-small"], train=TRAIN)
    students = ladder(cfg)
    assert list(students) == ["small", "qwen2-h96-l2", "teacher-d0.25", "micro", "tiny-2", "like-small"]
    runs = sweep_runs(cfg, VOCAB, teacher=str(tmp_path / "teacher"))
    order = list(dict.fromkeys(r.size for r in runs))
    params = [student_parameters(students[name], VOCAB, teacher=str(tmp_path / "teacher")) for name in order]
    assert params == sorted(params) and order[0] == "micro" and order.index("small") < order.index("like-small")
    assert [r.name for r in runs if r.kind == "online_kd"] == ["like-small-online_kd-s0"]  # an equal, listed later
    assert len({r.name for r in runs}) == len(runs)
    student = train_config(cfg, Run("kd", "qwen2-h96-l2", 0), None).student
    assert student.kind == "shape" and student.kv_heads == 2 and "name" not in student.model_dump()


def test_a_teacher_fraction_in_a_sweep_uses_the_sweeps_teacher():
    cfg = SweepConfig(shards="s", output="o", sizes=[{"teacher_fraction": {"depth": 0.5}}], teacher="/t", train=TRAIN)
    assert train_config(cfg, Run("kd", "teacher-d0.5", 0), None).student.teacher_fraction.teacher == "/t"


def test_ladder_names_are_unique_and_online_kd_names_them():
    with pytest.raises(ConfigError, match=r"sizes\[2\]: a second student named 'qwen2-h96-l2'; give one of them "
                                          r"another `name:`"):
        ladder(SweepConfig(shards="s", output="o", sizes=["micro", QWEN, {**QWEN, "intermediate": 64}]))
    assert list(ladder(SweepConfig(shards="s", output="o", sizes=[QWEN, {**QWEN, "name": "q2"}]))) == [
        "qwen2-h96-l2", "q2"]
    with pytest.raises(ConfigError, match=r"online_kd_sizes: no student named 'small' in sizes; the names are micro"):
        sweep_runs(SweepConfig(shards="s", output="o", sizes=["micro"], online_kd_sizes=["small"]), VOCAB)
    with pytest.raises(Exception, match=r"sizes\.0\.name"):
        SweepConfig(shards="s", output="o", sizes=[{"size": "micro", "name": "a/b"}])


def test_sweep_config_errors():
    with pytest.raises(ConfigError, match="sizes: huge: unknown student size 'huge'"):  # checked as the runs are listed
        sweep_runs(SweepConfig(shards="s", output="o", sizes=["huge"]), VOCAB)
    with pytest.raises(ConfigError, match=r"^sizes: llama-h500-l2: student\.hidden 500 is not divisible by "
                                          r"student\.heads 8"):
        sweep_runs(SweepConfig(shards="s", output="o", sizes=["micro", {"family": "llama", "hidden": 500,
                                                                        "layers": 2, "heads": 8}]), VOCAB)
    with pytest.raises(ConfigError, match=r"^sizes: micro: seq_len 1024 is longer than the student's 512 positions"):
        sweep_runs(SweepConfig(shards="s", output="o", sizes=["micro"], train={"seq_len": 1024}), VOCAB)
    with pytest.raises(Exception, match=r"train\.seed is set by the sweep"):
        SweepConfig(shards="s", output="o", train={"seed": 3})
    with pytest.raises(ConfigError, match=r"unknown key 'train\.stepz'"):  # train is typed: RunSettings
        build_config(SweepConfig, {"shards": "s", "output": "o", "train": {"stepz": 3}}, "for sweep")


def test_summary_figures_from_rows():
    rows = [{"kind": k, "size": s, "seed": seed, "params": p, "loss": loss}
            for k, s, seed, p, loss in [("kd", "micro", 0, 10, 5.0), ("kd", "micro", 1, 10, 5.02),
                                        ("ce", "micro", 0, 10, 5.3), ("ce", "micro", 1, 10, 5.25),
                                        ("online_kd", "micro", 0, 10, 4.9), ("kd", "tiny", 0, 30, 4.8),
                                        ("ce", "tiny", 0, 30, 4.82)]]
    out = summarize(rows, "micro", [0, 1])
    assert out["sizes"] == [10, 30] and out["kd_loss"] == [5.0, 4.8] and out["ce_loss"] == [5.3, 4.82]
    assert out["seed_spread"] == pytest.approx(0.05)  # the larger of the KD and CE seed gaps
    assert out["kd_beats_ce_all_sizes"] is False  # tiny: 0.02 is inside the seed noise
    assert out["retention_vs_online_kd"] == pytest.approx((5.3 - 5.0) / (5.3 - 4.9), abs=1e-4)  # only seed 0 has all
    rows.append({"kind": "online_kd", "size": "micro", "seed": 1, "params": 10, "loss": 4.95})
    out = summarize(rows, "micro", [0, 1])
    assert out["retention_per_seed"] == [pytest.approx(0.3 / 0.4, abs=1e-4), pytest.approx(0.23 / 0.3, abs=1e-4)]
    assert out["retention_vs_online_kd"] == pytest.approx((5.275 - 5.01) / (5.275 - 4.925), abs=1e-4)  # seed means
    assert out["seed_spread"] == pytest.approx(0.05)  # online KD's gap between seeds (0.05) counts too
    assert out["online_kd_gain"] == pytest.approx(0.35) and out["online_gain_over_3x_spread"] is True
    rows[-1]["loss"] = 5.05  # online KD at seed 1 now 0.15 from seed 0: its gain (0.2) is under 3x that noise
    out = summarize(rows, "micro", [0, 1])
    assert out["seed_spread"] == pytest.approx(0.15) and out["online_gain_over_3x_spread"] is False


def test_summary_and_table_name_students_of_any_shape():
    rows = [{"run": f"{s}-{k}-s0", "kind": k, "size": s, "seed": 0, "params": p, "tokens": 64, "wall_s": 1.0,
             "loss": loss, "perplexity": 2.0, "agreement": None, "ece": 0.01}
            for s, p in (("teacher-d0.5", 900), ("qwen2-h96-l2", 300)) for k, loss in (("kd", 4.0), ("ce", 4.2))]
    out = summarize(rows, "qwen2-h96-l2", [0])
    assert out["size_names"] == ["qwen2-h96-l2", "teacher-d0.5"] and out["sizes"] == [300, 900]
    assert "| teacher-d0.5-kd-s0 | sparse offline KD | 900 |" in results_markdown(rows, {}, out)


def test_results_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def rows(loss: float) -> list[dict]:
        return [{"run": f"micro-{k}-s0", "kind": k, "size": "micro", "seed": 0, "params": 10, "tokens": 64,
                 "wall_s": 1.0, "loss": loss, "perplexity": 2.0, "agreement": None, "ece": 0.01}
                for k in ("kd", "ce")]

    write_results(str(tmp_path), rows(5.0), {}, {"run": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"results.csv", "results.md", "loss_vs_params.png", "training_curves.png", "summary.json"}

    real_savefig, calls = Figure.savefig, []

    def savefig(self, fname, **kwargs):  # the second plot gets half its bytes out, then the process dies
        calls.append(fname)
        if len(calls) == 2:
            fname.write(b"\x89PNG half")
            raise RuntimeError("killed")
        return real_savefig(self, fname, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    with pytest.raises(RuntimeError, match="killed"):
        write_results(str(tmp_path), rows(4.0), {}, {"run": 2})
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(after) == set(before)  # no temporaries, no partial file under a final name
    assert after["training_curves.png"] == before["training_curves.png"]  # the earlier complete version
    assert after["summary.json"] == before["summary.json"]  # written last, so still the earlier sweep's
    assert after["results.csv"] != before["results.csv"] and b"4.0" in after["results.csv"]
