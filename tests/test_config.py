import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jlora import LoraConfig


def test_defaults_and_scale():
    cfg = LoraConfig()
    assert (cfg.rank, cfg.alpha, cfg.targets, cfg.init) == (8, 8.0, None, "kaiming_uniform")
    assert LoraConfig(rank=4, alpha=16).scale_for(4, 16) == 4.0
    assert LoraConfig(rank=4, alpha=16, use_rslora=True).scale_for(4, 16) == 8.0


def test_hashable_equal_and_round_trips_through_a_dict():
    cfg = LoraConfig(rank=4, targets=["q_proj"], rank_pattern={"v_proj": 2}, layouts={"c_attn": "oi"},
                     param_dtype=jnp.bfloat16)
    assert hash(cfg) == hash(LoraConfig(**cfg.to_dict()))
    assert LoraConfig(**cfg.to_dict()) == cfg
    assert cfg.replace(rank=2).rank == 2
    replaced = dataclasses.replace(cfg, rank=2)  # passes the kept (pattern, value) pairs back in
    assert replaced == cfg.replace(rank=2) and dict(replaced.rank_pattern) == {"v_proj": 2}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), "rank must be an integer >= 1"),
        (dict(rank=2.5), "rank must be an integer"),
        (dict(alpha=-1), "alpha must be a finite number > 0"),
        (dict(alpha=float("inf")), "alpha must be a finite number > 0, got inf"),
        (dict(targets=5), "targets must be a pattern or a list of patterns, got 5"),
        (dict(targets=["q", 3]), "targets: pattern must be a non-empty string, got 3"),
        (dict(targets=[["q"]]), r"targets: pattern must be a non-empty string, got \['q'\]"),  # unhashable
        (dict(exclude=3), "exclude must be a pattern or a list"),
        (dict(trainable=3), "trainable must be a pattern or a list"),
        (dict(use_rslora="no"), "use_rslora must be True or False"),
        (dict(targets=[]), "targets is empty"),
        (dict(targets=["all-linear", "c_fc"]), "'all-linear' is not a pattern, it stands alone"),
        (dict(dropout=True), "dropout must be in"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(init="xavier"), "init must be one of"),
        (dict(param_dtype=jnp.int32), "param_dtype must be a float"),
        (dict(param_dtype=jnp.float8_e4m3fn), "param_dtype float8_e4m3fn has 8 bits: factors that narrow lose most"),
        (dict(param_dtype=None), "param_dtype None is not a dtype"),
        (dict(targets=b"q"), "targets must be a pattern or a list of patterns, got b'q'"),
        (dict(targets=["q//k"]), "pattern 'q//k' has an empty path component"),
        (dict(targets=["re:"]), "pattern 're:' has an empty regular expression"),
        (dict(ranks=4), "unknown option.*'ranks'.*did you mean 'rank'"),
        (dict(rank_pattern={"q": 0}), r"rank_pattern\['q'\] must be"),
        (dict(targets=["re:(unclosed"]), "not a valid regular expression"),
        (dict(layouts={"c_attn": "xy"}), r"LoraConfig: layouts\['c_attn'\]: layout 'xy': use one letter per kernel axis"),
        (dict(layouts={"c_attn": 3}), "layout 3: use a string"),
    ],
)
def test_bad_options_name_what_is_wrong(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


def test_float16_factors_are_warned_of_as_adam_cannot_train_them():
    with pytest.warns(UserWarning, match=r"float16 factors: optax's Adam\(W\) gives NaN or inf updates where "
                                         "gradients are small"):
        LoraConfig(param_dtype=jnp.float16)
    small = {"a": jnp.full(2, 1e-5, jnp.float16)}  # what the warning says
    tx = optax.adam(1e-3)
    assert not bool(jnp.isfinite(tx.update(small, tx.init(small))[0]["a"]).all())


def test_numpy_scalars_are_numbers():
    cfg = LoraConfig(rank=np.int64(4), alpha=np.float32(8.0), dropout=np.float64(0.1), rank_pattern={"q": np.int32(2)})
    assert (cfg.rank, cfg.alpha, cfg.dropout, dict(cfg.rank_pattern)) == (4, 8.0, 0.1, {"q": 2})
    assert type(cfg.rank) is int and type(dict(cfg.rank_pattern)["q"]) is int  # JSON-able in to_dict
    json.dumps(cfg.to_dict(), default=str)
    from_jax = LoraConfig(rank=jnp.int32(4), alpha=jnp.float32(8), use_rslora=np.bool_(True))
    assert (type(from_jax.rank), type(from_jax.alpha), from_jax.use_rslora) == (int, float, True)


def test_none_means_no_patterns_as_in_peft():
    assert LoraConfig(exclude=None, trainable=None) == LoraConfig()


def test_pattern_lists_may_be_sets_or_tuples():
    assert LoraConfig(targets={"v_proj", "q_proj"}).targets == ("q_proj", "v_proj")
    assert LoraConfig(targets=("q_proj",), exclude={"x"}).exclude == ("x",)
    from_numpy = LoraConfig(targets=np.array(["q_proj", "v_proj"]))  # a column read with numpy or pandas
    assert from_numpy.targets == ("q_proj", "v_proj") and all(type(t) is str for t in from_numpy.targets)
