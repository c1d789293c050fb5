import random

import pytest
import torch

from asft_ray.data import c4_documents, resolve_data_dir, sample_calibration, wikitext2_rows
from asft_ray.errors import AsftError


def test_wikitext_rows_follow_the_hf_convention(data_dir):
    """Through `datasets`, rows equal the papers' reading of the raw file: blank lines become ""."""
    path = f"{data_dir}/wikitext-2-raw/test.txt"
    expected = [line if line.strip() else "" for line in open(path, encoding="utf-8")]
    rows = wikitext2_rows("test", data_dir)
    assert rows == expected
    assert len(rows) == 4358 and rows[1] == " = Robert Boulter = \n"


def reference_get_c4(documents, tokenizer, nsamples, seqlen, seed):
    """The loop of the Wanda/SparseGPT reference `get_c4`, with the global `random` module."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(documents) - 1)
            enc = tokenizer(documents[i], return_tensors="pt").input_ids
            if enc.shape[1] > seqlen:
                break
        i = random.randint(0, enc.shape[1] - seqlen - 1)
        out.append(enc[:, i : i + seqlen])
    return torch.cat(out)


def test_calibration_sampler_draws_what_the_reference_draws(data_dir):
    from tests.conftest import build_tokenizer

    tokenizer = build_tokenizer()
    docs = c4_documents(data_dir)
    assert len(docs) == 1000 and docs[0].startswith("Beginners BBQ Class")
    mine = sample_calibration(docs, tokenizer, nsamples=6, seqlen=512, seed=0)
    assert mine.shape == (6, 512)
    assert torch.equal(mine, reference_get_c4(docs, tokenizer, 6, 512, 0))
    assert not torch.equal(mine, sample_calibration(docs, tokenizer, nsamples=6, seqlen=512, seed=1))


def test_calibration_with_no_long_enough_document_is_a_clear_error():
    from tests.conftest import build_tokenizer

    with pytest.raises(AsftError, match="more than seqlen"):
        sample_calibration(["short text"] * 3, build_tokenizer(), nsamples=1, seqlen=64)


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("ASFT_DATA_DIR", raising=False)
    assert resolve_data_dir(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_data_dir("hub") == "hub"
    monkeypatch.setenv("ASFT_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == str(tmp_path.resolve())
    with pytest.raises(AsftError, match="does not exist"):
        resolve_data_dir(str(tmp_path / "missing"))


def test_a_data_dir_without_the_files_names_the_missing_file(tmp_path):
    with pytest.raises(AsftError, match="wikitext-2-raw/test.txt is missing"):
        wikitext2_rows("test", str(tmp_path))
