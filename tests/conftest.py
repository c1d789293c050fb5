"""Shared fixtures: a tiny random-init Llama with a small BPE tokenizer (fast, offline).

Tiny models test mechanics only; quality claims come from benchmarks on the real model.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny models' matmuls are too small to gain from a second thread, and on a busy machine each
# parallel region waits for a second core: two test_schedules cases on this 2-vCPU VM at load 3
# took 21-23 s with 2 threads, 2.5-3 s with 1 (not measured idle). Ray actors and subprocesses
# choose their own thread counts.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def build_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (SHARED_DATA / "wikitext-2-raw" / "valid.txt").read_text(encoding="utf-8")[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="Ġ", model_max_length=10**9)


def build_tiny_llama(vocab_size: int = 512, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.config.use_cache = False
    return model.eval()


@pytest.fixture(scope="session", autouse=True)
def session_cache_dir(tmp_path_factory):
    """asft-ray's cache (machine cost models) in a folder of the test session's, never the user's:
    what processes started by module or session fixtures (Ray clusters) inherit."""
    os.environ["ASFT_CACHE_DIR"] = str(tmp_path_factory.mktemp("asft-cache"))


@pytest.fixture(autouse=True)
def own_cache_dir(session_cache_dir, tmp_path_factory, monkeypatch):
    """And one per test, so that no test reads a cost model another test calibrated (or faked)."""
    monkeypatch.setenv("ASFT_CACHE_DIR", str(tmp_path_factory.mktemp("asft-cache")))


@pytest.fixture(scope="session")
def data_dir() -> str:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return str(SHARED_DATA)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, data_dir) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    model = build_tiny_llama(vocab_size=len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def sharded_model_dir(tmp_path_factory, request):
    """A 3-layer tiny Llama saved in several safetensors shards, layers split across them. Tied:
    lm_head is the embedding. Untied: streaming leaves lm_head on meta and copies it at the end."""
    folder = tmp_path_factory.mktemp("sharded")
    tokenizer = build_tokenizer()
    model = build_tiny_llama(vocab_size=len(tokenizer), num_hidden_layers=3, tie_word_embeddings=request.param)
    model.save_pretrained(folder, max_shard_size="200KB")
    tokenizer.save_pretrained(folder)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


@pytest.fixture
def streamed_live_bytes(monkeypatch) -> list[tuple[int, int]]:
    """[(layer index, bytes of the model's non-meta parameters)], recorded right after every
    StreamedLayers.load and .release of the test: what a layer-streamed run holds at those points."""
    from asft_ray.pruning import streaming

    seen = []
    original_init, original_load, original_release = (streaming.StreamedLayers.__init__, streaming.StreamedLayers.load,
                                                       streaming.StreamedLayers.release)

    def init(self, model, reader, out_dir, *args, **kwargs):
        original_init(self, model, reader, out_dir, *args, **kwargs)
        self.model = model

    def checking(original):
        def wrapped(self, index, layer):
            original(self, index, layer)
            seen.append((index, sum(p.numel() * p.element_size() for p in self.model.parameters() if not p.is_meta)))
        return wrapped

    monkeypatch.setattr(streaming.StreamedLayers, "__init__", init)
    monkeypatch.setattr(streaming.StreamedLayers, "load", checking(original_load))
    monkeypatch.setattr(streaming.StreamedLayers, "release", checking(original_release))
    return seen


def one_layer_bytes(model) -> int:
    """The bound a layer-streamed run stays under: one decoder layer plus the final norm."""
    from asft_ray.models import decoder_layers

    parts = [*decoder_layers(model)[0].parameters(), *model.model.norm.parameters()]
    return sum(p.numel() * p.element_size() for p in parts)


@pytest.fixture(scope="module")
def local_ray():
    """A private 2-CPU Ray cluster for one test module."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def scoring_pool(local_ray):
    """Scoring actors shared by one module's tests (tests/workers.py)."""
    from tests.workers import ScoringPool

    pool = ScoringPool()
    yield pool
    pool.stop()


@pytest.fixture
def tiny_model():
    return build_tiny_llama()


@pytest.fixture
def calib_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 512, (4, 64), generator=g)
