"""Hub ids ("owner/name") resolved through a fake Hugging Face cache: refs/main -> a commit,
snapshots/<commit>/ holding relative symlinks into blobs/, as the hub client lays it out."""

import fnmatch
import hashlib
import os
import shutil
import socket
import sys

import jax
import numpy as np
import pytest
from flax import nnx

import gptoss_jax as gj
from gptoss_jax import hub
from gptoss_jax.checkpoint import find_checkpoint
from gptoss_jax.cli import main
from tests import factory

REPO = "openai/gpt-oss-20b"
COMMIT = "6cee5e81ee83917806bbde320786a8fb61efebee"

# the files of the real openai/gpt-oss-20b repo
REAL_REPO_FILES = (
    ".gitattributes",
    "LICENSE",
    "README.md",
    "USAGE_POLICY",
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model-00000-of-00002.safetensors",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "original/config.json",
    "original/dtypes.json",
    "original/model.safetensors",
    "metal/model.bin",
)


def _repo_files(src) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(src):
        out += [os.path.relpath(os.path.join(dirpath, n), src) for n in names]
    return sorted(out)


def add_snapshot(cache, repo_id, src, commit=COMMIT, *, files=None, main_ref=True) -> str:
    """Put the files of folder `src` into the cache as the hub does: content-addressed blobs and a
    snapshot of relative symlinks; refs/main names the commit."""
    folder = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(folder, "snapshots", commit)
    for rel in files if files is not None else _repo_files(src):
        data = open(os.path.join(src, rel), "rb").read()
        blob = os.path.join(folder, "blobs", hashlib.sha256(data).hexdigest())
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        with open(blob, "wb") as f:
            f.write(data)
        link = os.path.join(snap, rel)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    if main_ref:
        os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
        with open(os.path.join(folder, "refs", "main"), "w") as f:
            f.write(commit)
    return snap


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty hub cache in HF_HUB_CACHE, the working directory moved away from any folder named
    like an id, and every way to the network recorded and refused."""
    c = tmp_path / "hf_cache"
    c.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def refuse_download(*args, **kwargs):
        calls.append(("snapshot_download", args, kwargs))
        raise AssertionError("no download expected")

    def refuse_connect(self, *args, **kwargs):
        calls.append(("connect", args))
        raise AssertionError("no network expected")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse_download)
    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
    return {"dir": str(c), "work": work, "calls": calls}


@pytest.fixture(scope="module")
def remote_repo(tmp_path_factory, tiny_cfg):
    """What the hub repo holds: the HF layout with a tokenizer.json, original/ beside it, and a
    metal/ file; original/ holds other weights (seed 1) so a load of the wrong layout shows."""
    from gptoss_jax.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("remote") / "repo"
    t = factory.original_to_hf(factory.original_tensors(tiny_cfg, 0), tiny_cfg)
    factory.write_hf(str(root), t, factory.hf_config_dict(tiny_cfg, mxfp4=True))
    factory.write_original(str(root / "original"), tiny_cfg, seed=1)
    (root / "metal").mkdir()
    (root / "metal" / "model.bin").write_bytes(b"\0" * 16)
    tok = train_bpe(["hello world, what is 2 + 2? the answer is 4."] * 4, vocab_size=300)
    tok.hf.save(str(root / "tokenizer.json"))
    return root


def _leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model))]


def _same_weights(a, b) -> bool:
    la, lb = _leaves(a), _leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))


# ------------------------------------------------------------------------------- cache layout
def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == str(tmp_path / "home" / ".cache" / "huggingface" / "hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hfhome"))
    assert hub.cache_dir() == str(tmp_path / "hfhome" / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub.cache_dir() == str(tmp_path / "c")
    assert hub.repo_folder(REPO) == str(tmp_path / "c" / "models--openai--gpt-oss-20b")


def test_repo_id_shapes():
    assert hub.is_repo_id("openai/gpt-oss-20b") and hub.is_repo_id("a_b/c.d-1")
    for text in ("gpt-oss-20b", "./gpt-oss-20b", "/abs/path", "a/b/c", "../x", "a/..", "a/", "/a", "o200k_harmony"):
        assert not hub.is_repo_id(text), text


# ------------------------------------------------------------------------- loading from the cache
def test_load_by_id_matches_the_folder(cache, remote_repo, hf_mxfp4_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the cache alone must answer
    # a stale snapshot (other weights) beside the one refs/main names
    stale = tmp_path / "stale"
    factory.write_original(str(stale / "original"), gj.tiny(), seed=2)
    add_snapshot(cache["dir"], REPO, stale, "0" * 40, main_ref=False)
    snap = add_snapshot(cache["dir"], REPO, remote_repo)
    assert os.path.islink(os.path.join(snap, "config.json"))  # the fixture lays out links

    ck = find_checkpoint(REPO)
    assert ck.layout == "hf" and ck.root == snap
    by_id, by_folder = gj.load(REPO, dtype="float32"), gj.load(hf_mxfp4_dir, dtype="float32")
    assert _same_weights(by_id, by_folder)
    # control: original/ holds other weights, so the comparison can fail
    assert not _same_weights(gj.load(os.path.join(snap, "original"), dtype="float32"), by_folder)

    tok = gj.load_tokenizer(REPO)
    assert tok.vocab_size == gj.load_tokenizer(str(remote_repo / "tokenizer.json")).vocab_size
    assert tok.vocab_size < 1000  # the repo's own small tokenizer, not o200k_harmony
    assert cache["calls"] == []


def test_original_only_snapshot_is_used_as_is(cache, remote_repo):
    files = [f for f in _repo_files(remote_repo) if f.startswith("original/")]
    snap = add_snapshot(cache["dir"], REPO, remote_repo, files=files)
    ck = find_checkpoint(REPO)
    assert ck.layout == "original" and ck.root == os.path.join(snap, "original")
    assert cache["calls"] == []  # usable as it is: nothing downloaded, even though it could be


def test_local_folder_named_like_an_id_wins(cache, remote_repo, original_dir):
    add_snapshot(cache["dir"], REPO, remote_repo)
    local = cache["work"] / "openai" / "gpt-oss-20b"
    shutil.copytree(original_dir, local / "original")
    ck = find_checkpoint(REPO)
    assert ck.layout == "original" and os.path.abspath(ck.root) == str(local / "original")
    shutil.rmtree(cache["work"] / "openai")  # control: without the folder the cache answers
    assert find_checkpoint(REPO).layout == "hf"
    assert cache["calls"] == []


def test_generate_by_id_through_the_cli(cache, remote_repo, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    add_snapshot(cache["dir"], REPO, remote_repo)
    assert (
        main(["generate", REPO, "--raw", "--prompt", "hello world", "--max-new-tokens", "2", "--dtype", "float32"]) == 0
    )
    assert "error" not in capsys.readouterr().err
    assert cache["calls"] == []


# ------------------------------------------------------------------------ nothing to be found
def test_missing_id_offline_is_one_cli_line(cache, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["generate", REPO, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("gptoss generate: error: openai/gpt-oss-20b")
    assert os.path.join(cache["dir"], "models--openai--gpt-oss-20b") in err
    assert "HF_HUB_OFFLINE" in err and "hf download openai/gpt-oss-20b" in err
    assert cache["calls"] == []
    with pytest.raises(OSError):
        gj.load(REPO)
    with pytest.raises(gj.CheckpointError, match="models--openai--gpt-oss-20b"):
        gj.load_tokenizer(REPO)


def test_incomplete_snapshot_offline(cache, remote_repo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = add_snapshot(cache["dir"], REPO, remote_repo)
    assert find_checkpoint(REPO).root == snap
    os.remove(os.path.realpath(os.path.join(snap, "model-00001-of-00002.safetensors")))  # a lost blob
    with pytest.raises(hub.HubError, match="is incomplete; HF_HUB_OFFLINE"):
        find_checkpoint(REPO)
    assert cache["calls"] == []


def test_without_huggingface_hub_nothing_is_attempted(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(hub.HubError, match="huggingface_hub is not installed") as e:
        gj.load(REPO)
    assert isinstance(e.value, OSError) and isinstance(e.value, gj.CheckpointError)
    assert hub.repo_folder(REPO) in str(e.value)
    assert cache["calls"] == []


def test_a_path_that_is_no_id_keeps_its_error(cache):
    with pytest.raises(gj.CheckpointError, match="checkpoint directory not found: no_such_folder"):
        find_checkpoint("no_such_folder")
    assert cache["calls"] == []


# ------------------------------------------------------------------------------- downloading
class FakeHub:
    """snapshot_download over a local 'remote' folder, filtering files the way the hub does
    (fnmatch on the path in the repo, allow then ignore) and writing the cache layout."""

    def __init__(self, remote):
        self.remote, self.calls = remote, []

    @staticmethod
    def select(files, allow, ignore):
        allow = [allow] if isinstance(allow, str) else allow
        ignore = [ignore] if isinstance(ignore, str) else (ignore or [])
        return [
            f
            for f in files
            if (allow is None or any(fnmatch.fnmatchcase(f, p) for p in allow))
            and not any(fnmatch.fnmatchcase(f, p) for p in ignore)
        ]

    def __call__(self, repo_id, *, cache_dir=None, allow_patterns=None, ignore_patterns=None, **kwargs):
        self.calls.append(
            dict(
                repo_id=repo_id,
                cache_dir=cache_dir,
                allow_patterns=allow_patterns,
                ignore_patterns=ignore_patterns,
                **kwargs,
            )
        )
        files = self.select(_repo_files(self.remote), allow_patterns, ignore_patterns)
        return add_snapshot(cache_dir, repo_id, self.remote, files=files)


def test_download_fetches_the_hf_layout_only(cache, remote_repo, hf_mxfp4_dir, monkeypatch):
    import huggingface_hub

    fake = FakeHub(remote_repo)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    model = gj.load(REPO, dtype="float32")
    assert len(fake.calls) == 1
    call = fake.calls[0]
    assert call["repo_id"] == REPO and call["cache_dir"] == cache["dir"]
    # on the real repo's file list: every HF layout file, nothing of original/ or metal/
    got = set(fake.select(REAL_REPO_FILES, call["allow_patterns"], call["ignore_patterns"]))
    assert not any(f.startswith(("original/", "metal/")) for f in got)
    assert {
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "model-00000-of-00002.safetensors",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    } <= got
    # the allow patterns alone, too, stay out of original/ (so the ignore list is a second guard)
    assert not any(f.startswith("original/") for f in fake.select(REAL_REPO_FILES, call["allow_patterns"], None))
    snap = hub.cached_snapshot(REPO)
    assert not os.path.exists(os.path.join(snap, "original"))
    assert _same_weights(model, gj.load(hf_mxfp4_dir, dtype="float32"))
    # now cached: no second download, for the weights or the tokenizer
    find_checkpoint(REPO)
    assert gj.load_tokenizer(REPO).vocab_size < 1000
    assert len(fake.calls) == 1 and cache["calls"] == []


def test_tokenizer_download_fetches_no_weights(cache, remote_repo, monkeypatch):
    import huggingface_hub

    fake = FakeHub(remote_repo)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    tok = gj.load_tokenizer(REPO)
    assert tok.vocab_size == gj.load_tokenizer(str(remote_repo / "tokenizer.json")).vocab_size
    got = fake.select(REAL_REPO_FILES, fake.calls[0]["allow_patterns"], fake.calls[0]["ignore_patterns"])
    assert "tokenizer.json" in got and not any(f.endswith((".safetensors", ".bin")) for f in got)


def test_offline_env_blocks_the_download(cache, remote_repo, monkeypatch):
    import huggingface_hub

    fake = FakeHub(remote_repo)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE"):
        find_checkpoint(REPO)
    assert fake.calls == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # control: the same call downloads when allowed
    assert find_checkpoint(REPO).layout == "hf" and len(fake.calls) == 1


def test_failed_download_is_one_line(cache, monkeypatch, capsys):
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise ConnectionError("could not reach huggingface.co\nmore detail\nand more")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    assert main(["generate", REPO, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "ConnectionError: could not reach huggingface.co)" in err
    assert os.path.join(cache["dir"], "models--openai--gpt-oss-20b") in err
