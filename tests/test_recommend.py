"""The recommendation: the cheapest candidate within the quality tolerance, or the dense model and why."""

import pytest

from asft_ray.errors import AsftError
from asft_ray.report.recommend import Tolerance, candidate_row, recommend

DENSE = {"ppl": 20.0, "zeroshot": {"mean_acc": 0.50},
         "speed": {"decode_tok_s": 100.0, "decode_tok_s_all": [98.0, 100.0, 102.0]}}


def model(ppl, tok_s, spread=1.0, acc=0.5):
    return {"ppl": ppl, "zeroshot": {"mean_acc": acc},
            "speed": {"decode_tok_s": tok_s, "decode_tok_s_all": [tok_s - spread, tok_s, tok_s + spread]}}


def rows(models, tolerance=Tolerance(), price=None):
    return [candidate_row(name, f"{name}/", m, DENSE, tolerance, price) for name, m in [("dense", DENSE), *models]]


def test_the_cheapest_candidate_within_the_tolerance_is_recommended():
    cands = rows([("small", model(28.0, 125.0)), ("smaller", model(29.9, 160.0)), ("tiny", model(31.0, 250.0))],
                 price=0.36)
    out = recommend(cands, Tolerance(max_ppl_ratio=1.5), 20.0)
    assert out["recommended"]["name"] == "smaller"  # tiny is cheaper but 31.0 > 1.5 x 20
    assert out["recommended"]["relative_cost"] == pytest.approx(100 / 160)
    assert out["recommended"]["cost_per_million"] == pytest.approx(0.36 / (160 * 3600) * 1e6)
    assert "37.5 % lower cost" in out["verdict"]
    assert [c["meets_tolerance"] for c in cands] == [True, True, True, False]


def test_overlapping_speeds_are_not_a_saving_and_the_dense_model_stays():
    cands = rows([("pruned", model(21.0, 103.0, spread=3.0))])  # 100..106 overlaps 98..102
    out = recommend(cands, Tolerance(), 20.0)
    assert out["recommended"] is None and cands[1]["measurably_cheaper"] is False
    assert out["verdict"].startswith("Keep the dense model: no candidate is measurably cheaper")


def test_no_candidate_within_the_tolerance_is_said_plainly():
    out = recommend(rows([("pruned", model(45.0, 200.0))]), Tolerance(max_ppl_ratio=2.0), 20.0)
    assert out["recommended"] is None
    assert "no candidate meets the tolerance (test ppl at most 2 x dense (40.00))" in out["verdict"]


def test_an_accuracy_tolerance_rules_out_a_candidate_that_loses_too_many_points():
    tol = Tolerance(max_ppl_ratio=2.0, max_accuracy_drop=0.02)
    cands = rows([("a", model(25.0, 150.0, acc=0.47)), ("b", model(26.0, 140.0, acc=0.49))], tol)
    assert recommend(cands, tol, 20.0)["recommended"]["name"] == "b"


@pytest.mark.parametrize("tol", [Tolerance(max_ppl_ratio=0.9), Tolerance(max_accuracy_drop=1.5)])
def test_impossible_tolerances_are_refused(tol):
    with pytest.raises(AsftError):
        tol.check()


@pytest.mark.parametrize("pruned_int8_ppl, chosen", [(29.0, "pruned+int8"), (31.0, "dense+int8")])
def test_int8_copies_compete_with_the_float_models_and_are_marked(tmp_path, pruned_int8_ppl, chosen):
    """The pipeline's candidates with int8 copies: the cheapest within the tolerance wins whether
    it is int8 or not, and its path is the int8 folder in the run, marked as one."""
    from asft_ray.export.int8 import MANIFEST
    from asft_ray.pipeline import RunConfig, recommendation

    for source in ("dense", "pruned"):
        (tmp_path / "int8" / source).mkdir(parents=True)
        (tmp_path / "int8" / source / MANIFEST).write_text("{}")
    models = {"dense": DENSE, "pruned": model(29.0, 110.0), "dense+int8": model(20.1, 250.0),
              "pruned+int8": model(pruned_int8_ppl, 300.0)}
    paths = {"dense": "smollm2-135m", "pruned": str(tmp_path / "prune" / "model"),
             "dense+int8": str(tmp_path / "int8" / "dense"), "pruned+int8": str(tmp_path / "int8" / "pruned")}
    cfg = RunConfig(model="smollm2-135m", out=str(tmp_path), price_per_hour=0.36)
    out = recommendation(cfg, tmp_path, models, paths)
    assert [c["int8"] for c in out["candidates"]] == [False, False, True, True]
    best = out["recommended"]
    assert best["name"] == chosen and best["path"] == "int8/" + chosen.split("+")[0] and best["int8"]
    assert best["cost_per_million"] == pytest.approx(0.36 / ((300.0 if chosen == "pruned+int8" else 250.0) * 3600) * 1e6)
