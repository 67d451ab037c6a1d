"""workflows.models: offline aliases, the cached GGUF conversion, identities and fingerprints."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from workflows import models
from workflows.artifacts import sha256_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2 loaded through the converted cache (converts on the first call of the session)."""
    return models.load_base("smollm2-135m")


def test_tiny_models_are_identical_across_loads():
    a, _ = models.load_base("tiny-llama")
    b, _ = models.load_base("tiny-llama")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name


def test_tiny_models_do_not_disturb_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    models.load_base("tiny-gpt2")
    assert torch.equal(torch.rand(3), expected)


def test_tiny_causal_models_use_smollm2_tokenizer_with_its_chat_template():
    model, tok = models.load_base("tiny-llama")
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert model.get_input_embeddings().num_embeddings == len(tok)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert", "minilm-l6"])
def test_tokenizers_always_have_a_pad_token(name):
    tok = models.load_tokenizer(name)
    assert tok.pad_token is not None and tok.pad_token_id is not None


def test_smollm2_is_converted_once_and_reused(smollm2):
    folder = Path(models.base_identity("smollm2-135m")["path"])
    weights = folder / "model.safetensors"
    before = weights.stat().st_mtime_ns
    models.load_base("smollm2-135m")
    assert weights.stat().st_mtime_ns == before
    assert not list(folder.parent.glob(".*tmp-*")), "a temp folder was left behind"


def test_smollm2_weights_are_the_dequantised_gguf(smollm2):
    import gguf

    model, _ = smollm2
    reader = gguf.GGUFReader(str(models._smollm2_gguf()))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    expected = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type)).reshape(
        model.model.layers[0].mlp.down_proj.weight.shape)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, expected)


def test_smollm2_identity_records_gguf_sha_quant_and_converted_folder(smollm2):
    identity = models.base_identity("smollm2-135m")
    assert identity["sha256"] == sha256_file(models._smollm2_gguf())
    assert identity["quant"] == "Q4_1"
    assert (Path(identity["path"]) / "config.json").is_file()
    assert (Path(identity["path"]) / "tokenizer.json").is_file()


def test_smollm2_pad_is_eos(smollm2):
    _, tok = smollm2
    assert tok.pad_token == tok.eos_token == "<|im_end|>"


def test_tokenizer_alone_does_not_convert_the_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLOW_CACHE", str(tmp_path))
    tok = models.load_tokenizer("tiny-llama")
    assert tok.chat_template
    assert (tmp_path / "tokenizers").is_dir()
    assert not (tmp_path / "models").exists()


def test_concurrent_builds_of_a_cached_folder_run_the_build_once(tmp_path):
    calls = []

    def build(tmp: Path) -> None:
        calls.append(1)
        time.sleep(0.2)  # long enough for the other thread to reach the lock
        (tmp / "done").write_text("x")

    final = tmp_path / "models" / "thing"
    threads = [threading.Thread(target=models._cached_folder, args=(final, build, ("done",))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert (final / "done").read_text() == "x"


def test_a_failed_build_leaves_no_folder(tmp_path):
    def build(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("conversion failed")

    final = tmp_path / "models" / "thing"
    with pytest.raises(RuntimeError, match="conversion failed"):
        models._cached_folder(final, build, ("half",))
    assert list((tmp_path / "models").iterdir()) == [tmp_path / "models" / ".thing.lock"]


def test_a_build_that_leaves_out_a_required_file_commits_nothing(tmp_path):
    def build(tmp: Path) -> None:  # what transformers' save_pretrained did on a rank other than 0
        (tmp / "tokenizer.json").write_text("{}")

    final = tmp_path / "models" / "thing"
    with pytest.raises(models.ModelNotAvailableError, match="left out config.json, \\*.safetensors"):
        models._cached_folder(final, build, ("config.json", "*.safetensors", "tokenizer.json"))
    assert not final.exists()


def test_a_cached_folder_missing_a_required_file_is_rebuilt_not_trusted(tmp_path):
    final = tmp_path / "models" / "thing"
    final.mkdir(parents=True)
    (final / "tokenizer.json").write_text("{}")  # poisoned: no config, no weights

    def build(tmp: Path) -> None:
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (tmp / name).write_text("x")

    models._cached_folder(final, build, ("config.json", "*.safetensors", "tokenizer.json"))
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_a_build_in_its_own_process_works_from_a_script_without_a_main_guard(tmp_path):
    """The fresh interpreter must not re-run the caller's `__main__`: an unguarded script that loads
    a model on an empty cache would wait forever for the lock it holds itself."""
    source = tmp_path / "source"
    model, tokenizer = models.load_base("tiny-llama")
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    (source / models.IDENTITY_FILE).write_text("{}")
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import functools\n"
        "from pathlib import Path\n"
        "from workflows import models\n"
        f"final = Path({str(tmp_path / 'cache' / 'bf16')!r})\n"
        f"build = functools.partial(models._cast_folder, Path({str(source)!r}), 'bfloat16')\n"
        "models._cached_folder(final, build, models._MODEL_FILES, own_process=True)\n"
        "print('built', sorted(p.name for p in final.iterdir()))\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model.safetensors" in proc.stdout and models.IDENTITY_FILE in proc.stdout


def test_minilm_seq_cls_keeps_the_encoder_and_adds_a_new_head():
    from safetensors.torch import load_file

    model, _ = models.load_base("minilm-l6", task="seq_cls", num_labels=5)
    assert model.classifier.out_features == 5
    saved = load_file(Path(models.base_identity("minilm-l6")["path"]) / "model.safetensors")
    key = next(k for k in saved if k.endswith("encoder.layer.0.attention.self.query.weight"))
    assert torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, saved[key])


def test_seq_cls_without_num_labels_is_refused():
    with pytest.raises(ValueError, match="num_labels"):
        models.load_base("tiny-bert", task="seq_cls")


def test_encoder_as_causal_lm_is_refused():
    with pytest.raises(ValueError, match="encoder"):
        models.load_base("tiny-bert")



def test_mean_pooling_feeds_the_head_the_mean_of_the_real_tokens_whatever_the_padding():
    model, tok = models.load_base("tiny-bert", task="seq_cls", num_labels=3, pooling="mean")
    enc = tok(["a short one", "a much longer sentence with many more words in it"], padding=True,
              return_tensors="pt")
    with torch.inference_mode():
        logits = model(**enc).logits
        hidden = model.bert(**enc).last_hidden_state
        alone = model(**tok(["a short one"], return_tensors="pt")).logits
    mask = enc["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    assert torch.allclose(logits, model.classifier(mean), atol=1e-5)
    assert torch.allclose(logits[0], alone[0], atol=1e-5)  # the padding of the batch changes nothing
    assert not any("pooler" in name for name, _ in model.named_parameters())


def test_mean_pooling_is_refused_where_there_is_no_encoder_pooler():
    with pytest.raises(ValueError, match="pooler"):
        models.load_base("tiny-llama", task="seq_cls", num_labels=3, pooling="mean")

def test_bfloat16_base():
    model, _ = models.load_base("tiny-llama", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_auto_dtype_is_bf16_exactly_where_the_cpu_has_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for avx512_bf16, amx, want in [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                   (False, False, torch.float32)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        model, _ = models.load_base("tiny-llama", dtype="auto")
        assert {p.dtype for p in model.parameters()} == {want}
    assert models.resolve_dtype("float32") == "float32"  # explicit dtypes are never second-guessed


def test_native_bf16_on_a_gpu_does_not_count_emulation_and_the_loader_and_trainer_share_it(monkeypatch):
    """T4/V100 emulate bf16: `auto` must give them fp16 weights and fp16 autocast (with a scaler)."""
    from workflows.train.loop import autocast_dtype

    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return including_emulation  # an emulating GPU: supported only if emulation counts
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert models.native_bf16("cuda:0") is False
    assert models.resolve_dtype("auto", "cuda:0") == "float16"
    assert autocast_dtype("auto", torch.device("cuda", 0)) == torch.float16
    assert asked == [False, False, False]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert models.resolve_dtype("auto", "cuda") == "bfloat16"
    assert autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_packed_rows_on_cuda_get_flash_attention_2_only_where_flash_attn_is_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    for installed in (True, False):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a, v=installed: (object() if v else None) if name == "flash_attn" else real(name, *a))
        want = "flash_attention_2" if installed else "sdpa"
        assert models.attention_implementation("cuda:0", packed=True) == want
        assert models.attention_implementation("cuda:0", packed=False) == "sdpa"
        assert models.attention_implementation("cpu", packed=True) == "sdpa"


def test_the_base_loads_with_the_attention_implementation_asked_for():
    model, _ = models.load_base("tiny-llama", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"


def test_uncached_hub_id_offline_says_so():
    with pytest.raises(models.ModelNotAvailableError, match="OFFLINE.*not in the local Hugging Face cache"):
        models.load_tokenizer("loraflow-tests/no-such-model")


def test_local_directory_loads_and_has_a_content_identity(tmp_path):
    model, tok = models.load_base("tiny-gpt2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, _ = models.load_base(str(tmp_path))
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    identity = models.base_identity(str(tmp_path))
    assert identity["path"] == str(tmp_path.resolve()) and len(identity["sha256"]) == 64


def test_tokenizer_fingerprint_is_stable_and_sees_the_chat_template():
    a = models.load_tokenizer("tiny-llama")
    b = models.load_tokenizer("tiny-llama")
    assert models.tokenizer_fingerprint(a) == models.tokenizer_fingerprint(b)
    b.chat_template = a.chat_template.replace("helpful", "unhelpful")
    assert models.tokenizer_fingerprint(a) != models.tokenizer_fingerprint(b)
    assert models.tokenizer_fingerprint(a) != models.tokenizer_fingerprint(models.load_tokenizer("tiny-bert"))


def test_accelerate_is_a_core_dependency_because_every_base_loads_through_device_map(tmp_path, monkeypatch):
    """`pip install .` alone must load a base (transformers 5 refuses device_map without accelerate);
    .ci/core_install_check.sh runs a pipeline in such a venv. Read from the checkout's pyproject.toml
    (the shared venv's installed metadata is that of whichever checkout installed it)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    core = {m.lower() for m in re.findall(r'^\s*"([A-Za-z0-9_.-]+)', block, re.M)}
    assert {"torch", "transformers", "ray"} <= core  # the parse found the core list
    assert "accelerate" in core
    model, tok = models.load_base("tiny-gpt2")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    import transformers.integrations.accelerate as hf_accelerate

    models.load_base(str(tmp_path))
    # The CPU load takes the GPU's path (device_map), so a venv without accelerate fails here too.
    monkeypatch.setattr(hf_accelerate, "is_accelerate_available", lambda: False)
    with pytest.raises(ValueError, match="requires `accelerate`"):
        models.load_base(str(tmp_path))
