"""Cost per million generated tokens from a price per machine-hour and measured decode speed."""

from __future__ import annotations


def cost_per_million(price_per_hour: float, tokens_per_s: float) -> float:
    """Dollars (or whatever the price is in) to generate 1e6 tokens at `tokens_per_s` on one machine."""
    return price_per_hour / (tokens_per_s * 3600.0) * 1e6


def cost_lines(price_per_hour: float | None, dense_speed: dict | None, final_speed: dict | None) -> dict:
    """{"headline": one sentence, "lines": [...]} — says plainly when the cost cannot be computed."""
    if not dense_speed or not final_speed:
        return {"headline": "Cost not computed: speed was not measured.", "lines": ["cost not computed: no speed measurement"]}
    dense_tps, final_tps = dense_speed["decode_tok_s"], final_speed["decode_tok_s"]
    change = final_tps / dense_tps - 1
    speed_line = (f"decode speed {dense_tps:.1f}{_predicted(dense_speed)} → {final_tps:.1f}{_predicted(final_speed)} "
                  f"tokens/s ({100 * change:+.1f} %, same machine, same run)")
    noisy = within_noise(dense_speed, final_speed)
    noise = ""
    if noisy and (dense_speed.get("predicted") or final_speed.get("predicted")):
        noise = "the speeds differ by under 5 % and not both were measured, so the difference is not counted"
    elif noisy:
        lo, hi = _spread(dense_speed), _spread(final_speed)
        noise = (f"the repeated measurements overlap (dense {lo[0]:.1f}–{lo[1]:.1f}, final {hi[0]:.1f}–{hi[1]:.1f} "
                 "tokens/s), so the difference is measurement noise")
    if price_per_hour is None:
        return {"headline": "Cost not computed: no price per machine-hour was given.",
                "lines": [speed_line, *([noise] if noise else []),
                          "cost not computed: set price_per_hour in the run config"]}
    if noisy:
        cost = cost_per_million(price_per_hour, dense_tps)
        return {"headline": f"No measurable change in cost per generated token: {noise}; about {cost:.2f} per "
                            f"million tokens for both at {price_per_hour:g} per machine-hour.",
                "lines": [speed_line, noise, "saving: none measured"]}
    dense_cost, final_cost = cost_per_million(price_per_hour, dense_tps), cost_per_million(price_per_hour, final_tps)
    saving = 1 - final_cost / dense_cost
    verdict = (f"It saves {100 * saving:.1f} % of the cost per generated token" if saving > 0.005 else
               f"It costs {100 * -saving:.1f} % more per generated token" if saving < -0.005 else
               "The cost per generated token is unchanged")
    return {
        "headline": f"{verdict}: {final_cost:.2f} vs {dense_cost:.2f} per million tokens at {price_per_hour:g} per machine-hour.",
        "lines": [speed_line, f"cost per million generated tokens: dense {dense_cost:.2f}, final {final_cost:.2f} "
                              f"(at {price_per_hour:g} per machine-hour)", f"saving: {100 * saving:.1f} %"],
    }


def _predicted(speed: dict) -> str:
    """" (predicted)" after a speed the decode-cost model gave (a model too large to load whole)."""
    return " (predicted)" if speed.get("predicted") else ""


def _spread(speed: dict) -> tuple[float, float]:
    values = speed.get("decode_tok_s_all") or [speed["decode_tok_s"]]
    return min(values), max(values)


def within_noise(dense_speed: dict, final_speed: dict) -> bool:
    """True when the two models' repeated decode speeds overlap (or either was measured once)."""
    a, b = _spread(dense_speed), _spread(final_speed)
    if len(dense_speed.get("decode_tok_s_all") or []) < 2 or len(final_speed.get("decode_tok_s_all") or []) < 2:
        return abs(final_speed["decode_tok_s"] / dense_speed["decode_tok_s"] - 1) < 0.05
    return a[0] <= b[1] and b[0] <= a[1]
