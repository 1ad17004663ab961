"""Locating data files: explicit paths, LLAMA_EDU_DATA, ../shared/data, the cache, clear errors."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------
# Downloads: a local http.server stands in for the public originals
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def server(tmp_path, monkeypatch):
    """A folder served on 127.0.0.1; the cache and the search folders point into tmp_path."""
    import functools
    import http.server
    import threading

    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # quiet
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "search_dirs", lambda: [tmp_path / "nowhere", data.cache_dir()])
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _sms_zip(path, member: str, text: bytes) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("readme", "SMS Spam Collection v.1\n")
        z.writestr(member, text)


def _known(monkeypatch, name: str, **changes) -> data.DataFile:
    import dataclasses

    info = dataclasses.replace(data.KNOWN_FILES[name], **changes)
    monkeypatch.setitem(data.KNOWN_FILES, name, info)
    return info


SMS = b"ham\tGo until jurong point, crazy..\nspam\tFree entry in 2 a wkly comp to win FA Cup final tkts\n"


def test_the_sms_collection_comes_from_the_uci_zip():
    info = data.KNOWN_FILES["sms_spam_collection.tsv"]
    assert info.url == "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
    assert info.member == "SMSSpamCollection"


def test_every_shared_file_has_its_readme_sha256():
    """The sha256s the locator checks downloads against are those of the shared README."""
    readme = data.REPO_ROOT.parent / "shared" / "data" / "README.md"
    if not readme.is_file():
        pytest.skip(f"no {readme} on this machine")
    text = readme.read_text(encoding="utf-8")
    for name, info in data.KNOWN_FILES.items():
        assert f"`{name}`" in text and info.sha256 in text, name


def test_a_zip_original_is_downloaded_unpacked_and_verified(server, monkeypatch):
    root, url = server
    _sms_zip(root / "sms+spam+collection.zip", "SMSSpamCollection", SMS)
    _known(monkeypatch, "sms_spam_collection.tsv", url=f"{url}/sms+spam+collection.zip",
           sha256=hashlib.sha256(SMS).hexdigest())
    path = data.find_data_file("sms_spam_collection.tsv")
    assert path == data.cache_dir() / "sms_spam_collection.tsv" and path.read_bytes() == SMS
    assert sorted(p.name for p in data.cache_dir().iterdir()) == ["sms_spam_collection.tsv"]  # no .part left
    (root / "sms+spam+collection.zip").unlink()  # found in the cache now, without the network
    assert data.find_data_file("sms_spam_collection.tsv") == path


def test_a_plain_download_is_verified(server, monkeypatch):
    root, url = server
    (root / "input.txt").write_bytes(b"First Citizen:\n")
    _known(monkeypatch, "tinyshakespeare.txt", url=f"{url}/input.txt", sha256=hashlib.sha256(b"First Citizen:\n").hexdigest())
    assert data.find_data_file("tinyshakespeare.txt").read_bytes() == b"First Citizen:\n"


@pytest.mark.parametrize("served", ["wrong-bytes", "no-member", "not-a-zip", "missing"])
def test_a_bad_download_is_refused_and_not_left_behind(server, monkeypatch, served):
    root, url = server
    if served == "wrong-bytes":
        _sms_zip(root / "sms.zip", "SMSSpamCollection", SMS + b"ham\ttampered\n")
    elif served == "no-member":
        _sms_zip(root / "sms.zip", "OtherFile", SMS)
    elif served == "not-a-zip":
        (root / "sms.zip").write_bytes(SMS)
    _known(monkeypatch, "sms_spam_collection.tsv", url=f"{url}/sms.zip", sha256=hashlib.sha256(SMS).hexdigest())
    expected = {"wrong-bytes": "sha256 is", "no-member": "not a zip archive holding SMSSpamCollection",
                "not-a-zip": "not a zip archive", "missing": "404"}[served]
    with pytest.raises(data.DataFileNotFound, match=expected) as err:
        data.find_data_file("sms_spam_collection.tsv")
    assert "Put the file at one of" in str(err.value) and f"{url}/sms.zip" in err.value.summary()
    cache = data.cache_dir()
    assert not cache.exists() or list(cache.iterdir()) == []  # neither the file nor a temporary


def test_offline_the_error_says_where_the_file_comes_from(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "search_dirs", lambda: [tmp_path / "nowhere"])
    _known(monkeypatch, "tinyshakespeare.txt", url="http://127.0.0.1:9/input.txt")  # a closed port: offline
    with pytest.raises(data.DataFileNotFound) as err:
        data.find_data_file("tinyshakespeare.txt")
    assert err.value.name == "tinyshakespeare.txt" and err.value.source == "http://127.0.0.1:9/input.txt"
    assert isinstance(err.value, FileNotFoundError)
    # The skip line a test prints names a README section: it must be one (it once named none).
    section = re.search(r"see the README, section '([^']+)'", err.value.summary()).group(1)
    assert f"\n## {section}\n" in (data.REPO_ROOT / "README.md").read_text()
    with pytest.raises(FileNotFoundError, match="training text nope.txt not found"):
        data.find_input_file("nope.txt", "training text")


def test_train_data_names_are_found_like_the_notebooks_find_them(tmp_path, monkeypatch):
    """`train --data tinyshakespeare.txt` (the README's command) from any working directory."""
    shared = data.find_data_file("tinyshakespeare.txt", download=False)
    monkeypatch.chdir(tmp_path)
    assert data.find_input_file("tinyshakespeare.txt") == shared
    (tmp_path / "tinyshakespeare.txt").write_text("mine\n")  # a file of that name here wins
    assert data.find_input_file("tinyshakespeare.txt") == Path("tinyshakespeare.txt")
