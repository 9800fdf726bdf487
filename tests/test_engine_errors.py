"""Every expected failure of loading is one clear EngineError line, raised before any heavy work."""

from __future__ import annotations

import json
import shutil

import pytest

from engine import EngineConfig, EngineError, SamplingConfig, load_engine
from tests.random_models import save_random_model


def load_error(**config) -> str:
    with pytest.raises(EngineError) as info:
        load_engine(EngineConfig(**config))
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_missing_path(tmp_path):
    assert "not found" in load_error(llm_path=str(tmp_path / "nope"))
    assert "not found" in load_error(llm_path=str(tmp_path / "model.gguf"))


def test_unknown_architecture(tmp_path, bundled_folder):
    folder = save_random_model(tmp_path / "m", "llama", bundled_folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    assert "unsupported architecture 'gpt_neox'" in load_error(llm_path=str(folder))


def test_truncated_weights(tmp_path, bundled_folder):
    folder = save_random_model(tmp_path / "m", "llama", bundled_folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert "corrupt or incomplete" in load_error(llm_path=str(folder))


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    assert "cannot read GGUF" in load_error(llm_path=str(bad))


def test_a_file_that_is_not_a_model(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# not a model")
    assert "is a file but not a model" in load_error(llm_path=str(readme))


@pytest.mark.slow
def test_a_gguf_with_corrupt_tensor_data_never_reaches_the_cache(tmp_path, monkeypatch):
    """The file parses, one block's scale is NaN: refused naming the user's .gguf, nothing cached."""
    import gguf

    from engine.loading import bundled_gguf_path

    monkeypatch.setenv("SUBSPEC_CACHE_DIR", str(tmp_path / "cache"))
    bad = tmp_path / "damaged.gguf"
    shutil.copyfile(bundled_gguf_path(), bad)
    embedding = next(t for t in gguf.GGUFReader(bad).tensors if t.name == "token_embd.weight")
    assert embedding.tensor_type.name == "Q8_0"  # blocks of an fp16 scale and 32 int8 values
    with bad.open("r+b") as f:
        f.seek(int(embedding.data_offset))
        f.write(bytes([0x00, 0x7E]))  # the first block's scale: an fp16 NaN
    message = load_error(llm_path=str(bad))
    assert f"corrupt weights in {bad}" in message and "NaN" in message
    assert not list((tmp_path / "cache").rglob("complete"))  # not marked converted
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # nothing written at all


def test_hub_id_offline_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert "not in the local Hugging Face cache" in load_error(llm_path="someone/no-such-model")


def test_draft_with_another_vocabulary_is_refused_before_loading(tmp_path, bundled_folder):
    target = save_random_model(tmp_path / "t", "llama", bundled_folder)
    draft = save_random_model(tmp_path / "d", "llama", bundled_folder)
    tokenizer = json.loads((draft / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["<|zz_extra|>"] = len(tokenizer["model"]["vocab"])
    (draft / "tokenizer.json").write_text(json.dumps(tokenizer))
    (draft / "model.safetensors").unlink()  # proves no weights were read before the refusal
    assert "vocabulary differs" in load_error(method="classic_sd", llm_path=str(target), draft_model_path=str(draft))


def test_bad_settings(tmp_path, bundled_folder):
    folder = str(save_random_model(tmp_path / "m", "llama", bundled_folder))
    assert "needs a draft model" in load_error(method="classic_sd", llm_path=folder)
    assert "unknown method" in load_error(method="magic", llm_path=folder)
    assert "--min-draft-prob must be in [0, 1), got 1.5" in load_error(method="subspec_sd", llm_path=folder,
                                                                       min_draft_prob=1.5)
    assert "between 0 and 3" in load_error(llm_path=folder, device="cpu", emulate_offload=True,
                                           keep_first_n_layers_on_gpu=9)


def test_prompt_longer_than_the_context(tmp_path, bundled_folder):
    engine = load_engine(EngineConfig(llm_path=str(save_random_model(tmp_path / "m", "llama", bundled_folder)),
                                      max_length=16))
    with pytest.raises(EngineError, match="the prompt has 20 tokens but the context holds 16"):
        engine.generate(list(range(3, 23)), SamplingConfig(max_new_tokens=4))
