"""The published crammedBERT layout loads through every Auto class with exact parity, and damage is refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

import hf_fff
from hf_fff.crammed import CrammedCheckpointError

from _model_helpers import FIXTURES, TINY_FIXTURES, crammed_forward, full_size_layout, random_crammed_checkpoint

RTOL = 1e-5


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def valid_positions(mask: torch.Tensor) -> torch.Tensor:
    return mask.bool()


@pytest.fixture(params=TINY_FIXTURES)
def tiny(request):
    folder = FIXTURES / request.param
    return folder, load_file(str(folder / "reference_outputs.safetensors"))


def test_autoconfig_reads_the_published_layout(tiny):
    folder, _ = tiny
    config = AutoConfig.from_pretrained(folder)
    arch = json.loads((folder / "config.json").read_text())["arch"]
    assert isinstance(config, hf_fff.UltraFastBertConfig) and config.model_type == "ultrafastbert"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert (config.fff_trees, config.fff_depth) == (arch["intermed_size"], arch["intermed_depth"])
    assert config.vocab_size == arch["embedding"]["vocab_size"] and config.layer_norm_eps == arch["norm_eps"]


def test_automodel_matches_the_original_code(tiny):
    folder, ref = tiny
    model = AutoModel.from_pretrained(folder).eval()
    assert isinstance(model, hf_fff.UltraFastBertModel)
    with torch.no_grad():
        out = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).last_hidden_state
        row0 = model(input_ids=ref["input_ids"][:1]).last_hidden_state
    keep = valid_positions(ref["attention_mask"])
    assert rel_err(out[keep], ref["last_hidden_state"][keep]) < RTOL
    assert rel_err(out, ref["last_hidden_state"]) < RTOL  # padded positions too
    assert rel_err(row0, ref["last_hidden_state_row0_nomask"]) < RTOL


def test_masked_lm_matches_the_original_code(tiny):
    folder, ref = tiny
    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    assert isinstance(model, hf_fff.UltraFastBertForMaskedLM)
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).logits
    assert logits.shape == ref["mlm_logits"].shape  # (batch, seq, vocab), not flattened as the original returns
    assert rel_err(logits, ref["mlm_logits"]) < RTOL
    assert model.decoder.weight.data_ptr() == model.ultrafastbert.embeddings.word_embeddings.weight.data_ptr()


def test_bool_int_and_float_masks_agree(tiny):
    folder, ref = tiny
    model = AutoModel.from_pretrained(folder).eval()
    mask = ref["attention_mask"]
    with torch.no_grad():
        outs = [model(input_ids=ref["input_ids"], attention_mask=m).last_hidden_state for m in (mask.bool(), mask.long(), mask.float())]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=0)


def test_classification_head_loads_trunk_from_published_layout(tiny):
    folder, ref = tiny
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3).eval()
    base = AutoModel.from_pretrained(folder).eval()
    for name, tensor in base.state_dict().items():
        torch.testing.assert_close(model.ultrafastbert.state_dict()[name], tensor, rtol=0, atol=0)
    with torch.no_grad():
        assert model(input_ids=ref["input_ids"]).logits.shape == (3, 3)


def copy_fixture(tmp_path, name="crammed-tiny-1x3"):
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target)
    for path in target.iterdir():
        path.chmod(0o644)
    return target


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda sd: sd.pop("encoder.layers.1.ffn.linear_in.weight"), "encoder.layers.1.ffn.linear_in.weight"),
        (lambda sd: sd.__setitem__("encoder.layers.0.attn.dense.weight", torch.zeros(64, 63)), "encoder.layers.0.attn.dense.weight"),
        (lambda sd: sd.__setitem__("encoder.final_norm.bias", torch.zeros(65)), "encoder.final_norm.bias"),
        (lambda sd: sd.pop("encoder.embedding.word_embedding.weight"), "encoder.embedding.word_embedding.weight"),
        (lambda sd: sd.__setitem__("encoder.layers.0.ffn.linear_out.weight", torch.full((64, 15), float("nan"))), "linear_out.weight"),
        (lambda sd: sd.__setitem__("encoder.layers.7.norm1.weight", torch.ones(64)), "encoder.layers.7.norm1.weight"),
    ],
    ids=["missing", "wrong-shape", "wrong-length", "missing-embedding", "nan", "unexpected"],
)
@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForMaskedLM])
def test_damaged_checkpoint_names_the_tensor(tmp_path, damage, message, auto_class):
    folder = copy_fixture(tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    damage(state)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CrammedCheckpointError, match=message.replace(".", r"\.")):
        auto_class.from_pretrained(folder)


def test_truncated_weights_file_is_refused(tmp_path):
    folder = copy_fixture(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CrammedCheckpointError, match="cannot be read"):
        AutoModel.from_pretrained(folder)


def test_unsupported_arch_is_refused(tmp_path):
    folder = copy_fixture(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["arch"]["norm_scheme"] = "post"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CrammedCheckpointError, match="norm_scheme"):
        AutoConfig.from_pretrained(folder)


def test_untied_decoder_copy_is_kept(tmp_path):
    folder = copy_fixture(tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    state["decoder.weight"] = state["decoder.weight"] + 0.5
    save_file(state, str(folder / "model.safetensors"))
    model = AutoModelForMaskedLM.from_pretrained(folder)
    assert not model.config.tie_word_embeddings
    torch.testing.assert_close(model.decoder.weight, state["decoder.weight"], rtol=0, atol=0)


@pytest.fixture(scope="module")
def full_size_checkpoint(tmp_path_factory):
    """A random UltraFastBERT-1x11-long in the published layout (755 MB), built from the shared key/shape list."""
    layout = full_size_layout()
    folder = tmp_path_factory.mktemp("ultrafastbert-1x11-long")
    state = random_crammed_checkpoint(folder, layout, seed=3)
    return folder, layout, state


@pytest.mark.slow
def test_full_size_checkpoint_loads_exactly(full_size_checkpoint):
    folder, layout, state = full_size_checkpoint
    model = AutoModelForMaskedLM.from_pretrained(folder).eval()
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.fff_depth, config.vocab_size) == (16, 768, 11, 32768)
    assert sum(p.numel() for p in model.parameters()) + config.vocab_size * config.hidden_size == sum(t.numel() for t in state.values()) - 16  # norm_factor scalars
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    with torch.no_grad():
        hidden32 = model.ultrafastbert(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden64 = model.double().ultrafastbert(input_ids=ids, attention_mask=mask).last_hidden_state
    expected = crammed_forward(state, layout["arch"], ids, mask)
    assert torch.isfinite(hidden32).all()
    # Same routing in float64, so the same function; what remains is the sinusoid table, which the model
    # (like the original's buffer) computes in float32 whatever the dtype.
    assert rel_err(hidden64, expected) < 1e-6
    per_token = (hidden32.double() - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert (per_token < 1e-4).float().mean() >= 0.9  # fp32 may flip a route whose logit is within rounding of 0


def test_published_repo_id_loads_from_a_hub_endpoint(lfs_hub, hub_token, fresh_hf_cache, tmp_path):
    """The real Hub code path: `from_pretrained("pbelcak/UltraFastBERT-1x11-long")` against an HTTP endpoint
    serving the published layout, into an empty cache; then again offline from that cache."""
    from huggingface_hub import HfApi

    repo_id = "pbelcak/UltraFastBERT-1x11-long"
    lfs_hub.tokens["hf_fake_token_of_the_authors"] = "pbelcak"  # publish under the authors' namespace
    folder = copy_fixture(tmp_path, "crammed-tiny-4x2")
    api = HfApi(endpoint=lfs_hub.url, token="hf_fake_token_of_the_authors")
    api.create_repo(repo_id, exist_ok=True)
    first = api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=["config.json", "model.safetensors"])
    ref = load_file(str(folder / "reference_outputs.safetensors"))

    model = AutoModelForMaskedLM.from_pretrained(repo_id).eval()
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).logits
    assert rel_err(logits, ref["mlm_logits"]) < RTOL
    assert model.name_or_path == repo_id

    state = load_file(str(folder / "model.safetensors"))  # a later commit with other weights: revision pins the old one
    state["encoder.final_norm.bias"] = state["encoder.final_norm.bias"] + 1.0
    save_file(state, str(folder / "model.safetensors"))
    api.upload_file(path_or_fileobj=str(folder / "model.safetensors"), path_in_repo="model.safetensors", repo_id=repo_id)
    pinned = AutoModel.from_pretrained(repo_id, revision=first.oid).eval()
    latest = AutoModel.from_pretrained(repo_id).eval()
    torch.testing.assert_close(pinned.final_norm.bias, model.ultrafastbert.final_norm.bias, rtol=0, atol=0)
    torch.testing.assert_close(latest.final_norm.bias, model.ultrafastbert.final_norm.bias + 1.0, rtol=0, atol=0)

    lfs_hub.stop()  # the server is gone: the cache alone must serve an offline load
    offline = AutoModel.from_pretrained(repo_id, local_files_only=True).eval()
    torch.testing.assert_close(offline.final_norm.bias, latest.final_norm.bias, rtol=0, atol=0)
