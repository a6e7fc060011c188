"""The training stack users reach for, on every device here: Trainer with bf16 mixed precision, gradient
accumulation and gradient checkpointing; MLM pretraining from scratch with DataCollatorForLanguageModeling;
a torch.compile'd training step (fullgraph: no graph break around the FFF ops); CUDA graphs on the GPU.

CPU cases run in CI; the CUDA cases skip without a GPU and run on the device machine.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorForLanguageModeling, Trainer

import hf_fff

from _model_helpers import CORPUS, NO_DROPOUT, LabelledIds, enable_checkpointing, logged_losses, tiny_config, train_tokenizer, training_args

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def no_dropout_config(**overrides):
    return tiny_config(**NO_DROPOUT, **overrides)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_trainer_bf16_mixed_precision_learns(tmp_path, device):
    torch.manual_seed(0)
    model = hf_fff.UltraFastBertForSequenceClassification(no_dropout_config(num_labels=2))
    args = training_args(tmp_path, device, bf16=True, num_train_epochs=12)
    trainer = Trainer(model=model, args=args, train_dataset=LabelledIds())
    trainer.train()
    losses = logged_losses(trainer)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4, losses
    assert next(model.parameters()).dtype == torch.float32  # mixed precision: fp32 master weights


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_accumulation_equals_the_large_batch(tmp_path, device):
    """Two accumulated micro-batches of 8 take the same optimizer step as one batch of 16 (fp32, SGD)."""
    data = LabelledIds(n=16)

    def one_step(batch_size, accumulation):
        torch.manual_seed(3)
        model = hf_fff.UltraFastBertForSequenceClassification(no_dropout_config(num_labels=2))
        args = training_args(
            tmp_path / f"{batch_size}", device, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
            max_steps=1, optim="sgd", learning_rate=0.5,
        )
        Trainer(model=model, args=args, train_dataset=data).train()
        return {name: p.detach().cpu().clone() for name, p in model.named_parameters()}

    accumulated, large = one_step(8, 2), one_step(16, 1)
    moved = 0
    for name, value in large.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-4, atol=1e-6, msg=name)
        moved += name.endswith("weight_in")
    assert moved, "no FFF parameter was compared"


@pytest.mark.parametrize("device", DEVICES)
def test_trainer_gradient_checkpointing_matches_plain_gradients(device):
    torch.manual_seed(2)
    model = hf_fff.UltraFastBertForMaskedLM(no_dropout_config()).to(device).train()
    ids = torch.randint(0, 128, (2, 10), device=device)
    model(input_ids=ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    enable_checkpointing(model)
    assert model.is_gradient_checkpointing
    model(input_ids=ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("sparse_prediction", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_mlm_pretraining_from_scratch_with_the_collator(tmp_path, device, sparse_prediction):
    """A config built from scratch (any trees/depth) pretrains with DataCollatorForLanguageModeling."""
    tokenizer = train_tokenizer(128)
    config = hf_fff.UltraFastBertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, fff_depth=4, fff_trees=2,
        pad_token_id=tokenizer.pad_token_id, sparse_prediction=sparse_prediction, **NO_DROPOUT,
    )
    torch.manual_seed(0)
    model = hf_fff.UltraFastBertForMaskedLM(config)
    texts = CORPUS * 8
    encoded = [tokenizer(text, truncation=True, max_length=24) for text in texts]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=0)
    args = training_args(tmp_path, device, num_train_epochs=10, learning_rate=5e-3)
    trainer = Trainer(model=model, args=args, train_dataset=encoded, data_collator=collator)
    trainer.train()
    losses = logged_losses(trainer)
    assert len(losses) >= 20
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses  # about 4.7 -> 3.3 in this run


def masked_lm_batch(device, batch=3, seq=12, vocab=128, seed=5):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=generator)
    labels = torch.where(torch.rand(batch, seq, generator=generator) < 0.3, ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]  # at least one target
    return ids.to(device), labels.to(device)


@pytest.mark.parametrize("items", [None, 7])
@pytest.mark.parametrize("device", DEVICES)
def test_sparse_prediction_gives_the_dense_loss_and_gradients(device, items):
    """Decoding only the labelled positions changes no number the optimizer sees (float64, so that any other
    summation would show)."""
    torch.manual_seed(6)
    dense = hf_fff.UltraFastBertForMaskedLM(no_dropout_config()).to(device, torch.float64).train()
    sparse = hf_fff.UltraFastBertForMaskedLM(no_dropout_config(sparse_prediction=True)).to(device, torch.float64).train()
    sparse.load_state_dict(dense.state_dict())
    ids, labels = masked_lm_batch(device)
    extra = {} if items is None else {"num_items_in_batch": torch.tensor(items, device=device)}
    loss_dense = dense(input_ids=ids, labels=labels, **extra).loss
    loss_sparse = sparse(input_ids=ids, labels=labels, **extra).loss
    torch.testing.assert_close(loss_sparse, loss_dense, rtol=1e-12, atol=0)
    loss_dense.backward()
    loss_sparse.backward()
    grads = dict(dense.named_parameters())
    for name, p in sparse.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-10, atol=1e-14, msg=name)


def test_sparse_prediction_logits_cover_the_labelled_positions_in_training_only():
    torch.manual_seed(7)
    model = hf_fff.UltraFastBertForMaskedLM(no_dropout_config(sparse_prediction=True)).train()
    ids, labels = masked_lm_batch("cpu")
    labelled = labels != -100
    out = model(input_ids=ids, labels=labels)
    assert out.logits.shape == (int(labelled.sum()), model.config.vocab_size)
    full = model(input_ids=ids).logits  # no labels: nothing to select by
    assert full.shape == (*ids.shape, model.config.vocab_size)
    torch.testing.assert_close(out.logits, full[labelled])  # row-major order of the labelled positions
    model.eval()
    assert model(input_ids=ids, labels=labels).logits.shape == (*ids.shape, model.config.vocab_size)
    with pytest.raises(ValueError, match="labels"):
        model.train()(input_ids=ids, labels=labels[:, :-1])


@pytest.mark.slow
def test_sparse_prediction_compiles_whole_when_dynamic_output_shapes_are_captured():
    """Selecting the labelled positions has a data-dependent size: torch.compile breaks the graph there unless
    dynamo captures dynamic output shapes, and then compiles the step whole (the README says so)."""
    torch._dynamo.reset()
    torch.manual_seed(8)
    model = hf_fff.UltraFastBertForMaskedLM(no_dropout_config(sparse_prediction=True)).train()
    ids, labels = masked_lm_batch("cpu")
    eager = model(input_ids=ids, labels=labels).loss
    # dynamo's own patch: pytest's monkeypatch (9.2) deletes a config entry on undo, breaking later compiles
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(model, fullgraph=True)(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def _train_step(model, ids, labels):
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out.loss.detach()


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_step_has_no_graph_break_and_matches_eager(device):
    torch._dynamo.reset()
    torch.manual_seed(4)
    config = no_dropout_config(num_labels=3)
    eager = hf_fff.UltraFastBertForSequenceClassification(config).to(device).train()
    compiled_model = hf_fff.UltraFastBertForSequenceClassification(config).to(device).train()
    compiled_model.load_state_dict(eager.state_dict())
    ids = torch.randint(1, 128, (4, 16), device=device)
    labels = torch.tensor([0, 1, 2, 1], device=device)

    loss_eager = _train_step(eager, ids, labels)
    compiled = torch.compile(compiled_model, fullgraph=True)  # fullgraph: any graph break raises
    loss_compiled = _train_step(compiled, ids, labels)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_trainer_with_torch_compile_takes_the_eager_steps(tmp_path, device):
    """TrainingArguments(torch_compile=True), as the README suggests for GPU training: three SGD steps of the
    compiled model end where three eager ones do."""
    def trained(compile_model: bool):
        torch._dynamo.reset()
        torch.manual_seed(6)
        model = hf_fff.UltraFastBertForSequenceClassification(no_dropout_config(num_labels=2))
        args = training_args(
            tmp_path / str(compile_model), device, per_device_train_batch_size=8, max_steps=3, optim="sgd", learning_rate=0.1,
            torch_compile=compile_model,
        )
        trainer = Trainer(model=model, args=args, train_dataset=LabelledIds(n=24))
        torch._dynamo.utils.counters.clear()
        trainer.train()
        assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0) == compile_model  # compiled only when asked
        return logged_losses(trainer), {name: p.detach().cpu().clone() for name, p in model.named_parameters()}

    compiled_losses, compiled = trained(True)
    eager_losses, eager = trained(False)
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-4, atol=1e-5)
    for name, value in eager.items():
        torch.testing.assert_close(compiled[name], value, rtol=1e-4, atol=1e-5, msg=name)


@needs_cuda
@pytest.mark.gpu
def test_cuda_graphs_replay_a_training_step():
    """A whole forward+backward captured in one CUDA graph and replayed gives the eager gradients."""
    torch.manual_seed(5)
    model = hf_fff.UltraFastBertForMaskedLM(no_dropout_config()).cuda().train()
    ids = torch.randint(1, 128, (4, 16), device="cuda")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs requires
        for _ in range(2):
            model(input_ids=ids, labels=ids).loss.backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    for p in model.parameters():
        p.grad.zero_()
    with torch.cuda.graph(graph):
        static_loss = model(input_ids=ids, labels=ids).loss
        static_loss.backward()
    for p in model.parameters():
        p.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    replayed = {n: p.grad.clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.testing.assert_close(static_loss, loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(replayed[name], p.grad, msg=name)
