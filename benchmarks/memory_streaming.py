"""Peak memory per process while pruning a model far larger than that limit, with layer streaming.

Builds a random-init Llama (default ~1.57 B parameters, 6.3 GB of fp32 weights) from a config
and saves it as safetensors shards, then prunes it with Wanda, `--stream` and 2 scoring
workers through the same Ray path as `asft prune`. A sampler records the peak RSS of every
process (driver, Ray's pruning coordinator and scoring actors). Finally the output is
reloaded with transformers and its sparsity measured. Appends a JSON line to
benchmarks/results/memory.jsonl.

    python benchmarks/memory_streaming.py                   # the 1.5 B run (needs ~14 GB of disk)
    python benchmarks/memory_streaming.py --hidden 256 --intermediate 512 --layers 4   # smoke
"""

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from results_io import append_row

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.conftest's tokenizer builder


class PeakRss:
    """Polls this process and all its descendants; keeps each one's peak RSS and name."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s, self.peaks, self.names = interval_s, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            for proc in [me, *me.children(recursive=True)]:
                try:
                    rss = proc.memory_info().rss
                    self.names.setdefault(proc.pid, " ".join(proc.cmdline())[:80] or proc.name())
                    name = proc.name()
                    if name.startswith("ray::"):
                        self.names[proc.pid] = name
                    self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), rss)
                except psutil.Error:
                    pass
            time.sleep(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def build_model(folder: Path, hidden: int, intermediate: int, layers: int, vocab: int) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import build_tokenizer

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 128),
                         num_key_value_heads=max(1, hidden // 128), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder, max_shard_size="1GB")
    del model
    build_tokenizer(vocab_size=min(vocab, 8000)).save_pretrained(folder)
    return params


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--workdir", default="runs/memory-bench")
    opts = parser.parse_args()
    work = Path(opts.workdir)
    shutil.rmtree(work, ignore_errors=True)
    src, out = work / "model", work / "pruned"
    t = time.perf_counter()
    params = build_model(src, opts.hidden, opts.intermediate, opts.layers, opts.vocab)
    build_s = time.perf_counter() - t
    weight_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))

    from asft_ray.config import PruneConfig
    from asft_ray.distributed.runner import prune_on_ray

    cfg = PruneConfig(model=str(src), method="wanda", sparsity=0.5, nsamples=opts.nsamples, seqlen=opts.seqlen,
                      out=str(out), stream=True, workers=2, worker_cpus=1, device="cpu")
    t = time.perf_counter()
    with PeakRss() as rss:
        record = prune_on_ray(cfg, show_progress=False)
    prune_s = time.perf_counter() - t

    from transformers import AutoModelForCausalLM

    from asft_ray.eval.sparsity import model_sparsity

    reloaded = model_sparsity(AutoModelForCausalLM.from_pretrained(out))["total"]
    by_role = {}
    for pid, peak in rss.peaks.items():
        name = rss.names.get(pid, "?")
        role = "driver" if pid == psutil.Process().pid else name
        by_role[f"{role} [{pid}]"] = peak
    top = dict(sorted(by_role.items(), key=lambda kv: -kv[1])[:8])
    append_row("memory_streaming", {
        "params": params, "weight_bytes": weight_bytes, "build_s": build_s, "prune_s": prune_s,
        "nsamples": opts.nsamples, "seqlen": opts.seqlen, "workers": 2,
        "peak_rss_bytes": top, "max_peak_fraction_of_weights": max(by_role.values()) / weight_bytes,
        "sparsity_reported": record["sparsity"]["total"], "sparsity_reloaded": reloaded,
    })


if __name__ == "__main__":
    main()
