"""The CUDA paths: what the CPU suite emulates, on a real GPU (marker ``cuda``).

Every test here skips, saying why, where ``torch.cuda.is_available()`` is False, so the
CPU suite is unchanged. On a GPU machine they run with

    python3 -m pytest tests/test_cuda.py -m cuda        # or: bash benchmarks/gpu_check.sh OUT_DIR

What they check, each on a tiny model in seconds:

* fp16 with the Trainer's real GradScaler (accelerate makes it for ``--fp16`` on CUDA) at its
  default 2^16: every estimate enters v; an overflow the scaler skips leaves v and the
  counters untouched (test_trainer.py emulates both on CPU);
* bf16 autocast trains with a finite loss and fp32 optimizer state;
* SDPA: steps without a Hessian run the fused (flash / memory-efficient) kernel, the exact
  estimator's Hessian steps the math kernel (which has a double backward);
* probes are a function of (seed, step, parameter) on ``cuda:0`` too: a resumed run equals
  the uninterrupted one bit for bit;
* the foreach and for-loop cores agree bit for bit on CUDA in fp32 and bf16;
* finite differences keep the fused kernel on every step and match the exact estimate to 2%.

Nothing here needs ``datasets``: the data are a plain torch Dataset, so the file also runs
with ``--noconftest`` where the GPU machine cannot import it.
"""

import math
import os

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback

# cuBLAS reads this when its first handle is made: the resume test runs in deterministic mode.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from hf_adahessian import AdaHessian, AdaHessianTrainer, AdaHessianTrainingArguments, hessian_pass  # noqa: E402
from hf_adahessian.probes import Probes  # noqa: E402
from optim_helpers import assert_all_equal, clone_params  # noqa: E402
from test_finite_difference import FirstEstimate, relative_l2  # noqa: E402

NO_CUDA = ("no CUDA device here (torch.cuda.is_available() is False); these tests run on a GPU machine: "
           "bash benchmarks/gpu_check.sh OUT_DIR")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]

CUDA = torch.device("cuda", 0)
SDPA_MATH = "aten::_scaled_dot_product_attention_math"
# The fused kernels (cuDNN's too: on Hopper torch may prefer it); none has a double backward.
SDPA_FUSED = {"aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
              "aten::_scaled_dot_product_cudnn_attention"}
VOCAB = 100
STATE_KEYS = ("exp_avg", "exp_hessian_diag_sq")


# --------------------------------------------------------------------------- builders


def bert(seed: int = 0, **overrides) -> BertForSequenceClassification:
    """A tiny BERT classifier built on the CPU under ``seed`` (the Trainer moves it to the GPU);
    no dropout unless asked. ``hidden_size=64`` gives heads of 32, which the fused kernels take."""
    config = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=32, num_labels=2,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config.update(overrides)
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**config))


class Tokens(torch.utils.data.Dataset):
    """``n`` rows of random token ids; the label is the parity of the first token (learnable)."""

    def __init__(self, n: int = 64, seq_len: int = 8, seed: int = 0):
        self.ids = torch.randint(2, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": int(self.ids[i, 0]) % 2}


def cuda_args(tmp_path, **overrides) -> AdaHessianTrainingArguments:
    kwargs = dict(output_dir=str(tmp_path / "out"), optim="adahessian", learning_rate=0.05, report_to=[],
                  save_strategy="no", disable_tqdm=True, per_device_train_batch_size=8, max_steps=3,
                  logging_steps=1, seed=0)
    kwargs.update(overrides)
    return AdaHessianTrainingArguments(**kwargs)


def train(model, args, dataset, callbacks=None, **train_kwargs) -> AdaHessianTrainer:
    """An AdaHessianTrainer on the GPU, trained; ``train_kwargs`` go to ``train()``."""
    trainer = AdaHessianTrainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
    assert trainer.args.device.type == "cuda", trainer.args.device
    trainer.train(**train_kwargs)
    return trainer


def logged(trainer, key="loss"):
    """``key`` of every step's log line (not the summary's)."""
    lines = (e for e in trainer.state.log_history if "train_runtime" not in e)
    return [e[key] for e in lines if key in e]


def state_of(trainer, key):
    """Copies of one optimizer state tensor per trainable parameter, in the probes' order."""
    opt = trainer.adahessian
    return [opt.state[p][key].clone() for p in opt.trainable_params()]


class On(TrainerCallback):
    """Calls ``fn(state)`` at one callback event."""

    def __init__(self, event, fn):
        setattr(self, event, lambda args, state, control, **kwargs: fn(state))


class KernelsPerStep(TrainerCallback):
    """For each optimizer step: whether it carried a Hessian, and which SDPA kernels ran in it
    (``torch.profiler``'s op names, CPU activity: every aten call is recorded where it is dispatched)."""

    def __init__(self):
        self.steps: list[tuple[bool, set[str]]] = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self._hessian = getattr(optimizer, "optimizer", optimizer).is_hessian_step()
        self._prof = profile(activities=[ProfilerActivity.CPU])
        self._prof.start()

    def on_step_end(self, args, state, control, **kwargs):
        self._prof.stop()
        ran = {e.key for e in self._prof.key_averages()} & (SDPA_FUSED | {SDPA_MATH})
        self.steps.append((self._hessian, ran))


# --------------------------------------------------------------------------- fp16: the real GradScaler


def test_fp16_with_the_trainers_grad_scaler_at_its_default_scale_every_estimate_enters_v(tmp_path):
    """At 2^16 the Hessian-vector product of a 2-layer BERT overflows fp16 where no gradient does
    (test_trainer.py, on CPU): the second backward runs at a scale of its own, so all 20 enter v."""
    trainer = train(bert(num_hidden_layers=2), cuda_args(tmp_path, fp16=True, max_steps=20), Tokens(128))

    scaler = trainer.accelerator.scaler
    assert trainer.accelerator.mixed_precision == "fp16" and isinstance(scaler, torch.amp.GradScaler)
    assert trainer.optimizer.scaler is scaler
    assert scaler.get_scale() == 2.0**16  # its default, and no gradient overflowed
    assert trainer.adahessian.counters == {"step": 20, "hessian_updates": 20, "skipped_hessian_updates": 0,
                                           "skipped_steps": 0}
    assert all(math.isfinite(h) and h > 0 for h in logged(trainer, "hessian_mean"))


class OverflowAt(AdaHessianTrainer):
    """One gradient set to inf after the backward of optimizer step ``overflow_step``: an fp16 overflow.

    Put in after the backward, not in ``on_pre_optimizer_step`` as on CPU: on CUDA accelerate
    unscales (and so looks for inf) when the Trainer takes the gradient norm, before that
    event, so an inf put there would reach AdaHessian's own non-finite check, not the scaler.
    """

    overflow_step = 1

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.state.global_step == self.overflow_step:
            with torch.no_grad():
                next(model.parameters()).grad[0, 0] = float("inf")
        return loss


def test_fp16_overflow_skipped_by_the_scaler_leaves_v_and_the_counters_untouched(tmp_path):
    before, after = {}, {}

    def snapshot(store, step, extra=True):
        def record(state):
            if state.global_step == step:
                store["v"] = state_of(trainer, "exp_hessian_diag_sq")
                store["counters"] = dict(trainer.adahessian.counters)
                store["scale"] = trainer.accelerator.scaler.get_scale()
                if extra:
                    store["skipped"] = trainer.accelerator.optimizer_step_was_skipped
        return record

    after_next = {}
    trainer = OverflowAt(model=bert(), args=cuda_args(tmp_path, fp16=True, max_steps=3), train_dataset=Tokens(32),
                         callbacks=[On("on_step_begin", snapshot(before, 1, extra=False)),
                                    On("on_optimizer_step", snapshot(after, 1)),
                                    On("on_optimizer_step", snapshot(after_next, 2))])
    trainer.train()

    assert after["skipped"] is True and after_next["skipped"] is False
    assert before["scale"] == 2.0**16 and after["scale"] == 2.0**15
    assert after["counters"] == before["counters"] == {"step": 1, "hessian_updates": 1, "skipped_hessian_updates": 0,
                                                       "skipped_steps": 0}
    assert_all_equal(after["v"], before["v"], "v")
    assert trainer.adahessian.counters == {"step": 2, "hessian_updates": 2, "skipped_hessian_updates": 0,
                                           "skipped_steps": 0}
    assert any(not torch.equal(a, b) for a, b in zip(after["v"], after_next["v"]))


# --------------------------------------------------------------------------- bf16


def test_bf16_autocast_trains_with_finite_loss_and_fp32_optimizer_state(tmp_path):
    model = bert()
    seen = []
    model.classifier.register_forward_hook(
        lambda m, i, out: seen.append((torch.is_autocast_enabled("cuda"), out.dtype)))
    trainer = train(model, cuda_args(tmp_path, bf16=True, max_steps=3), Tokens(32))

    assert trainer.accelerator.mixed_precision == "bf16" and trainer.accelerator.scaler is None
    assert seen and all(s == (True, torch.bfloat16) for s in seen)  # the forward ran in bf16
    assert all(math.isfinite(loss) for loss in logged(trainer))
    assert trainer.adahessian.counters["hessian_updates"] == 3
    assert all(p.dtype == torch.float32 and p.is_cuda for p in model.parameters())
    for key in STATE_KEYS:
        assert all(s.dtype == torch.float32 and s.is_cuda for s in state_of(trainer, key)), key
    assert all(math.isfinite(h) and h > 0 for h in logged(trainer, "hessian_mean"))


# --------------------------------------------------------------------------- attention kernels


def test_sdpa_runs_a_fused_kernel_between_hessian_steps_and_the_math_kernel_on_them(tmp_path, monkeypatch):
    """bf16, heads of 32, no mask, no attention dropout: what flash attention takes. The exact
    estimator's forward is forced onto the math kernel (the fused ones have no double backward)
    on Hessian steps only. No catch-up pass ran (one would be a Hessian pass between them)."""
    catch_ups, catch_up = [], hessian_pass.catch_up

    def counted_catch_up(**kwargs):
        catch_ups.append(kwargs["estimate"].step)
        return catch_up(**kwargs)

    monkeypatch.setattr(hessian_pass, "catch_up", counted_catch_up)
    model = bert(hidden_size=64, intermediate_size=128, attn_implementation="sdpa")
    kernels = KernelsPerStep()
    train(model, cuda_args(tmp_path, bf16=True, max_steps=4, optim_args="hessian_interval=2"), Tokens(32, seq_len=16),
          callbacks=[kernels])

    assert model.config._attn_implementation == "sdpa"  # restored after the Hessian steps
    assert not catch_ups
    assert [hessian for hessian, _ in kernels.steps] == [True, False, True, False]
    for step, (hessian, ran) in enumerate(kernels.steps, 1):
        if hessian:
            assert SDPA_MATH in ran and not ran & SDPA_FUSED, f"Hessian step {step} ran {sorted(ran)}"
        else:
            assert ran & SDPA_FUSED and SDPA_MATH not in ran, f"step {step} ran {sorted(ran)}"


# --------------------------------------------------------------------------- probes and resume


def test_cuda_probes_are_a_function_of_seed_step_and_parameter_only():
    like = torch.empty(1000, device=CUDA)
    torch.cuda.manual_seed(1)
    first = Probes(seed=7, step=3).draw(2, like)
    torch.cuda.manual_seed(2)
    torch.rand(10, device=CUDA)
    again = Probes(seed=7, step=3).draw(2, like)
    assert first.is_cuda and first.dtype == torch.int8 and set(first.unique().tolist()) == {-1, 1}
    assert torch.equal(first, again)
    assert not torch.equal(first, Probes(seed=7, step=4).draw(2, like))
    assert not torch.equal(first, Probes(seed=7, step=3).draw(3, like))


@pytest.fixture
def deterministic():
    """cuBLAS, SDPA and index kernels in their deterministic variants (warnings where there are none)."""
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(was[0], warn_only=was[1])


def test_resuming_on_cuda_equals_the_uninterrupted_run_bit_for_bit(tmp_path, deterministic):
    """6 steps straight against 3, a checkpoint, and 3 more in a fresh trainer from another
    initialisation; dropout on, so the Trainer's CUDA RNG restore must line up too."""
    dataset = Tokens(64)
    common = dict(max_steps=6, per_device_train_batch_size=4, save_strategy="steps", save_steps=3)
    straight = train(bert(hidden_dropout_prob=0.1, attn_implementation="eager"),
                     cuda_args(tmp_path / "a", **common), dataset)
    checkpoint = tmp_path / "a" / "out" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").exists()
    resumed = train(bert(seed=1, hidden_dropout_prob=0.1, attn_implementation="eager"),
                    cuda_args(tmp_path / "b", **common), dataset, resume_from_checkpoint=str(checkpoint))

    assert_all_equal(clone_params(resumed.model), clone_params(straight.model), "parameter")
    for key in STATE_KEYS:
        assert_all_equal(state_of(resumed, key), state_of(straight, key), key)
    assert resumed.adahessian.counters == straight.adahessian.counters == {
        "step": 6, "hessian_updates": 6, "skipped_hessian_updates": 0, "skipped_steps": 0}
    assert resumed.adahessian.seed == straight.adahessian.seed


# --------------------------------------------------------------------------- the two cores


def wide_mlp(dtype: torch.dtype) -> torch.nn.Module:
    """64 -> 512 -> 512 -> 1 tanh: tensors larger than one chunk of the foreach kernels."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.Tanh(), torch.nn.Linear(512, 512), torch.nn.Tanh(),
                                torch.nn.Linear(512, 1))
    return model.to(CUDA, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_foreach_and_for_loop_cores_give_bitwise_equal_parameters_on_cuda(dtype):
    """As test_optimizer.py's CPU test: 6 standalone steps (Hessian every 2nd, blocks of 2, weight
    decay), ``loss.backward(create_graph=True)``; parameters and both moments bit for bit."""
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 64, generator=gen), torch.randn(32, 1, generator=gen)) for _ in range(6)]
    runs = []
    for foreach in (False, True):
        model = wide_mlp(dtype)
        opt = AdaHessian(model.parameters(), lr=0.05, weight_decay=0.01, hessian_interval=2, block_size=2, seed=3,
                         foreach=foreach)
        for x, y in batches:
            opt.zero_grad()
            loss = ((model(x.to(CUDA, dtype)) - y.to(CUDA, dtype)) ** 2).mean()
            loss.backward(create_graph=opt.is_hessian_step())
            opt.step()
        runs.append((clone_params(model), opt))
    (p_loop, opt_loop), (p_foreach, opt_foreach) = runs
    assert not torch.equal(p_loop[0], clone_params(wide_mlp(dtype))[0]), "the runs did train"
    assert opt_loop.counters == opt_foreach.counters == {"step": 6, "hessian_updates": 3,
                                                         "skipped_hessian_updates": 0, "skipped_steps": 0}
    assert_all_equal(p_foreach, p_loop, "parameter")
    for key in STATE_KEYS:
        assert_all_equal([s[key] for s in opt_foreach.state.values()], [s[key] for s in opt_loop.state.values()], key)


# --------------------------------------------------------------------------- finite differences


def fd_bert(**overrides):
    """Heads of 32, SDPA, no attention dropout (the fused and the math kernels draw their masks
    differently), dropout on the hidden states (the same masks in every pass of a step)."""
    return bert(hidden_size=64, num_hidden_layers=2, intermediate_size=128, hidden_dropout_prob=0.1,
                attn_implementation="sdpa", **overrides)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_finite_differences_run_the_fused_kernel_on_every_step_and_the_math_kernel_on_none(precision, tmp_path):
    """bf16: flash attention (or cuDNN's); fp32: the memory-efficient kernel, the one that takes fp32."""
    kernels = KernelsPerStep()
    trainer = train(fd_bert(), cuda_args(tmp_path, max_steps=3, bf16=precision == "bf16",
                                         optim_args="hessian_estimator=finite_difference"),
                    Tokens(32, seq_len=16), callbacks=[kernels])

    assert trainer.adahessian.counters == {"step": 3, "hessian_updates": 3, "skipped_hessian_updates": 0,
                                           "skipped_steps": 0}
    assert all(math.isfinite(loss) for loss in logged(trainer))
    assert [hessian for hessian, _ in kernels.steps] == [True, True, True]
    for step, (_, ran) in enumerate(kernels.steps, 1):
        assert ran & SDPA_FUSED and SDPA_MATH not in ran, f"step {step} ran {sorted(ran)}"


def test_finite_difference_estimate_is_within_two_percent_of_the_exact_one_on_cuda(tmp_path):
    """fp32, one Hessian step each, the same probes and dropout masks: the exact estimator on the
    math kernel, finite differences (forward, ε = 1e-3·‖θ‖/‖z‖) on the fused one; relative L2 of
    the signed sums Σ z ⊙ Hz (test_finite_difference.py measured 0.3% on CPU)."""
    sums = {}
    for estimator in ("exact", "finite_difference"):
        record = FirstEstimate()
        train(fd_bert(), cuda_args(tmp_path / estimator, max_steps=1, per_device_train_batch_size=16,
                                   # whole batches: chunks would draw other dropout masks than finite differences
                                   optim_args=f"hessian_estimator={estimator},hessian_chunks=1"),
              Tokens(16, seq_len=12), callbacks=[record])
        sums[estimator] = torch.cat([s.flatten() for s in record.sums])
    assert sums["exact"].is_cuda and sums["exact"].abs().sum() > 0
    assert relative_l2(sums["finite_difference"], sums["exact"]) < 0.02
