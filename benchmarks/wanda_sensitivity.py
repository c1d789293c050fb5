"""How sensitive is one-shot Wanda on SmolLM2-135M to float rounding in its statistics?

Runs Wanda (32 x 2048 C4 windows per calibration seed) twice in one process: with asft-ray's
float64 sums, and with the reference code's float32 running mean of ||x||^2
(WrappedGPT.add_batch), then evaluates the first 16 WikiText-2 test windows. The masks can
only differ through rounding, so the ppl gap measures how much rounding alone moves the
result; several calibration seeds show how large that is next to the seed-to-seed spread.

    python benchmarks/wanda_sensitivity.py [--pattern 2:4] [--seeds 0 1 2 3]

Rows already in results/wanda_sensitivity.jsonl (same pattern, seed, variant) are skipped.
"""

import argparse
import copy

import torch
from results_io import append_row, read_rows, window_ppl

from asft_ray.config import Pattern
from asft_ray.data import c4_documents, sample_calibration, wikitext2_ids
from asft_ray.eval.perplexity import perplexity
from asft_ray.models import load_model
from asft_ray.pruning import stats as stats_module
from asft_ray.pruning.engine import LocalRunner, prune_model


def reference_float32_add(self, name, x):
    """WrappedGPT.add_batch: scaler_row *= n/(n+1); n += 1; scaler_row += ||x_j||^2 / n (float32)."""
    self.source.setdefault(name, name)
    x = x.detach().reshape(-1, x.shape[-1]).float()
    n = self.sq_norms.get(name + "#n", 0)
    row = self.sq_norms.get(name, torch.zeros(x.shape[-1]))
    row = row * (n / (n + 1)) + torch.norm(x.t(), p=2, dim=1) ** 2 / (n + 1)
    self.sq_norms[name], self.sq_norms[name + "#n"] = row, n + 1


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration sampler seeds")
    args = parser.parse_args()
    torch.set_num_threads(2)
    done = {(r["pattern"], r.get("seed", 0), r["variant"]) for r in read_rows("wanda_sensitivity")}
    model, tok = load_model("smollm2-135m", device="cpu", show_progress=False)
    ids = wikitext2_ids(tok)
    documents = c4_documents()
    dense = copy.deepcopy(model.state_dict())
    float64_add = stats_module.LayerInputStats.add
    pattern = Pattern.parse(args.pattern)
    for seed in args.seeds:
        calib = sample_calibration(documents, tok, 32, 2048, seed)
        for variant, add in (("float64-sums", float64_add), ("reference-float32-running-mean", reference_float32_add)):
            if (args.pattern, seed, variant) in done:
                continue
            model.load_state_dict(dense)
            stats_module.LayerInputStats.add = add
            # one chunk holding every sample: the statistics are accumulated sample by sample, as in the reference
            prune_model(model, "wanda", pattern, 0.5, calib, show_progress=False,
                        make_runner=lambda *a: LocalRunner(*a, chunk_size=len(calib)))
            nll = perplexity(model, ids, 2048, max_windows=16, show_progress=False)["window_nll"]
            append_row("wanda_sensitivity", {"pattern": args.pattern, "seed": seed, "variant": variant, "nsamples": 32,
                                             "ppl_16w": window_ppl(nll), "ppl_8w": window_ppl(nll[:8])})


if __name__ == "__main__":
    main()
