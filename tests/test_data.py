"""Locating data files: explicit paths, LLAMA_EDU_DATA, ../shared/data, the cache, clear errors."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from llama_edu import convert
from llama_edu import files as data


def test_shared_files_are_found_and_verified():
    path = data.find_data_file("tinyshakespeare.txt", download=False)
    assert data.sha256_of(path) == data.KNOWN_FILES["tinyshakespeare.txt"].sha256


def test_explicit_path_and_env_var(tmp_path, monkeypatch):
    f = tmp_path / "tinyshakespeare.txt"
    f.write_text("First Citizen:\n")
    assert data.find_data_file("tinyshakespeare.txt", path=f) == f
    with pytest.raises(FileNotFoundError, match="given explicitly"):
        data.find_data_file("tinyshakespeare.txt", path=tmp_path / "nope.txt")
    monkeypatch.setenv("LLAMA_EDU_DATA", str(tmp_path))
    assert data.find_data_file("tinyshakespeare.txt", download=False) == f


def test_missing_file_error_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "search_dirs", lambda: [tmp_path / "a", tmp_path / "b"])
    with pytest.raises(FileNotFoundError, match="LLAMA_EDU_DATA") as err:
        data.find_data_file("sms_spam_collection.tsv")
    assert str(tmp_path / "a" / "sms_spam_collection.tsv") in str(err.value)


def test_stories260k_hf_is_made_from_the_llama2c_file(tmp_path, monkeypatch):
    """On a machine without the shared hf/ copy, the converter makes it from the .bin."""
    shared_bin = data.find_data_file("stories260K/stories260K.bin", download=False)
    shared_hf = data.find_data_file("stories260K/hf", download=False)
    (tmp_path / "src" / "stories260K").mkdir(parents=True)
    shutil.copy(shared_bin, tmp_path / "src" / "stories260K" / "stories260K.bin")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "search_dirs", lambda: [tmp_path / "src", data.cache_dir()])
    with pytest.raises(FileNotFoundError):  # finding never converts ...
        data.find_data_file("stories260K/hf", download=False)
    made = convert.stories260k_hf()  # ... this does, once
    assert made.parent.parent == data.cache_dir()
    ours, ref = load_file(made / "model.safetensors"), load_file(shared_hf / "model.safetensors")
    assert set(ours) <= set(ref)
    for k, v in ours.items():
        assert torch.equal(v, ref[k]), k
