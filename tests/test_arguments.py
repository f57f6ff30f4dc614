"""hf_adahessian.arguments: ``--optim adahessian`` is a training argument like any other.

It parses (constructor and command line, Trainer and Seq2Seq classes), leaves the
stock optimizer names as they were, survives ``to_dict``/``training_args.bin``/the
model card, carries ``--optim_args`` and the Trainer's own flags to the optimizer
the Trainer builds, and refuses at start-up what AdaHessian cannot run with.
"""

import io
import logging

import pytest
import torch
from transformers import HfArgumentParser, TrainingArguments
from transformers.training_args import OptimizerNames

from hf_adahessian import (
    AdaHessian,
    AdaHessianSeq2SeqTrainingArguments,
    AdaHessianTrainer,
    AdaHessianTrainingArguments,
)
from hf_adahessian.arguments import OPTIM_ARGS, is_adahessian, parse_optim_args
from hf_adahessian.validation import AdaHessianUsageError

ARG_CLASSES = [AdaHessianTrainingArguments, AdaHessianSeq2SeqTrainingArguments]
ALL_OPTIM_KEYS = ["eps", "hessian_power", "hessian_interval", "n_samples", "block_size", "average_conv_kernel",
                  "foreach"]


def parse(args_class, argv):
    (args,) = HfArgumentParser(args_class).parse_args_into_dataclasses(argv)
    return args


def base_argv(tmp_path):
    return ["--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none"]


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("args_class", ARG_CLASSES)
def test_constructor_accepts_optim_adahessian(tmp_path, args_class):
    args = args_class(output_dir=str(tmp_path), optim="adahessian", learning_rate=0.1, use_cpu=True)
    assert args.optim == "adahessian"
    assert is_adahessian(args)


@pytest.mark.parametrize("args_class", ARG_CLASSES)
def test_command_line_accepts_optim_adahessian(tmp_path, args_class):
    args = parse(args_class, base_argv(tmp_path) + ["--optim", "adahessian", "--learning_rate", "0.1",
                                                    "--optim_args", "hessian_interval=2"])
    assert args.optim == "adahessian"
    assert is_adahessian(args)
    assert args.adahessian_settings.optimizer_kwargs["hessian_interval"] == 2


def test_help_lists_adahessian_and_a_misspelt_name_is_rejected(tmp_path, capsys):
    parser = HfArgumentParser(AdaHessianTrainingArguments)
    assert "adahessian" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(base_argv(tmp_path) + ["--optim", "adahesian"])
    assert "invalid choice" in capsys.readouterr().err


def test_seq2seq_command_line_keeps_its_own_flags(tmp_path):
    args = parse(AdaHessianSeq2SeqTrainingArguments,
                 base_argv(tmp_path) + ["--optim", "adahessian", "--learning_rate", "0.1", "--predict_with_generate"])
    assert args.optim == "adahessian"
    assert args.predict_with_generate is True


@pytest.mark.parametrize("name", list(OptimizerNames), ids=lambda n: n.value)
def test_every_stock_optimizer_name_parses_to_the_stock_enum(tmp_path, name):
    args = parse(AdaHessianTrainingArguments, base_argv(tmp_path) + ["--optim", name.value])
    assert type(args.optim) is OptimizerNames
    assert args.optim is name
    assert not is_adahessian(args)


def test_default_optimizer_is_the_stock_default(tmp_path):
    args = AdaHessianTrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    stock = TrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    assert type(args.optim) is OptimizerNames
    assert args.optim is stock.optim
    assert not is_adahessian(args)


def test_set_optimizer_accepts_adahessian(tmp_path):
    args = AdaHessianTrainingArguments(output_dir=str(tmp_path), use_cpu=True)
    args.set_optimizer("adahessian", learning_rate=0.2, beta1=0.8)
    assert is_adahessian(args)
    assert args.learning_rate == 0.2
    assert args.adam_beta1 == 0.8


# --------------------------------------------------------------------------- persistence


def test_to_dict_and_json_say_adahessian(tmp_path):
    args = AdaHessianTrainingArguments(output_dir=str(tmp_path), optim="adahessian", learning_rate=0.1, use_cpu=True)
    assert args.to_dict()["optim"] == "adahessian"
    assert '"optim": "adahessian"' in args.to_json_string()


@pytest.mark.parametrize("args_class", ARG_CLASSES)
def test_optim_survives_training_args_bin(tmp_path, args_class):
    """``training_args.bin`` is ``torch.save(args)``: loading it back must give adahessian again."""
    args = args_class(output_dir=str(tmp_path), optim="adahessian", learning_rate=0.1, use_cpu=True,
                      optim_args="hessian_interval=4")
    buffer = io.BytesIO()
    torch.save(args, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is args_class
    assert loaded.optim == "adahessian"
    assert is_adahessian(loaded)
    assert loaded.adahessian_settings.optimizer_kwargs["hessian_interval"] == 4


def test_model_card_names_adahessian(make_args, make_bert, make_dataset, tmp_path):
    args = make_args(output_dir=str(tmp_path / "card"), optim_args="hessian_interval=2")
    trainer = AdaHessianTrainer(model=make_bert(), args=args, train_dataset=make_dataset(16))
    trainer.create_model_card(model_name="tiny-bert")
    card = (tmp_path / "card" / "README.md").read_text()
    assert "adahessian" in card.lower()
    assert "hessian_interval=2" in card


# --------------------------------------------------------------------------- --optim_args to the optimizer


def test_optim_args_and_trainer_flags_reach_the_optimizer(make_args, make_bert, make_dataset):
    args = make_args(
        learning_rate=0.2, adam_beta1=0.8, adam_beta2=0.99, weight_decay=0.01, seed=123,
        optim_args="hessian_power=0.5, hessian_interval=3, block_size=4, n_samples=2, eps=1e-6,"
                   "average_conv_kernel=false, foreach=false, fused=false",
    )
    model = make_bert()
    trainer = AdaHessianTrainer(model=model, args=args, train_dataset=make_dataset(16))
    torch.manual_seed(7)  # the probes' seed is --seed, whatever the global RNG says
    trainer.create_optimizer()
    optimizer = trainer.adahessian
    assert isinstance(optimizer, AdaHessian)
    assert optimizer.hessian_interval == 3
    assert optimizer.n_samples == 2
    assert optimizer.seed == 123
    for group in optimizer.param_groups:
        assert group["lr"] == 0.2
        assert group["betas"] == (0.8, 0.99)
        assert group["eps"] == 1e-6
        assert group["hessian_power"] == 0.5
        assert group["block_size"] == 4
        assert group["average_conv_kernel"] is False
        assert group["foreach"] is False
        assert group["fused"] is False

    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.01 for p in g["params"]}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decay | no_decay == set(names.values())
    assert "bert.encoder.layer.0.attention.self.query.weight" in decay
    assert "classifier.weight" in decay
    assert all(not n.endswith(".bias") and "LayerNorm" not in n for n in decay)
    assert "bert.encoder.layer.0.attention.self.query.bias" in no_decay
    assert "bert.embeddings.LayerNorm.weight" in no_decay


def test_optim_args_default_to_the_recipe(make_args, make_bert, make_dataset):
    trainer = AdaHessianTrainer(model=make_bert(), args=make_args(), train_dataset=make_dataset(16))
    trainer.create_optimizer()
    optimizer = trainer.adahessian
    assert optimizer.hessian_interval == OPTIM_ARGS["hessian_interval"][1] == 1
    assert optimizer.n_samples == 1
    group = optimizer.param_groups[0]
    assert group["eps"] == 1e-4
    assert group["hessian_power"] == 1.0


def test_command_line_optim_args_reach_the_optimizer(tmp_path, make_bert, make_dataset):
    args = parse(AdaHessianTrainingArguments, base_argv(tmp_path) + [
        "--optim", "adahessian", "--learning_rate", "0.15", "--weight_decay", "0.1",
        "--optim_args", "hessian_interval=5,block_size=32,n_samples=3,time_weighted=true",
    ])
    trainer = AdaHessianTrainer(model=make_bert(), args=args, train_dataset=make_dataset(16))
    trainer.create_optimizer()
    optimizer = trainer.adahessian
    assert (optimizer.hessian_interval, optimizer.n_samples, optimizer.time_weighted) == (5, 3, True)
    assert {g["block_size"] for g in optimizer.param_groups} == {32}
    assert {g["lr"] for g in optimizer.param_groups} == {0.15}
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.1]


# --------------------------------------------------------------------------- refused at construction


def test_unknown_optim_args_key_is_refused_listing_the_accepted_keys(tmp_path):
    with pytest.raises(ValueError) as err:
        AdaHessianTrainingArguments(output_dir=str(tmp_path), optim="adahessian", learning_rate=0.1, use_cpu=True,
                                    optim_args="hessian_intervall=2")
    message = str(err.value)
    assert "hessian_intervall" in message
    for key in ALL_OPTIM_KEYS:
        assert key in message


@pytest.mark.parametrize("optim_args, key", [
    ("eps=small", "eps"),
    ("hessian_power=one", "hessian_power"),
    ("hessian_interval=2.5", "hessian_interval"),
    ("n_samples=x", "n_samples"),
    ("block_size=", "block_size"),
    ("foreach=maybe", "foreach"),
    ("fused=maybe", "fused"),
    ("hessian_batch_fraction=half", "hessian_batch_fraction"),
    ("stale_guard=true,stale_guard_reference=mean", "stale_guard_reference"),
])
def test_non_number_optim_arg_is_refused_naming_the_key(tmp_path, optim_args, key):
    with pytest.raises(ValueError, match=key):
        AdaHessianTrainingArguments(output_dir=str(tmp_path), optim="adahessian", learning_rate=0.1, use_cpu=True,
                                    optim_args=optim_args)


@pytest.mark.parametrize("optim_args, key", [
    ("hessian_power=1.5", "hessian_power"),
    ("hessian_power=-0.1", "hessian_power"),
    ("eps=0", "eps"),
    ("eps=-1e-4", "eps"),
    ("hessian_interval=0", "hessian_interval"),
    ("hessian_warmup=15,hessian_warmup_interval=0", "hessian_warmup_interval"),
    ("n_samples=0", "n_samples"),
    # Finite differences take one probe: a second would need a gradient pass of its own.
    ("n_samples=4,hessian_estimator=finite_difference", "n_samples"),
    ("block_size=0", "block_size"),
    ("hessian_batch_fraction=0", "hessian_batch_fraction"),
    ("hessian_batch_fraction=1.5", "hessian_batch_fraction"),
    # It says what the stale guard compares with: nothing to say with the guard off.
    ("stale_guard_reference=average", "stale_guard_reference"),
])
def test_out_of_range_optim_arg_is_refused_naming_the_key(tmp_path, optim_args, key):
    with pytest.raises(ValueError, match=key):
        AdaHessianTrainingArguments(output_dir=str(tmp_path), optim="adahessian", learning_rate=0.1, use_cpu=True,
                                    optim_args=optim_args)


@pytest.mark.parametrize("flags, words", [
    ({"learning_rate": -0.1}, ["--learning_rate", "-0.1", "positive"]),
    ({"learning_rate": 0.0}, ["--learning_rate", "positive"]),
    ({"adam_beta1": 1.0}, ["--adam_beta1/--adam_beta2", "[0, 1)"]),
    ({"adam_beta2": -0.5}, ["--adam_beta1/--adam_beta2", "[0, 1)"]),
    ({"weight_decay": -1.0}, ["--weight_decay", ">= 0"]),
    ({"optim_args": "eps=inf"}, ["--optim_args", "eps=inf", "finite"]),
    ({"optim_args": "eps=1e400"}, ["--optim_args", "eps=inf", "finite"]),
    ({"optim_args": "hessian_interval=2,hessian_interval=5"}, ["hessian_interval", "twice"]),
    ({"optim_args": "hessian interval=3"}, ["'hessian interval'", "not a key"]),
    ({"optim_args": "hessian_estimator=secant"}, ["hessian_estimator", "exact", "finite_difference"]),
    ({"optim_args": "hessian_chunks=0"}, ["hessian_chunks", ">= 1"]),
    ({"optim_args": "hessian_estimator=finite_difference,hessian_chunks=2"},
     ["hessian_chunks", "exact estimator"]),
])
def test_bad_trainer_flags_for_adahessian_fail_at_construction_naming_the_flag(tmp_path, flags, words, caplog):
    """Used to surface as a traceback from the optimizer at train() (after an Adam-like-lr warning for a
    negative lr), or not at all (eps=inf trained nothing; a repeated key silently kept the last)."""
    common = dict(output_dir=str(tmp_path), learning_rate=0.1, use_cpu=True)
    with caplog.at_level(logging.WARNING, logger="hf_adahessian.arguments"):
        with pytest.raises(AdaHessianUsageError) as err:
            AdaHessianTrainingArguments(optim="adahessian", **{**common, **flags})
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    assert not caplog.records  # no learning-rate hint before the error
    AdaHessianTrainingArguments(optim="adamw_torch", **{**common, **flags})  # other optimizers are left alone


def test_optim_args_keys_are_the_constructors_arguments_plus_the_trainers():
    """Derived, not hand-kept: every AdaHessian.__init__ argument that has no Trainer flag is a key,
    with the constructor's default, and the trainer adds its own two."""
    import inspect

    signature = inspect.signature(AdaHessian.__init__).parameters
    own = {name: p.default for name, p in signature.items()
           if name not in ("self", "params", "lr", "betas", "weight_decay", "seed")}
    assert {k: v[1] for k, v in OPTIM_ARGS.items() if k in own} == own
    assert set(OPTIM_ARGS) - set(own) == {"hessian_batch_fraction", "hessian_chunks"}


@pytest.mark.parametrize("optim_args, chunks, shown", [
    ("", None, "auto"), ("hessian_chunks=auto", None, "auto"), ("hessian_chunks=3", 3, "3"),
    ("hessian_estimator=finite_difference", None, "auto"),
])
def test_hessian_chunks_default_to_auto_and_take_a_count(optim_args, chunks, shown):
    """``auto`` (None) leaves the count to the trainer's rule (``chunking.py``), for either estimator;
    the settings print it as it is written."""
    settings = parse_optim_args(optim_args)
    assert settings.hessian_chunks == chunks
    assert f"hessian_chunks={shown}" in str(settings)
    assert parse_optim_args(str(settings)) == settings


def test_bad_optim_args_fail_on_the_command_line_too(tmp_path):
    with pytest.raises(ValueError, match="hessian_power"):
        parse(AdaHessianTrainingArguments, base_argv(tmp_path) + [
            "--optim", "adahessian", "--learning_rate", "0.1", "--optim_args", "hessian_power=3"])


def test_adam_like_learning_rate_warns_with_the_recipe(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_adahessian.arguments"):
        AdaHessianTrainingArguments(output_dir=str(tmp_path), optim="adahessian", learning_rate=5e-5, use_cpu=True)
    warnings = [r for r in caplog.records if r.name == "hf_adahessian.arguments" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "5e-05" in message
    assert "recipe" in message


def test_adahessian_learning_rate_does_not_warn(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_adahessian.arguments"):
        AdaHessianTrainingArguments(output_dir=str(tmp_path), optim="adahessian", learning_rate=0.15, use_cpu=True)
        AdaHessianTrainingArguments(output_dir=str(tmp_path), optim="adamw_torch", learning_rate=5e-5, use_cpu=True)
    assert not [r for r in caplog.records if r.name == "hf_adahessian.arguments"]


@pytest.mark.parametrize("extra, flag", [
    ({"fsdp": True}, "--fsdp"),
    ({"torch_compile": True}, "--torch_compile"),
])
def test_fsdp_and_torch_compile_are_refused_at_start_up(tmp_path, extra, flag):
    common = dict(output_dir=str(tmp_path), learning_rate=0.1, use_cpu=True)
    AdaHessianTrainingArguments(optim="adamw_torch", **common, **extra)  # the stock optimizer is left alone
    with pytest.raises(ValueError) as err:
        AdaHessianTrainingArguments(optim="adahessian", **common, **extra)
    message = str(err.value)
    assert flag in message
    assert "adahessian" in message


def test_fsdp_with_the_exact_estimator_is_refused_naming_finite_differences(tmp_path):
    with pytest.raises(ValueError) as err:
        AdaHessianTrainingArguments(output_dir=str(tmp_path), optim="adahessian", learning_rate=0.1, use_cpu=True,
                                    fsdp="full_shard", optim_args="hessian_estimator=exact")
    message = str(err.value)
    assert "--fsdp" in message and "hessian_estimator=finite_difference" in message


def test_fsdp2_with_finite_differences_is_accepted(tmp_path):
    args = AdaHessianTrainingArguments(output_dir=str(tmp_path), optim="adahessian", learning_rate=0.1, use_cpu=True,
                                       fsdp="full_shard", fsdp_config={"version": 2},
                                       optim_args="hessian_estimator=finite_difference")
    assert args.fsdp and args.adahessian_settings.optimizer_kwargs["hessian_estimator"] == "finite_difference"


def test_fsdp1_is_refused_at_start_up(tmp_path):
    with pytest.raises(ValueError) as err:
        AdaHessianTrainingArguments(output_dir=str(tmp_path), optim="adahessian", learning_rate=0.1, use_cpu=True,
                                    fsdp="full_shard", fsdp_config={"version": 1},
                                    optim_args="hessian_estimator=finite_difference")
    assert "FSDP2" in str(err.value) and "version" in str(err.value)


@pytest.fixture
def deepspeed_stubbed(monkeypatch):
    """The stock ``__post_init__`` builds DeepSpeed's config objects, which need the deepspeed
    package (not installed here): stand-ins let a ``deepspeed=...`` argument be constructed."""
    import accelerate.utils
    import transformers.integrations.deepspeed

    class Config:
        def __init__(self, config):
            self.config = config

        def trainer_config_process(self, args):
            pass

    monkeypatch.setattr(transformers.integrations.deepspeed, "HfTrainerDeepSpeedConfig", Config)
    monkeypatch.setattr(accelerate.utils, "DeepSpeedPlugin", lambda **kwargs: None)


def test_deepspeed_is_refused_at_start_up(tmp_path, deepspeed_stubbed):
    common = dict(output_dir=str(tmp_path), learning_rate=0.1, use_cpu=True,
                  deepspeed={"train_micro_batch_size_per_gpu": "auto"})
    AdaHessianTrainingArguments(optim="adamw_torch", **common)  # the stock optimizer is left alone
    with pytest.raises(ValueError) as err:
        AdaHessianTrainingArguments(optim="adahessian", **common)
    assert "--deepspeed" in str(err.value)
    assert "adahessian" in str(err.value)


def test_set_optimizer_adahessian_refuses_deepspeed(tmp_path):
    """The same check runs when ``set_optimizer`` switches existing arguments to AdaHessian."""
    args = AdaHessianTrainingArguments(output_dir=str(tmp_path), learning_rate=0.1, use_cpu=True)
    args.deepspeed = {"train_micro_batch_size_per_gpu": "auto"}
    with pytest.raises(ValueError, match="--deepspeed"):
        args.set_optimizer("adahessian", learning_rate=0.1)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing:FutureWarning")  # the deprecated alias
@pytest.mark.parametrize("name", ["gradient_checkpointing", "activation_checkpointing"])
def test_reentrant_checkpointing_is_refused(tmp_path, name):
    with pytest.raises(ValueError, match="use_reentrant") as err:
        AdaHessianTrainingArguments(output_dir=str(tmp_path), optim="adahessian", learning_rate=0.1, use_cpu=True,
                                    **{name: True, f"{name}_kwargs": {"use_reentrant": True}})
    assert "adahessian" in str(err.value)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing:FutureWarning")  # the deprecated alias
def test_reentrant_checkpointing_is_refused_on_the_command_line(tmp_path):
    with pytest.raises(ValueError, match="use_reentrant"):
        parse(AdaHessianTrainingArguments, base_argv(tmp_path) + [
            "--optim", "adahessian", "--learning_rate", "0.1", "--gradient_checkpointing",
            "--gradient_checkpointing_kwargs", '{"use_reentrant": true}'])


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing:FutureWarning")  # the deprecated alias
def test_non_reentrant_checkpointing_is_accepted(tmp_path):
    args = AdaHessianTrainingArguments(output_dir=str(tmp_path), optim="adahessian", learning_rate=0.1, use_cpu=True,
                                       gradient_checkpointing=True,
                                       gradient_checkpointing_kwargs={"use_reentrant": False})
    assert is_adahessian(args)
    assert args.activation_checkpointing is True
