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
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from results_io import append_row

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.conftest's tokenizer builder


def _status_kb(pid: int) -> dict:
    """RssAnon (private), RssFile (mapped files) and RssShmem (shared memory: Ray's object store) in kB,
    and VmHWM: the kernel's own peak RSS of the process (no sampling interval can miss it)."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key.startswith("Rss") or key == "VmHWM":
                values[key] = int(rest.split()[0])
    return values


def system_shmem_bytes() -> int:
    """Shared memory in use on this machine (/proc/meminfo Shmem): Ray's object store pages, counted once."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Polls this process and all its descendants; keeps each one's peak RSS (sampled, and the kernel's
    VmHWM), name and CPU seconds (user + system, as last seen: up to one interval short for a process
    that ends), and the machine's shared memory above its level at the start (`shmem_peak`: the
    object store's pages, counted once)."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s, self.peaks, self.names, self.parts, self.cpu_s = interval_s, {}, {}, {}, {}
        self.hwm: dict[int, int] = {}
        self.shmem_start, self.shmem_peak = system_shmem_bytes(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            for proc in [me, *me.children(recursive=True)]:
                try:
                    rss = proc.memory_info().rss
                    parts = _status_kb(proc.pid)
                    for part in ("RssAnon", "RssFile", "RssShmem"):
                        key = (proc.pid, part)
                        self.parts[key] = max(self.parts.get(key, 0), parts.get(part, 0) * 1024)
                    self.hwm[proc.pid] = max(self.hwm.get(proc.pid, 0), parts.get("VmHWM", 0) * 1024)
                    self.names.setdefault(proc.pid, " ".join(proc.cmdline())[:80] or proc.name())
                    name = proc.name()
                    if name.startswith("ray::"):
                        self.names[proc.pid] = name
                    self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), rss)
                    cpu = proc.cpu_times()
                    self.cpu_s[proc.pid] = cpu.user + cpu.system
                except psutil.Error:
                    pass
            self.shmem_peak = max(self.shmem_peak, system_shmem_bytes() - self.shmem_start)
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


def add_model_shape_args(parser: argparse.ArgumentParser) -> None:
    """The random-init Llama's shape (default: the 1.57 B-parameter model of the large-model benchmarks)."""
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--vocab", type=int, default=32000)


def main():
    parser = argparse.ArgumentParser()
    add_model_shape_args(parser)
    parser.add_argument("--nsamples", type=int, default=8, help="8 = two chunks of 4: both workers score")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--workdir", default="runs/memory-bench")
    parser.add_argument("--object-store-gb", type=float, default=1.0,
                        help="Ray object store size (ASFT_OBJECT_STORE_GB); its shared pages count in each process's RSS")
    parser.add_argument("--reuse-model", action="store_true", help="keep an already built source model")
    opts = parser.parse_args()
    os.environ["ASFT_OBJECT_STORE_GB"] = str(opts.object_store_gb)
    work = Path(opts.workdir)
    src, out = work / "model", work / "pruned"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    if opts.reuse_model and (src / "config.json").exists():
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(src)
        params = (2 * c.vocab_size * c.hidden_size + c.num_hidden_layers * (
            4 * c.hidden_size**2 + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size) + c.hidden_size)
    else:
        shutil.rmtree(work, ignore_errors=True)
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
    by_role, parts = {}, {}
    for pid, peak in rss.peaks.items():
        name = rss.names.get(pid, "?")
        role = f'{"driver" if pid == psutil.Process().pid else name} [{pid}]'
        by_role[role] = peak
        parts[role] = {p: rss.parts.get((pid, p), 0) for p in ("RssAnon", "RssFile", "RssShmem")}
    top = dict(sorted(by_role.items(), key=lambda kv: -kv[1])[:8])
    append_row("memory_streaming", {
        "params": params, "weight_bytes": weight_bytes, "build_s": build_s, "prune_s": prune_s,
        "nsamples": opts.nsamples, "seqlen": opts.seqlen, "workers": 2, "object_store_gb": opts.object_store_gb,
        "peak_rss_bytes": top, "peak_parts_bytes": {k: parts[k] for k in top},
        "max_peak_fraction_of_weights": max(by_role.values()) / weight_bytes,
        "max_private_fraction_of_weights": max(p["RssAnon"] for p in parts.values()) / weight_bytes,
        "sparsity_reported": record["sparsity"]["total"], "sparsity_reloaded": reloaded,
    })


if __name__ == "__main__":
    main()
