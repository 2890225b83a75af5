"""Finding checkpoints (folders, hub ids in a local HF cache) and naming dtypes and devices."""

from __future__ import annotations

import pytest
import torch

from longctx.config import ConfigError
from longctx.hub import CheckpointError, hub_cache, resolve_checkpoint, resolve_device, resolve_dtype


def fake_cache(root, repo="meta-llama/Tiny-Llama4", commit="0123abcd" * 5, revision="main"):
    """The layout huggingface_hub writes: models--org--name/{refs/<rev>, snapshots/<commit>/}."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / revision).write_text(commit + "\n")
    (snap / "config.json").write_text("{}")
    return snap


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub").mkdir()
    return tmp_path / "hub"


def test_cache_location_follows_the_environment(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub_cache() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "direct"))
    assert hub_cache() == tmp_path / "direct"


def test_hub_id_resolves_to_the_snapshot_of_its_revision(cache_env):
    snap = fake_cache(cache_env)
    assert resolve_checkpoint("meta-llama/Tiny-Llama4") == snap
    other = fake_cache(cache_env, repo="org/other", commit="f" * 40, revision="v2")
    assert resolve_checkpoint("org/other@v2") == other
    assert resolve_checkpoint(f"org/other@{'f' * 40}") == other  # a commit hash as the revision


def test_missing_hub_id_names_the_cache_folder(cache_env):
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint("meta-llama/Llama-4-Scout-17B-16E-Instruct")
    msg = str(e.value)
    assert str(cache_env / "models--meta-llama--Llama-4-Scout-17B-16E-Instruct") in msg
    assert "huggingface-cli download meta-llama/Llama-4-Scout-17B-16E-Instruct" in msg
    fake_cache(cache_env)
    with pytest.raises(CheckpointError, match=r"Tiny-Llama4@v9: no snapshot .*snapshots there: 0123abcd"):
        resolve_checkpoint("meta-llama/Tiny-Llama4@v9")


def test_missing_folder_and_file_are_told_apart(tmp_path, cache_env):
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint("./models/nope")
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_checkpoint(tmp_path / "f.json")
    with pytest.raises(TypeError, match="path"):
        resolve_checkpoint(3)
    assert resolve_checkpoint(tmp_path) == tmp_path


@pytest.mark.parametrize(
    ("given", "want"),
    [(None, None), ("auto", None), ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
     ("torch.float16", torch.float16), ("float32", torch.float32), (torch.float16, torch.float16)],
)  # fmt: skip
def test_dtype_names(given, want):
    assert resolve_dtype(given) is want


@pytest.mark.parametrize("bad", ["int4", "float64x", torch.int8, 3])
def test_bad_dtype_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="dtype"):
        resolve_dtype(bad)


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="device: 'nonsense'"):
        resolve_device("nonsense")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_without_cuda_is_one_line():
    with pytest.raises(ConfigError) as e:
        resolve_device("cuda")
    assert "sees no CUDA GPU" in str(e.value) and "\n" not in str(e.value)


def test_load_model_by_hub_id_from_the_local_cache(cache_env, tiny_model):
    from longctx.checkpoint import load_model, save_model

    snap = fake_cache(cache_env, repo="org/tiny")
    save_model(tiny_model, snap)
    model = load_model("org/tiny", dtype="bfloat16", device="auto" if not torch.cuda.is_available() else "cpu")
    assert model.dtype == torch.bfloat16
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    want = tiny_model.to(torch.bfloat16)(ids)
    assert torch.equal(model(ids), want)  # same weights, same dtype: the same logits
    with pytest.raises(CheckpointError, match=str(cache_env / "models--org--absent")):
        load_model("org/absent")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_load_model_on_cuda_without_cuda_fails_before_reading(tmp_path):
    from longctx.checkpoint import load_model

    with pytest.raises(ConfigError, match="device: 'cuda'"):
        load_model(tmp_path / "never-read", device="cuda")


def test_tokenizer_json_only_folder_is_refused_up_front(tmp_path, tiny_model):
    from longctx.checkpoint import load_model, save_model

    save_model(tiny_model, tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tokenizer.json but no tokenizer.model"):
        load_model(tmp_path)
