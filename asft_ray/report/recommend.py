"""Which model to deploy: the cheapest candidate that stays within the user's quality tolerance.

Every candidate (dense, pruned, recovered, ...) comes with its measured test perplexity, its
mean zero-shot accuracy (if measured) and its decode speed, all from the same run on the same
machine. A candidate *meets the tolerance* when its ppl is at most `max_ppl_ratio` x the dense
ppl (and, if `max_accuracy_drop` is set, its mean zero-shot accuracy is at most that many points
below dense). It is *measurably cheaper* when its repeated decode speeds are all above the
dense model's (report.cost.within_noise is false and it is faster). The recommendation is the
cheapest candidate that is both; if none is, the dense model stays and the verdict says why.
A model too large to load whole (eval.whole_model_max_gb) has one decode speed predicted by the
decode-cost model instead of repeated measurements (`speed_predicted`); the verdict says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from asft_ray.report.cost import cost_per_million, within_noise


@dataclass(frozen=True)
class Tolerance:
    """`tolerance:` in a run config: how much quality the user will trade for cost."""

    max_ppl_ratio: float = 1.5  # a candidate's test ppl at most this x the dense model's
    max_accuracy_drop: float | None = None  # mean zero-shot accuracy at most this far below dense (0.02 = 2 points)

    def check(self, source: str = "tolerance") -> None:
        from asft_ray.errors import AsftError

        if self.max_ppl_ratio < 1:
            raise AsftError(f"{source}: max_ppl_ratio must be at least 1, got {self.max_ppl_ratio}")
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop < 1:
            raise AsftError(f"{source}: max_accuracy_drop must be in [0, 1), got {self.max_accuracy_drop}")


def candidate_row(name: str, path: str | None, measured: dict, dense: dict, tolerance: Tolerance,
                  price_per_hour: float | None) -> dict:
    """One candidate as the report shows it: quality, cost relative to dense, and the two tests."""
    speed, dense_speed = measured.get("speed") or {}, dense.get("speed") or {}
    row = {"name": name, "path": path, "ppl": measured.get("ppl"), "mean_acc": (measured.get("zeroshot") or {}).get("mean_acc"),
           "decode_tok_s": speed.get("decode_tok_s")}
    if speed.get("predicted"):  # a model too large to load whole: the decode-cost model's speed
        row["speed_predicted"] = True
    if speed and dense_speed:
        row["relative_cost"] = dense_speed["decode_tok_s"] / speed["decode_tok_s"]  # cost per token, dense = 1
        row["measurably_cheaper"] = (speed["decode_tok_s"] > dense_speed["decode_tok_s"]
                                     and not within_noise(dense_speed, speed))
    else:
        row["relative_cost"], row["measurably_cheaper"] = None, False
    if price_per_hour is not None and speed:
        row["cost_per_million"] = cost_per_million(price_per_hour, speed["decode_tok_s"])
    ppl_ok = row["ppl"] is not None and dense.get("ppl") is not None and row["ppl"] <= tolerance.max_ppl_ratio * dense["ppl"]
    acc_ok = True
    if tolerance.max_accuracy_drop is not None:
        dense_acc = (dense.get("zeroshot") or {}).get("mean_acc")
        acc_ok = row["mean_acc"] is not None and dense_acc is not None and row["mean_acc"] >= dense_acc - tolerance.max_accuracy_drop
    row["meets_tolerance"] = ppl_ok and acc_ok
    return row


def recommend(candidates: list[dict], tolerance: Tolerance, dense_ppl: float) -> dict:
    """{"recommended": the chosen row or None, "verdict": one sentence}; `candidates` from
    candidate_row, the dense model first."""
    bound = f"test ppl at most {tolerance.max_ppl_ratio:g} x dense ({tolerance.max_ppl_ratio * dense_ppl:.2f})"
    if tolerance.max_accuracy_drop is not None:
        bound += f" and mean zero-shot accuracy at most {100 * tolerance.max_accuracy_drop:g} points below dense"
    others = candidates[1:]
    eligible = [c for c in others if c["meets_tolerance"] and c["measurably_cheaper"]]
    if eligible:
        best = min(eligible, key=lambda c: c["relative_cost"])
        predicted = " (predicted by the decode-cost model)" if best.get("speed_predicted") or candidates[0].get(
            "speed_predicted") else ""
        return {"recommended": best,
                "verdict": f"Recommended: {best['name']}, {100 * (1 - best['relative_cost']):.1f} % lower cost per generated "
                           f"token than dense{predicted} within the tolerance ({bound})."}
    cheaper = [c for c in others if c["measurably_cheaper"]]
    if not any(c["meets_tolerance"] for c in others):
        why = "no candidate meets the tolerance"
    elif not cheaper:
        why = "no candidate is measurably cheaper than dense"
    else:
        why = "the candidates that meet the tolerance are not measurably cheaper"
    return {"recommended": None, "verdict": f"Keep the dense model: {why} ({bound})."}
