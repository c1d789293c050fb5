"""Calibration and evaluation text, loaded through the `datasets` library.

The data dir is, in order: the explicit setting (`--data-dir`), `$ASFT_DATA_DIR`,
`../shared/data` beside this checkout, else the Hugging Face hub (needs the network).
The literal value `hub` forces the hub.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from asft_ray.errors import AsftError

HUB = "hub"
WIKITEXT_FILES = {"test": "wikitext-2-raw/test.txt", "valid": "wikitext-2-raw/valid.txt"}
C4_FILE = "c4/c4-train.00000-of-01024.first1000.jsonl"
_REPO_ROOT = Path(__file__).resolve().parents[1]


def resolve_data_dir(setting: str | None = None) -> str:
    """Return a data folder path, or `hub`. A folder that was asked for but is missing is an error."""
    if setting is None:
        setting = os.environ.get("ASFT_DATA_DIR") or None
    if setting == HUB:
        return HUB
    if setting is not None:
        folder = Path(setting).expanduser()
        if not folder.is_dir():
            raise AsftError(f"data dir {setting!r} does not exist (set --data-dir or ASFT_DATA_DIR, or 'hub')")
        return str(folder.resolve())
    for folder in (_REPO_ROOT.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if folder.is_dir():
            return str(folder.resolve())
    return HUB


def _local_file(data_dir: str, relative: str) -> str:
    path = Path(data_dir) / relative
    if not path.is_file():
        raise AsftError(f"data file {path} is missing (data dir {data_dir})")
    return str(path)


def _hub(loader, what: str):
    try:
        return loader()
    except Exception as err:  # datasets raises many kinds when offline
        raise AsftError(f"could not load {what} from the hub ({type(err).__name__}); set --data-dir") from err


def wikitext2_rows(split: str = "test", data_dir: str | None = None) -> list[str]:
    """WikiText-2 raw rows exactly as the HF `wikitext-2-raw-v1` split has them (blank lines -> "")."""
    from datasets import load_dataset

    if split not in WIKITEXT_FILES:
        raise AsftError(f"unknown wikitext2 split {split!r}: use test or valid")
    data_dir = resolve_data_dir(data_dir)
    if data_dir == HUB:
        hub_split = {"test": "test", "valid": "validation"}[split]
        ds = _hub(lambda: load_dataset("wikitext", "wikitext-2-raw-v1", split=hub_split), "wikitext2")
        return list(ds["text"])
    rows = _local_texts("text", _local_file(data_dir, WIKITEXT_FILES[split]), keep_linebreaks=True)
    return [row if row.strip() else "" for row in rows]


def wikitext2_ids(tokenizer, split: str = "test", data_dir: str | None = None) -> torch.Tensor:
    """The whole split as one token sequence, shape [1, T]: rows joined with "\\n\\n", tokenized once."""
    text = "\n\n".join(wikitext2_rows(split, data_dir))
    return tokenizer(text, return_tensors="pt").input_ids


def c4_documents(data_dir: str | None = None) -> list[str]:
    """The C4 documents calibration draws from (the first shard the papers use)."""
    from datasets import load_dataset

    data_dir = resolve_data_dir(data_dir)
    if data_dir == HUB:
        files = {"train": "en/c4-train.00000-of-01024.json.gz"}
        ds = _hub(lambda: load_dataset("allenai/c4", data_files=files, split="train"), "c4")
        return list(ds["text"])
    return _local_texts("json", _local_file(data_dir, C4_FILE))


def _local_texts(builder: str, path: str, **options) -> list[str]:
    """The `text` column of a local file read by `datasets` (`text` or `json` lines); a file that is
    empty, malformed, truncated mid-record or without a `text` field is one clear line."""
    import datasets

    if Path(path).stat().st_size == 0:
        raise AsftError(f"data file {path} is empty")
    kind = {"json": "JSON lines", "text": "text"}[builder]
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a local file reads in a moment; its bar would only clutter stderr
    try:
        ds = datasets.load_dataset(builder, data_files={"train": path}, split="train", **options)
    except Exception as err:  # datasets wraps the parser's error in several kinds
        cause = err.__cause__ or err
        reason = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
        raise AsftError(f"data file {path} could not be read as {kind}: {reason}") from err
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    if "text" not in ds.column_names:
        raise AsftError(f"data file {path} has no `text` field (fields: {', '.join(ds.column_names) or 'none'})")
    texts = ds["text"]
    if not any(isinstance(t, str) and t.strip() for t in texts):
        raise AsftError(f"data file {path} holds no text")
    if not all(isinstance(t, str) for t in texts):
        raise AsftError(f"data file {path}: every `text` value must be a string")
    return list(texts)


def sample_calibration(documents: list[str], tokenizer, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Random windows as the SparseGPT/Wanda reference draws them; returns token ids [nsamples, seqlen].

    Repeat: pick a random document until one has more than `seqlen` tokens, then a random
    window inside it. Same random stream as `random.seed(seed)` in the reference code.
    """
    rng = random.Random(seed)
    token_cache: dict[int, list[int]] = {}

    def tokens(i: int) -> list[int]:
        if i not in token_cache:
            token_cache[i] = tokenizer(documents[i]).input_ids
        return token_cache[i]

    if not any(len(tokens(i)) > seqlen for i in range(len(documents))):
        raise AsftError(f"no calibration document has more than seqlen={seqlen} tokens; use a smaller --seqlen")
    windows = []
    for _ in range(nsamples):
        while True:
            doc = tokens(rng.randint(0, len(documents) - 1))
            if len(doc) > seqlen:
                break
        start = rng.randint(0, len(doc) - seqlen - 1)
        windows.append(doc[start : start + seqlen])
    return torch.tensor(windows, dtype=torch.long)
