"""UltraFastBert classes: registration, the FFF layer API, outputs, losses, attention, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

import hf_fff

import _oracle
from _model_helpers import tiny_config


@pytest.fixture
def config():
    return tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, embedding_dropout_prob=0.0, num_labels=3)


def ids(batch=2, seq=10, vocab=128, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "auto_class, model_class",
    [
        (AutoModel, hf_fff.UltraFastBertModel),
        (AutoModelForMaskedLM, hf_fff.UltraFastBertForMaskedLM),
        (AutoModelForSequenceClassification, hf_fff.UltraFastBertForSequenceClassification),
        (AutoModelForTokenClassification, hf_fff.UltraFastBertForTokenClassification),
        (AutoModelForQuestionAnswering, hf_fff.UltraFastBertForQuestionAnswering),
    ],
)
def test_auto_classes_are_registered(config, auto_class, model_class, tmp_path):
    assert type(auto_class.from_config(config)) is model_class
    model_class(config).save_pretrained(tmp_path)
    assert type(auto_class.from_pretrained(tmp_path)) is model_class
    assert isinstance(AutoConfig.from_pretrained(tmp_path), hf_fff.UltraFastBertConfig)


def test_config_defaults_are_the_published_model():
    config = hf_fff.UltraFastBertConfig()
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (32768, 768, 16, 12)
    assert (config.fff_depth, config.fff_trees, config.fff_nodes_per_tree, config.max_position_embeddings) == (11, 1, 4095, 128)


@pytest.mark.parametrize(
    "bad",
    [dict(hidden_size=30, num_attention_heads=4), dict(fff_depth=-1), dict(fff_trees=0), dict(classifier_pooling="max"), dict(sparse_prediction="yes")],
)
def test_config_rejects_impossible_geometry(bad):
    with pytest.raises(ValueError):
        tiny_config(**bad)


@pytest.mark.parametrize("shape", [(0, 24), (1, 24), (5, 24), (2, 3, 24), (2, 0, 24), (2, 2, 2, 24)])
def test_fast_feedforward_any_leading_shape(shape):
    layer = hf_fff.FastFeedForward(24, depth=4, trees=3)
    x = torch.randn(shape)
    y, leaves = layer(x, return_leaves=True)
    assert y.shape == x.shape and leaves.shape == (*shape[:-1], 3)
    assert leaves.dtype == torch.long and ((leaves >= 0) & (leaves < 16)).all()
    with torch.no_grad():
        _oracle.check_forward(x.reshape(-1, 24), layer.weight_in, layer.bias_in, layer.weight_out, 4, y.reshape(-1, 24), leaves.reshape(-1, 3))


def test_fast_feedforward_parameters():
    layer = hf_fff.FastFeedForward(768, depth=11)
    assert layer.weight_in.shape == layer.weight_out.shape == (4095, 768) and layer.bias_in.shape == (4095,)
    assert sum(p.numel() for p in layer.parameters()) == 2 * 4095 * 768 + 4095


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_feedforward_low_precision_activations_over_fp32_weights(dtype):
    layer = hf_fff.FastFeedForward(16, depth=2)
    y = layer(torch.randn(4, 16).to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()


def test_outputs_hidden_states_attentions_and_router_paths(config):
    model = hf_fff.UltraFastBertModel(config).eval()
    x = ids()
    out = model(input_ids=x, output_hidden_states=True, output_attentions=True, output_router_paths=True)
    assert out.last_hidden_state.shape == (2, 10, 32)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert len(out.attentions) == config.num_hidden_layers and out.attentions[0].shape == (2, 4, 10, 10)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 4, 10))
    assert len(out.router_paths) == config.num_hidden_layers
    for layer, hidden, paths in zip(model.encoder.layers, out.hidden_states, out.router_paths):
        assert paths.shape == (2, 10, config.fff_trees) and paths.dtype == torch.long
        after_attention = hidden + layer.attention(layer.attention_norm(hidden), None)[0]
        _, leaves = layer.ffn(layer.ffn_norm(after_attention), return_leaves=True)
        torch.testing.assert_close(paths, leaves, rtol=0, atol=0)
    torch.testing.assert_close(model.final_norm(out.hidden_states[-1]), out.last_hidden_state)
    plain = model(input_ids=x)
    assert plain.hidden_states is None and plain.attentions is None and plain.router_paths is None
    assert isinstance(model(input_ids=x, return_dict=False), tuple)


def test_sdpa_and_eager_attention_agree(config):
    torch.manual_seed(0)
    sdpa = hf_fff.UltraFastBertModel._from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    eager = hf_fff.UltraFastBertModel._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa.config._attn_implementation == "sdpa"
    x, mask = ids(), torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        torch.testing.assert_close(sdpa(input_ids=x, attention_mask=mask).last_hidden_state, eager(input_ids=x, attention_mask=mask).last_hidden_state)


def test_padding_does_not_change_unpadded_tokens(config):
    model = hf_fff.UltraFastBertModel(config).eval()
    short = ids(1, 6)
    padded = torch.cat([short, torch.zeros(1, 5, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 5)], dim=1)
    with torch.no_grad():
        alone = model(input_ids=short).last_hidden_state
        within = model(input_ids=padded, attention_mask=mask).last_hidden_state[:, :6]
    torch.testing.assert_close(within, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_a_mask_that_masks_nothing_is_left_out(config, attn_implementation, monkeypatch):
    """All ones (any dtype) reaches attention as no mask (SDPA's mask-free kernels), with the same output;
    a mask with one 0, or one 0.5, reaches it."""
    model = hf_fff.UltraFastBertModel._from_config(copy.deepcopy(config), attn_implementation=attn_implementation).eval()
    seen = []
    original = hf_fff.modeling_ultrafastbert.additive_attention_mask
    monkeypatch.setattr(hf_fff.modeling_ultrafastbert, "additive_attention_mask", lambda mask, *a: seen.append(mask) or original(mask, *a))
    x = ids()
    with torch.no_grad():
        plain = model(input_ids=x).last_hidden_state
        for ones in (torch.ones(2, 10, dtype=torch.long), torch.ones(2, 10, dtype=torch.bool), torch.ones(2, 10)):
            torch.testing.assert_close(model(input_ids=x, attention_mask=ones).last_hidden_state, plain, rtol=0, atol=0)
        assert seen == [None] * 4
        for value in (0.0, 0.5):
            mask = torch.ones(2, 10)
            mask[1, 9] = value
            model(input_ids=x, attention_mask=mask)
            assert seen[-1] is mask
            assert not torch.equal(model(input_ids=x, attention_mask=mask).last_hidden_state[1], plain[1])


def test_inputs_longer_than_training_length(config):
    model = hf_fff.UltraFastBertModel(config).eval()
    out = model(input_ids=ids(1, 300)).last_hidden_state
    assert out.shape == (1, 300, 32) and torch.isfinite(out).all()


def test_inputs_embeds_equal_input_ids(config):
    model = hf_fff.UltraFastBertModel(config).eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=model.embeddings.word_embeddings(x)).last_hidden_state, model(input_ids=x).last_hidden_state)


def test_masked_lm_loss_ignores_minus_100(config):
    model = hf_fff.UltraFastBertForMaskedLM(config).eval()
    x = ids()
    labels = x.clone()
    labels[:, ::2] = -100
    out = model(input_ids=x, labels=labels)
    assert out.logits.shape == (2, 10, 128)
    keep = labels != -100
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[keep], labels[keep]))


def test_sequence_classification_losses(config):
    model = hf_fff.UltraFastBertForSequenceClassification(config).eval()
    x = ids()
    single = model(input_ids=x, labels=torch.tensor([0, 2]))
    assert model.config.problem_type == "single_label_classification"
    torch.testing.assert_close(single.loss, F.cross_entropy(single.logits, torch.tensor([0, 2])))
    model.config.problem_type = None
    multi = model(input_ids=x, labels=torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))
    assert model.config.problem_type == "multi_label_classification"
    torch.testing.assert_close(multi.loss, F.binary_cross_entropy_with_logits(multi.logits, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])))
    regression = hf_fff.UltraFastBertForSequenceClassification(tiny_config(num_labels=1)).eval()
    out = regression(input_ids=x, labels=torch.tensor([0.5, -1.0]))
    assert regression.config.problem_type == "regression" and out.logits.shape == (2, 1)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), torch.tensor([0.5, -1.0])))


def test_classification_pooling_is_the_published_mean_over_all_positions(config):
    model = hf_fff.UltraFastBertForSequenceClassification(config).eval()
    x, mask = ids(), torch.ones(2, 10)
    mask[0, 5:] = 0
    with torch.no_grad():
        hidden = model.ultrafastbert(input_ids=x, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(model(input_ids=x, attention_mask=mask).logits, model.head(hidden.mean(1)))
        model.config.classifier_pooling = "masked_avg"
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(model(input_ids=x, attention_mask=mask).logits, model.head(pooled))


def test_token_classification_and_question_answering_losses(config):
    x = ids()
    tagger = hf_fff.UltraFastBertForTokenClassification(config).eval()
    labels = torch.randint(0, 3, (2, 10))
    labels[0, :4] = -100
    out = tagger(input_ids=x, labels=labels)
    assert out.logits.shape == (2, 10, 3)
    keep = labels != -100
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[keep], labels[keep]))
    qa = hf_fff.UltraFastBertForQuestionAnswering(config).eval()
    out = qa(input_ids=x, start_positions=torch.tensor([1, 3]), end_positions=torch.tensor([2, 99]))
    assert out.start_logits.shape == out.end_logits.shape == (2, 10)
    expected = (F.cross_entropy(out.start_logits, torch.tensor([1, 3])) + F.cross_entropy(out.end_logits[:1], torch.tensor([2]))) / 2
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(input_ids=torch.tensor([[1, 2, 128]])), ValueError, r"\[0, 128\)"),
        (dict(input_ids=torch.tensor([[1, -1, 3]])), ValueError, r"\[0, 128\)"),
        (dict(input_ids=torch.tensor([1, 2, 3])), ValueError, "batch, seq_len"),
        (dict(input_ids=torch.ones(1, 2, 3, dtype=torch.long)), ValueError, "batch, seq_len"),
        (dict(input_ids=torch.tensor([[1.0, 2.0]])), TypeError, "integer"),
        (dict(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3)), ValueError, "attention_mask"),
        (dict(inputs_embeds=torch.randn(1, 4, 31)), ValueError, "inputs_embeds"),
        (dict(), ValueError, "exactly one"),
    ],
)
def test_bad_input_gets_a_clear_error(config, kwargs, error, message):
    model = hf_fff.UltraFastBertForMaskedLM(config).eval()
    with pytest.raises(error, match=message):
        model(**kwargs)


def test_fff_op_rejects_mismatched_arguments():
    x, w, b = torch.randn(3, 8), torch.randn(7, 8), torch.randn(7)
    with pytest.raises(ValueError, match="weight_in"):
        hf_fff.fast_feedforward(x, torch.randn(6, 8), torch.randn(6), torch.randn(6, 8), 2)
    with pytest.raises(ValueError, match="weight_in"):
        hf_fff.fast_feedforward(torch.randn(3, 9), w, b, w, 2)
    with pytest.raises(TypeError, match="dtype"):
        hf_fff.fast_feedforward(x.double(), w, b, w, 2)
    with pytest.raises(TypeError, match="floating"):
        hf_fff.fast_feedforward(x.long(), w, b, w, 2)
    with pytest.raises(ValueError, match="bias_in"):
        hf_fff.fast_feedforward(x, w, torch.randn(6), w, 2)
    with pytest.raises(ValueError, match="depth"):
        hf_fff.fast_feedforward(x, w, b, w, -1)


def test_all_padding_row_and_empty_batch_do_not_crash(config):
    model = hf_fff.UltraFastBertForSequenceClassification(config).eval()
    x = ids()
    mask = torch.ones(2, 10)
    mask[1] = 0
    out = model(input_ids=x, attention_mask=mask)
    assert torch.isfinite(out.logits).all()
    empty = model(input_ids=torch.zeros(0, 10, dtype=torch.long), attention_mask=torch.zeros(0, 10))
    assert empty.logits.shape == (0, 3)
    mlm = hf_fff.UltraFastBertForMaskedLM(config).eval()
    assert mlm(input_ids=torch.zeros(3, 0, dtype=torch.long)).logits.shape == (3, 0, 128)


def test_backends_can_be_forced_and_agree(config):
    model = hf_fff.UltraFastBertModel(config).eval()
    x = ids()
    outputs = {}
    for name in ("reference", "masked"):
        with hf_fff.use_backend(name), torch.no_grad():
            outputs[name] = model(input_ids=x).last_hidden_state
    torch.testing.assert_close(outputs["reference"], outputs["masked"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown FFF backend"):
        hf_fff.set_backend("nope")


def test_compiles_without_graph_breaks(config):
    model = hf_fff.UltraFastBertModel(config).eval()
    x = ids()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=x).last_hidden_state, model(input_ids=x).last_hidden_state)


# ---------------------------------------------------------------- sizes, depth and id dtypes refused clearly


@pytest.mark.parametrize("depth", [True, False, 2.0, "3", -1])
def test_fast_feed_forward_rejects_a_depth_that_is_not_an_int(depth):
    with pytest.raises(ValueError, match="depth must be an int"):
        hf_fff.FastFeedForward(16, depth)


@pytest.mark.parametrize("depth, trees, hidden", [(40, 1, 768), (33, 1, 16), (20, 2**20, 768)])
def test_fast_feed_forward_rejects_weights_that_cannot_fit_in_memory(depth, trees, hidden):
    with pytest.raises(ValueError, match="needs .* parameters"):
        hf_fff.FastFeedForward(hidden, depth, trees)


def test_fast_feed_forward_depth_changed_after_a_call_is_checked_again():
    torch.manual_seed(0)
    layer = hf_fff.FastFeedForward(12, depth=1, trees=1)  # 3 rows: depth 0 would read them as 3 trees
    x = torch.randn(5, 12)
    layer(x)
    layer.depth = 0
    with pytest.raises(ValueError, match="depth"):
        layer(x)
    layer.depth = 2  # 7 rows per tree: 3 rows cannot hold it
    with pytest.raises(ValueError, match="depth"):
        layer(x)
    layer.depth = 1
    assert layer(x).shape == x.shape


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16])
def test_small_integer_ids_get_a_clear_error(config, dtype):
    model = hf_fff.UltraFastBertModel(config).eval()
    with pytest.raises(TypeError, match="input_ids must be integer token ids of dtype int64"):
        model(input_ids=torch.ones(2, 5, dtype=dtype))
