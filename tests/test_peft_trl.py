"""PEFT adapters and TRL's SFTTrainer with AdaHessian.

PEFT: only the trainable adapter tensors get probes and optimizer state, the Hessian
flows through the frozen base (which stays bitwise unchanged), adapter checkpoints
resume bit for bit; for LoRA on a classifier and on a causal LM, and IA³.

TRL: ``AdaHessianSFTTrainer`` (and a user's own ``AdaHessianTrainerMixin`` subclass of
``SFTTrainer``) train a tiny causal LM with both estimators; the loss is normalised
the same whatever the accumulation, as the Trainer's is.
"""

import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

from hf_adahessian import AdaHessianTrainer, AdaHessianTrainerMixin
from optim_helpers import assert_all_equal

peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'hf-adahessian[peft]')")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_gpt2(seed=0, vocab=64):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def lm_dataset(n=32, length=12, vocab=64, seed=0):
    ids = torch.randint(1, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
    ids[:, 1::2] = (ids[:, 0::2] * 7 + 3) % vocab  # a learnable pattern
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def lora(model, task, targets, **kwargs):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task, lora_dropout=0.0, **kwargs)
    return peft.get_peft_model(model, config)


ADAPTERS = {
    "lora-classifier": lambda make_bert: lora(make_bert(), "SEQ_CLS", ["query", "value"]),
    "lora-causal-lm": lambda make_bert: lora(tiny_gpt2(), "CAUSAL_LM", ["c_attn"], fan_in_fan_out=True),
    "ia3-causal-lm": lambda make_bert: peft.get_peft_model(tiny_gpt2(), peft.IA3Config(
        task_type="CAUSAL_LM", target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
        fan_in_fan_out=True)),
}


def data_for(name, make_dataset):
    return make_dataset(32) if name == "lora-classifier" else lm_dataset()


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_only_the_adapters_are_trained_and_the_frozen_base_is_bitwise_unchanged(name, make_args, make_bert,
                                                                                make_dataset):
    model = ADAPTERS[name](make_bert)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and frozen
    trainer = AdaHessianTrainer(model=model, args=make_args(max_steps=3, per_device_train_batch_size=8),
                                train_dataset=data_for(name, make_dataset))
    trainer.train()
    optimizer = trainer.adahessian
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[i] for i in in_optimizer} == trainable
    assert {names[id(p)] for p in optimizer.state} == trainable  # probes and state for adapters only
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n
    assert optimizer.counters["hessian_updates"] == 3
    # The Hessian reached every adapter tensor through the frozen base.
    for p in optimizer.state:
        assert optimizer.state[p]["exp_hessian_diag_sq"].abs().sum() > 0, names[id(p)]


@pytest.mark.parametrize("name", ["lora-classifier", "lora-causal-lm"])
def test_resuming_an_adapter_checkpoint_continues_bit_for_bit(name, make_args, make_bert, make_dataset, tmp_path):
    dataset = data_for(name, make_dataset)
    common = dict(max_steps=6, per_device_train_batch_size=4, save_strategy="steps", save_steps=3,
                  optim_args="hessian_interval=2")
    straight = AdaHessianTrainer(model=ADAPTERS[name](make_bert), train_dataset=dataset,
                                 args=make_args(output_dir=str(tmp_path / "a"), **common))
    straight.train()
    resumed = AdaHessianTrainer(model=ADAPTERS[name](make_bert), train_dataset=dataset,
                                args=make_args(output_dir=str(tmp_path / "b"), **common))
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"))
    assert (tmp_path / "a" / "checkpoint-3" / "adapter_model.safetensors").exists()
    trainable = lambda t: [p.detach() for p in t.model.parameters() if p.requires_grad]  # noqa: E731
    assert_all_equal(trainable(resumed), trainable(straight), "adapter tensor")
    assert resumed.adahessian.counters == straight.adahessian.counters


def test_tied_input_and_output_embeddings_are_one_tensor_in_the_optimizer(make_args):
    model = tiny_gpt2()
    assert model.transformer.wte.weight is model.lm_head.weight
    trainer = AdaHessianTrainer(model=model, args=make_args(max_steps=2), train_dataset=lm_dataset())
    trainer.train()
    params = [p for g in trainer.adahessian.param_groups for p in g["params"]]
    assert sum(p is model.lm_head.weight for p in params) == 1
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))
    assert model.transformer.wte.weight is model.lm_head.weight


# --------------------------------------------------------------------------- TRL

trl = pytest.importorskip("trl", reason="trl is not installed (pip install 'hf-adahessian[trl]')")


def sft_texts():
    words = ["a man", "a dog", "two children", "a woman", "the team"]
    verbs = ["runs", "plays", "reads a book", "rides a bike", "sings"]
    return Dataset.from_dict({"text": [f"{w} {v} in the park ." for w in words for v in verbs] * 2})


@pytest.fixture(scope="module")
def causal_lm_folder(tmp_path_factory):
    from hf_adahessian.examples.models import build_model_folder

    texts = sft_texts()["text"]
    return build_model_folder("gpt2", str(tmp_path_factory.mktemp("gpt2")), texts, size="tiny", vocab_size=200,
                              max_position_embeddings=32)


def sft_trainer(folder, tmp_path, trainer_class=None, **config):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_adahessian.trl_trainer import AdaHessianSFTConfig, AdaHessianSFTTrainer

    config = {"optim": "adahessian", "learning_rate": 0.05, "max_steps": 3, "per_device_train_batch_size": 4,
              "max_grad_norm": 1.0, **config}
    args = AdaHessianSFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], save_strategy="no",
                               disable_tqdm=True, logging_steps=1, seed=0, max_length=16,
                               train_sampling_strategy="sequential", **config)
    torch.manual_seed(0)
    # No dropout, and rows of one length: otherwise a batch of 4 and two of 2 draw other masks and pad
    # differently, and are different problems (for AdamW too).
    model = AutoModelForCausalLM.from_pretrained(folder, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    rows = lm_dataset(n=40, length=12, vocab=model.config.vocab_size).remove_columns("labels")
    return (trainer_class or AdaHessianSFTTrainer)(model=model, args=args, train_dataset=rows,
                                                   processing_class=AutoTokenizer.from_pretrained(folder))


def test_exact_hessian_through_trl_fails_in_its_fused_kernel_without_the_route_around(causal_lm_folder, tmp_path,
                                                                                     monkeypatch):
    """The kernel TRL's loss runs through (trl.kernels.chunked_logprob) has no double backward."""
    import hf_adahessian.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "_has_fused_lm_head", lambda trainer: False)
    trainer = sft_trainer(causal_lm_folder, tmp_path)
    with pytest.raises(RuntimeError):
        trainer.train()


def test_sft_losses_are_normalised_as_trls_whatever_the_estimator_and_the_accumulation(causal_lm_folder, tmp_path):
    """TRL normalises its NLL by the item count across accumulation steps (and processes). The exact
    estimator's route around TRL's kernel computes the same loss as TRL's kernel does; and 2 x 2
    micro-batches give the loss, gradient norm and Hessian mean of one batch of 4 on step 1, to within
    what TRL's own accumulation gives AdamW (its gradients differ by 0.2% between the two, measured);
    a normalisation error would be a factor of 2. (Later steps are not compared: in a tiny GPT-2 the
    key biases have a zero gradient in exact arithmetic, and any Adam-type step turns their
    rounding into a full step, AdamW's too.)"""
    first = {}
    for estimator in ("exact", "finite_difference"):
        for batch, steps in [(4, 1), (2, 2)]:
            trainer = sft_trainer(causal_lm_folder, tmp_path / f"{estimator}{batch}", max_steps=1,
                                  per_device_train_batch_size=batch, gradient_accumulation_steps=steps,
                                  optim_args=f"hessian_estimator={estimator},eps=1e-2")
            trainer.train()
            (first[estimator, steps],) = [h for h in trainer.state.log_history if "hessian_mean" in h
                                          and "train_runtime" not in h]
    assert first["exact", 1]["loss"] == pytest.approx(first["finite_difference", 1]["loss"], rel=1e-5)
    for estimator in ("exact", "finite_difference"):
        large, accumulated = first[estimator, 1], first[estimator, 2]
        assert accumulated["loss"] == pytest.approx(large["loss"], rel=1e-5)
        assert accumulated["grad_norm"] == pytest.approx(large["grad_norm"], rel=5e-3)
        assert accumulated["hessian_mean"] == pytest.approx(large["hessian_mean"], rel=2e-2)


def test_a_users_own_sft_subclass_takes_the_mixin_first(causal_lm_folder, tmp_path):
    class MySFTTrainer(AdaHessianTrainerMixin, trl.SFTTrainer):
        pass

    trainer = sft_trainer(causal_lm_folder, tmp_path, trainer_class=MySFTTrainer)
    trainer.train()
    assert trainer.adahessian is not None and trainer.adahessian.counters["hessian_updates"] == 3


def test_trl_loss_types_the_exact_estimator_cannot_route_around_are_refused(causal_lm_folder, tmp_path):
    from hf_adahessian.validation import AdaHessianUsageError

    with pytest.raises(AdaHessianUsageError, match="loss_type='dft'.*finite_difference"):
        sft_trainer(causal_lm_folder, tmp_path, loss_type="dft")
    sft_trainer(causal_lm_folder, tmp_path, loss_type="dft", optim_args="hessian_estimator=finite_difference")
