"""Model loading: the demo, hub names offline, local checkpoints, once per process."""

from __future__ import annotations

import threading

import pytest

from analysis import DEMO_MODEL, ModelUnavailableError, load_model, resolve_model
from analysis import models as models_module
from analysis.testing import make_random_gpt2


def test_demo_model_boots_through_the_gpt2_bridge():
    loaded = load_model(DEMO_MODEL)

    assert type(loaded.bridge).__name__ == "TransformerBridge"
    assert loaded.cfg.n_layers >= 2
    assert loaded.tokenizer.eos_token == "<|endoftext|>"
    assert len(loaded.tokenizer) <= 1024
    assert loaded.bridge.to_str_tokens("hi")[0] == "<|endoftext|>"


def test_uncached_hub_model_fails_fast_with_the_download_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(models_module, "_hub_snapshot", lambda repo: None)

    with pytest.raises(ModelUnavailableError, match="hf download gpt2"):
        resolve_model("gpt2")
    with pytest.raises(ModelUnavailableError, match="EleutherAI/pythia-70m"):
        resolve_model("pythia-70m")


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match="unknown model 'gtp2'.*gpt2"):
        resolve_model("gtp2")


@pytest.mark.parametrize("bad", ["", "   ", "gpt2\x00", None])
def test_empty_or_invalid_names_are_rejected(bad):
    with pytest.raises(ValueError):
        resolve_model(bad)


def test_local_checkpoint_loads_when_allowed(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), allow_any_path=True)
    assert loaded.spec.model_id == str(tiny_model_dir)
    assert loaded.n_layers == 2 and loaded.n_heads == 4


def test_paths_outside_allowed_dirs_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="not inside an allowed model directory"):
        resolve_model(str(tiny_model_dir))
    with pytest.raises(ValueError, match="not inside an allowed model directory"):
        resolve_model("../../../../etc")


def test_model_dirs_setting_allows_a_directory(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MEMLENS_MODEL_DIRS", str(tiny_model_dir.parent))
    assert resolve_model(str(tiny_model_dir)).model_id == str(tiny_model_dir)
    assert str(tiny_model_dir) in models_module.available_models()


def test_directory_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path), allow_any_path=True)


def test_fingerprint_changes_with_the_weights(tmp_path):
    first = resolve_model(str(make_random_gpt2(tmp_path / "m", seed=1)), allow_any_path=True)
    second = resolve_model(str(make_random_gpt2(tmp_path / "m", seed=2)), allow_any_path=True)
    assert first.fingerprint != second.fingerprint


def test_concurrent_requests_load_once(tmp_path, monkeypatch):
    directory = make_random_gpt2(tmp_path / "concurrent")
    boots = []
    real_boot = models_module._boot
    monkeypatch.setattr(models_module, "_boot", lambda *a: boots.append(1) or real_boot(*a))

    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(load_model(str(directory), allow_any_path=True))
        )
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(boots) == 1
    assert len({id(r) for r in results}) == 1


def test_cpu_is_used_when_cuda_is_missing(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models_module.pick_device("auto") == "cpu"
    assert models_module.pick_device("cuda") == "cpu"
    with pytest.raises(ValueError, match="device must be"):
        models_module.pick_device("tpu")
