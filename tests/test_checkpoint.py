"""Orbax adapter checkpoints: exact round trips, retention, size, and crash safety."""

import gc
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora.checkpoint import AdapterCheckpointer
from oracle import perturb
from quantized import quantize

KEY = jax.random.key(0)


def setup():
    base = {"q": {"kernel": jax.random.normal(KEY, (64, 64)), "bias": jnp.zeros(64)}, "out": {"kernel": jnp.ones((64, 8))}}
    cfg = jlora.LoraConfig(rank=4, targets=["q"], trainable=["q/bias"])
    params = perturb(jlora.lora_init(KEY, base, cfg), KEY)
    tx = jlora.optimizer(optax.adam(1e-2), params)
    return base, cfg, params, tx


def test_round_trip_is_bit_exact_with_optimizer_state(tmp_path):
    base, cfg, params, tx = setup()
    trainable, _ = jlora.split(params)
    opt_state = tx.init(trainable)
    g = jax.tree.map(jnp.ones_like, trainable)
    _, opt_state = tx.update(g, opt_state, trainable)
    ckpt = AdapterCheckpointer(tmp_path / "ckpt", lora_config=cfg)
    ckpt.save(7, params, opt_state=opt_state)
    ckpt.wait()
    back, state_back, step = AdapterCheckpointer(tmp_path / "ckpt").restore(base, opt_state_like=tx.init(trainable))
    assert step == 7
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    jax.tree.map(np.testing.assert_array_equal, state_back, opt_state)


def test_a_restored_state_is_placed_as_new_arrays_are_and_compiles_no_step_again(tmp_path):
    """lora_init and tx.init make uncommitted arrays: restored ones committed to a device would be
    other inputs to the compiled step (one more compile); a base put on a device keeps its device."""
    base, cfg, params, tx = setup()
    trainable, frozen = jlora.split(params)
    opt_state = tx.init(trainable)
    step = jax.jit(lambda t, s: tx.update(jax.tree.map(jnp.ones_like, t), s, t)[1])
    step(trainable, opt_state)
    ckpt = AdapterCheckpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, params, opt_state=opt_state)
    back, state_back, _ = ckpt.restore(base, opt_state_like=opt_state)
    assert not any(x.committed for x in jax.tree.leaves((jlora.split(back)[0], state_back)))
    step(jlora.split(back)[0], state_back)
    assert step._cache_size() == 1
    back, state_back, _ = ckpt.restore({**base, "q": {**base["q"], "kernel": quantize(base["q"]["kernel"])}},
                                       opt_state_like=opt_state)  # over an int8 base (QLoRA) alike
    assert not any(x.committed for x in jax.tree.leaves((jlora.split(back)[0], state_back)))
    device = jax.devices()[-1]
    back, state_back, _ = ckpt.restore(jax.device_put(base, device), opt_state_like=jax.device_put(opt_state, device))
    assert all(x.committed and x.devices() == {device} for x in jax.tree.leaves((jlora.split(back)[0], state_back)))


def test_the_lora_config_is_kept_with_each_step(tmp_path):
    base, cfg, params, _ = setup()
    with AdapterCheckpointer(tmp_path / "ckpt", lora_config=cfg, async_save=False) as ckpt:
        ckpt.save(1, params)
        ckpt.save(2, params)
    reader = AdapterCheckpointer(tmp_path / "ckpt")
    assert reader.saved_config() == cfg and reader.saved_config(1) == cfg
    # the saved config makes the same adapters again (lora_init for a new run, say)
    assert jax.tree.structure(jlora.lora_init(KEY, base, reader.saved_config())) == jax.tree.structure(params)
    with pytest.raises(ValueError, match=r"lora_config makes 'q/kernel' rank 8, .*; the adapter there has rank 4"
                                         r".*a rank cut: one whose rank_pattern and alpha_pattern say so, or "
                                         r"none\)"):
        AdapterCheckpointer(tmp_path / "other", lora_config=cfg.replace(rank=8), async_save=False).save(1, params)
    # one that makes fewer adapters or trained leaves than the params hold (its rebuild would lack them)
    more = jlora.lora_init(KEY, base, cfg.replace(targets=("q", "out")))
    with pytest.raises(ValueError, match=r"AdapterCheckpointer.save: lora_config makes no adapter \(its targets are "
                                         r"\['q'\]\) at 'out/kernel', where the params hold one; pass the LoraConfig"):
        AdapterCheckpointer(tmp_path / "fewer", lora_config=cfg, async_save=False).save(1, more)
    with pytest.raises(ValueError, match=r"lora_config makes no adapter .* at 'out/kernel'"):  # a training loop's half
        AdapterCheckpointer(tmp_path / "fewer", lora_config=cfg, async_save=False).save(1, jlora.split(more)[0])
    with pytest.raises(ValueError, match=r"save_adapter: lora_config makes no leaf trained whole \(its trainable is "
                                         r"\[\]\) at 'q/bias', where the params hold one; .* one that names it in trainable\)$"):
        jlora.adapter.save_adapter(tmp_path / "untrained", params, lora_config=cfg.replace(trainable=()))
    # the tree lora_init made, held with a head of the caller's beside it: the config is the model's
    jlora.adapter.save_adapter(tmp_path / "beside", {"model": params, "head": jlora.Trainable(jnp.ones((8, 2)))},
                               lora_config=cfg)
    with AdapterCheckpointer(tmp_path / "none", async_save=False) as bare:
        bare.save(1, params)
        assert bare.saved_config() is None
    with pytest.raises(ValueError, match="no checkpoint of step 5; steps: \\[1, 2\\]"):
        reader.saved_config(5)
    with pytest.raises(ValueError, match="lora_config must be the jlora.LoraConfig .* got dict"):
        AdapterCheckpointer(tmp_path / "other", lora_config=cfg.to_dict())


def test_a_resume_with_another_lora_config_is_refused_at_restore(tmp_path):
    """A checkpointer's lora_config is the one its adapters were made with: restoring adapters of
    another (an edited alpha) is refused then, not after hours of training at the next save (or never:
    a dropout, a param_dtype), naming the fields that differ."""
    base, cfg, params, tx = setup()
    AdapterCheckpointer(tmp_path / "ckpt", lora_config=cfg, async_save=False).save(1, params, opt_state=tx.init(params))
    edited = cfg.replace(alpha=32.0, dropout=0.1)
    with pytest.raises(ValueError, match=r"AdapterCheckpointer.restore: step 1 of .* was saved with another LoraConfig "
                                         r"than this checkpointer's lora_config \(alpha=8.0 there, 32.0 here\): to go "
                                         r"on training those adapters, pass lora_config="):
        AdapterCheckpointer(tmp_path / "ckpt", lora_config=edited).restore(base, opt_state_like=tx.init(params))
    with pytest.raises(ValueError, match=r"\(targets=\['q'\] there, \['k', 'q'\] here\)"):
        AdapterCheckpointer(tmp_path / "ckpt", lora_config=cfg.replace(targets=("q", "k"))).restore(base)
    # the same adapters: patterns in another order (a set's, in a new process), what only starts training
    AdapterCheckpointer(tmp_path / "patterns", lora_config=cfg.replace(rank_pattern={"q": 4, "out": 2}),
                        async_save=False).save(1, params)
    AdapterCheckpointer(tmp_path / "patterns", lora_config=cfg.replace(rank_pattern={"out": 2, "q": 4})).restore(base)
    for same in (cfg, jlora.LoraConfig(**cfg.to_dict()), None, cfg.replace(dropout=0.1, init="gaussian")):
        restored, _, _ = AdapterCheckpointer(tmp_path / "ckpt", lora_config=same).restore(base)
        assert restored["q"]["kernel"].scale == params["q"]["kernel"].scale
    # a step saved without a config: its adapters are checked as a save checks them
    AdapterCheckpointer(tmp_path / "bare", async_save=False).save(1, params)
    with pytest.raises(ValueError, match=r"AdapterCheckpointer.restore: lora_config makes 'q/kernel' scale 8; the "
                                         r"adapter there has scale 2: pass the LoraConfig"):  # what differs, only
        AdapterCheckpointer(tmp_path / "bare", lora_config=edited).restore(base)
    AdapterCheckpointer(tmp_path / "bare", lora_config=cfg).restore(base)


def test_an_optimizer_state_of_other_targets_is_refused_by_path(tmp_path):
    """Targets of the same shapes give a state of the same leaf count and shapes: only the paths tell."""
    base = {"l1": {"kernel": jnp.ones((8, 8))}, "l2": {"kernel": jnp.ones((8, 8))}}
    state_of = lambda target: (lambda p: jlora.optimizer(optax.adam(1e-2), p).init(p))(
        jlora.lora_init(KEY, base, jlora.LoraConfig(rank=2, targets=[target])))
    ckpt = AdapterCheckpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, jlora.lora_init(KEY, base, jlora.LoraConfig(rank=2, targets=["l1"])), opt_state=state_of("l1"))
    with pytest.raises(ValueError, match=r"opt_state_like.*\['l2'\]\['kernel'\].a is where step 1 saved "
                                         r"opt_state.*\['l1'\]\['kernel'\].a.*other targets"):
        ckpt.restore(base, opt_state_like=state_of("l2"))
    ckpt.restore(base, opt_state_like=state_of("l1"))
    # refused at save too: a step that could never be restored with these params' state is not written
    params = jlora.lora_init(KEY, base, jlora.LoraConfig(rank=2, targets=["l1"]))
    with pytest.raises(ValueError, match=r"^AdapterCheckpointer.save: opt_state.*\['l2'\]\['kernel'\] is kept for an "
                                         r"adapter at 'l2/kernel', and params have none there \(the state of other "
                                         r"targets\? params adapt \['l1/kernel'\]\)"):
        ckpt.save(2, params, opt_state=state_of("l2"))
    assert ckpt.all_steps() == [1]
    # a state of another rank is warned of (a transformation may keep a state of its own shape), and saved
    rank4 = jlora.lora_init(KEY, base, jlora.LoraConfig(rank=4, targets=["l1"]))
    with pytest.warns(UserWarning, match=r"^AdapterCheckpointer.save: opt_state.*\['l1'\]\['kernel'\].a has shape "
                                         r"\(8, 4\), the adapter's a at 'l1/kernel' \(8, 2\): the state of another "
                                         r"rank\? A restore with the state of these params \(opt_state_like\) will "
                                         r"refuse this step") as warned:
        assert ckpt.save(2, jlora.split(params)[0], opt_state=jlora.optimizer(optax.adam(1e-2), rank4).init(rank4))
    assert warned[0].filename == __file__  # where save was called
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adafactor = jlora.optimizer(optax.adafactor(1e-2, min_dim_size_to_factor=2), params)  # factored: other axes
        assert ckpt.save(3, params, opt_state=adafactor.init(params))
        # two towers adapted apart (another rank each) share their relative paths: each state fits one of them
        towers = {"text": params, "vision": rank4}
        assert ckpt.save(4, towers, opt_state=jlora.optimizer(optax.adam(1e-2), towers).init(towers))


def test_factors_of_two_dtypes_round_trip(tmp_path):
    base, cfg, params, tx = setup()
    params["q"]["kernel"] = params["q"]["kernel"].replace(b=params["q"]["kernel"].b.astype(jnp.bfloat16))
    ckpt = AdapterCheckpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, params)
    back = ckpt.restore(base)[0]["q"]["kernel"]
    assert (back.a.dtype, back.b.dtype) == (jnp.float32, jnp.bfloat16)
    np.testing.assert_array_equal(back.b, params["q"]["kernel"].b)


def test_restore_onto_a_quantized_base(tmp_path):
    """The adapters and optimizer state as on the float base, over the lazy (int8) kernel itself."""
    base, cfg, params, tx = setup()
    trainable, _ = jlora.split(params)
    ckpt = AdapterCheckpointer(tmp_path / "ckpt", lora_config=cfg, async_save=False)
    ckpt.save(3, params, opt_state=tx.init(trainable))
    q8 = quantize(base["q"]["kernel"])
    back, state, _ = ckpt.restore({**base, "q": {**base["q"], "kernel": q8}}, opt_state_like=tx.init(trainable))
    assert back["q"]["kernel"].w is q8
    back["q"]["kernel"] = back["q"]["kernel"].replace(w=base["q"]["kernel"])
    jax.tree.map(np.testing.assert_array_equal, back, params)
    jax.tree.map(np.testing.assert_array_equal, state, tx.init(trainable))
    with pytest.raises(ValueError, match="'q/bias' was trained in full, but the base holds a lazy Int8Weight"):
        ckpt.restore({**base, "q": {**base["q"], "bias": quantize(base["q"]["bias"])}})


def test_restore_from_abstract_base_params_and_clear_errors(tmp_path):
    base, cfg, params, _ = setup()
    ckpt = AdapterCheckpointer(tmp_path / "ckpt")
    ckpt.save(1, params)
    ckpt.wait()
    abstract = jax.eval_shape(lambda: base)
    back, _, _ = ckpt.restore(abstract)
    np.testing.assert_array_equal(back["q"]["kernel"].a, params["q"]["kernel"].a)
    with pytest.raises(ValueError, match="another base model: no param at"):
        ckpt.restore({"out": base["out"]})
    with pytest.raises(ValueError, match="no checkpoint to restore"):
        AdapterCheckpointer(tmp_path / "empty").restore(base)
    with pytest.raises(ValueError, match=r"no checkpoint of step 99; steps: \[1\]"):
        ckpt.restore(base, step=99)
    with pytest.raises(ValueError, match=r"base_params holds jlora nodes \(at \['q/bias', 'q/kernel'\]\)"):
        ckpt.restore(params)
    with pytest.raises(ValueError, match="'q/kernel' is int8 in the base: an adapter goes on a float kernel"):
        ckpt.restore({**base, "q": {**base["q"], "kernel": base["q"]["kernel"].astype(jnp.int8)}})
    with pytest.raises(ValueError, match="AdapterCheckpointer.save: '.*' comes from the frozen half of jlora.split"):
        ckpt.save(5, jlora.split(params)[1])
    for step in (4.5, "7", -1, True):
        with pytest.raises(ValueError, match=f"step must be an int >= 0, got {step!r}"):
            ckpt.save(step, params)
    trainable = jlora.split(params)[0]
    with pytest.raises(ValueError, match="saved without an optimizer state"):
        ckpt.restore(base, opt_state_like=jlora.optimizer(optax.adam(1e-2), params).init(trainable))
    adam = jlora.optimizer(optax.adam(1e-2), params)
    ckpt.save(2, params, opt_state=adam.init(trainable))
    ckpt.wait()
    with pytest.raises(ValueError, match="opt_state_like has .* leaves, step 2's optimizer state .*another optimizer"):
        ckpt.restore(base, opt_state_like=jlora.optimizer(optax.sgd(1e-2), params).init(trainable))
    rank8 = jlora.lora_init(KEY, base, cfg.replace(rank=8))
    with pytest.raises(ValueError, match=r"opt_state_like.* has shape \(64, 8\), step 2 saved \(64, 4\)"):
        ckpt.restore(base, opt_state_like=adam.init(jlora.split(rank8)[0]))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        AdapterCheckpointer(tmp_path / "a_file")
    for step in ("1", 1.0):  # not read as "no step 1" while step 1 is there
        with pytest.raises(ValueError, match=f"restore: step must be an int >= 0, got {step!r}"):
            ckpt.restore(base, step=step)
    with pytest.raises(ValueError, match="'q/(bias|kernel)' holds ShapeDtypeStruct, not an array"):
        ckpt.save(3, jax.eval_shape(lambda: params))
    with pytest.raises(ValueError, match=r"opt_state\[0\] is function, not an array: pass the state"):
        ckpt.save(3, params, opt_state=(optax.adam(1e-2).update,))
    with pytest.raises(ValueError, match=r"restore: opt_state_like is an optax transformation; pass a state of it"):
        ckpt.restore(base, opt_state_like=optax.adam(1e-2))
    assert ckpt.all_steps() == [1, 2] and sorted(os.listdir(tmp_path / "ckpt")) == ["1", "2"]  # nothing half-written


def test_an_evaluator_polling_a_directory_its_writer_prunes_reads_on(tmp_path, monkeypatch):
    """The writer (max_to_keep) deletes a step while orbax lists the directory: the listing is read
    again; a step deleted while it is restored is named as deleted, not as corrupted."""
    base, _, params, _ = setup()
    writer = AdapterCheckpointer(tmp_path / "ckpt", async_save=False)
    writer.save(1, params)
    evaluator = AdapterCheckpointer(tmp_path / "ckpt")
    writer.save(2, params)
    reload, calls = evaluator._manager.reload, []

    def pruned_under_it():
        calls.append(1)
        if len(calls) == 1:
            raise FileNotFoundError(f"[Errno 2] No such file or directory: '{tmp_path}/ckpt/1'")
        reload()

    monkeypatch.setattr(evaluator._manager, "reload", pruned_under_it)
    assert evaluator.all_steps() == [1, 2] and len(calls) == 2
    monkeypatch.undo()
    restore = evaluator._manager.restore

    def deleted_as_read(step, *args, **kwargs):
        shutil.rmtree(tmp_path / "ckpt" / str(step))
        return restore(step, *args, **kwargs)

    monkeypatch.setattr(evaluator._manager, "restore", deleted_as_read)
    with pytest.raises(ValueError, match=r"step 2 was deleted while it was read \(the writer keeps only its last "
                                         r"steps, max_to_keep\); restore another step of \[1\]"):
        evaluator.restore(base)


def test_a_mistyped_directory_is_not_created_and_a_broken_step_is_named(tmp_path):
    base, _, params, _ = setup()
    with pytest.raises(ValueError, match="typo: no such directory"):
        AdapterCheckpointer(tmp_path / "typo").restore(base)
    assert not (tmp_path / "typo").exists()
    ckpt = AdapterCheckpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, params)
    ckpt.save(2, params)
    for item in pathlib.Path(tmp_path / "ckpt" / "2" / "meta").iterdir():
        item.write_text("{broken")
    with pytest.raises(ValueError, match=r"step 2 is incomplete or corrupted .*; restore another step of \[1, 2\]"):
        ckpt.restore(base)
    assert ckpt.restore(base, step=1)[2] == 1
    only = AdapterCheckpointer(tmp_path / "only", async_save=False)
    only.save(5, params)
    for item in pathlib.Path(tmp_path / "only" / "5" / "meta").iterdir():
        item.write_text("{broken")
    with pytest.raises(ValueError, match=r"step 5 is incomplete or corrupted .*; it is the only step$"):
        only.restore(base)


@pytest.mark.parametrize("damage", ["truncated arrays", "broken array metadata", "no adapters item", "no meta item",
                                    "no array data", "an empty step directory"])
def test_a_step_with_damaged_adapter_files_is_named(tmp_path, damage):
    base, _, params, _ = setup()
    ckpt = AdapterCheckpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, params)
    ckpt.save(2, params)
    adapters = tmp_path / "ckpt" / "2" / "adapters"
    if damage == "truncated arrays":
        for f in (adapters / "d").iterdir():
            f.write_bytes(f.read_bytes()[:20])
    elif damage == "broken array metadata":
        (adapters / "_METADATA").write_text("{broken")
    elif damage == "no adapters item":
        shutil.rmtree(adapters)
    elif damage == "no array data":  # a copy cut short: tensorstore's NOT_FOUND
        shutil.rmtree(adapters / "d")
    elif damage == "an empty step directory":
        shutil.rmtree(adapters.parent)
        adapters.parent.mkdir()
    else:
        shutil.rmtree(adapters.parent / "meta")
    with pytest.raises(ValueError, match=r"step 2 is incomplete or corrupted .*; restore another step of \[1, 2\]"):
        ckpt.restore(base)
    assert ckpt.restore(base, step=1)[2] == 1
    assert ckpt.save(3, params)  # a damaged step of its own is no other writer's: saving goes on


def test_a_deeper_base_than_the_steps_is_refused_with_lora_config_and_warned_of_without(tmp_path):
    """A base with more layers than the adapters were trained on: with lora_config, the extra
    layers would train unadapted and the next save record a config that does not describe its
    adapters; without, the step's saved config names them in a warning (as load_adapter does)."""
    cfg = jlora.LoraConfig(rank=2, targets=["q"])
    layers = lambda n: {f"layers_{i}": {"q": {"kernel": jnp.ones((8, 8))}} for i in range(n)}
    AdapterCheckpointer(tmp_path, async_save=False, lora_config=cfg).save(1, jlora.lora_init(KEY, layers(2), cfg))
    with pytest.raises(ValueError, match=r"checkpoint for another base model: lora_config adapts 1 kernel.* "
                                         r"\['layers_2/q/kernel'\]"):
        AdapterCheckpointer(tmp_path, lora_config=cfg).restore(layers(3))
    with pytest.warns(UserWarning, match=r"step 1's config adapts 1 kernel\(s\) of this base .*'layers_2/q/kernel'"):
        params, _, _ = AdapterCheckpointer(tmp_path).restore(layers(3))
    assert not isinstance(params["layers_2"]["q"]["kernel"], jlora.LoraWeight)
    # the same base with an adapter dropped: its lora_config no longer describes it, refused at save
    made = jlora.lora_init(KEY, layers(3), cfg)
    made["layers_2"]["q"]["kernel"] = layers(3)["layers_2"]["q"]["kernel"]
    with pytest.raises(ValueError, match=r"save: lora_config adapts 1 kernel\(s\), in layers of the modules the "
                                         r"params hold adapters for, that they hold none for: \['layers_2/q/kernel'\]"):
        AdapterCheckpointer(tmp_path / "dropped", async_save=False, lora_config=cfg).save(1, made)


def test_lora_dropout_is_the_lora_configs_on_restore_and_checked_on_save(tmp_path):
    """A resumed run may change LoRA dropout: the restored adapters take the lora_config's rate
    (they kept the step's, and the next save recorded a config that did not describe them)."""
    cfg = jlora.LoraConfig(rank=2, targets=["q"], dropout=0.1)
    base = {"q": {"kernel": jnp.ones((8, 8))}}
    params = jlora.lora_init(KEY, base, cfg)
    AdapterCheckpointer(tmp_path, async_save=False, lora_config=cfg).save(1, params)
    assert AdapterCheckpointer(tmp_path).restore(base)[0]["q"]["kernel"].dropout == 0.1  # without one: the step's
    higher = jlora.LoraConfig(rank=2, targets=["q"], dropout=0.3)
    ckpt = AdapterCheckpointer(tmp_path, async_save=False, lora_config=higher)
    restored, _, _ = ckpt.restore(base)
    assert restored["q"]["kernel"].dropout == 0.3
    with pytest.raises(ValueError, match=r"lora_config makes 'q/kernel' dropout 0.3; the adapter there has dropout 0.1:"):
        ckpt.save(2, params)
    assert ckpt.save(2, restored)


def test_keeps_the_last_n_or_the_best_n(tmp_path):
    base, _, params, _ = setup()
    last = AdapterCheckpointer(tmp_path / "last", max_to_keep=2, async_save=False)
    for step in (0, np.int64(1), np.array(2), jnp.int32(3), jnp.array(4)):  # integer scalars of numpy or JAX too
        last.save(step, params)
    assert last.all_steps() == [3, 4] and all(type(s) is int for s in last.all_steps())
    with pytest.warns(UserWarning, match="step 2 not written: .* already holds step 4"):
        assert last.save(2, params) is False  # a new run in an old run's directory: never silent
    assert last.all_steps() == [3, 4]
    with pytest.raises(ValueError, match="save: step 4 is already in .*, and a save never replaces one"):
        last.save(4, params, force=True)  # orbax raised its StepAlreadyExistsError
    best = AdapterCheckpointer(tmp_path / "best", max_to_keep=2, best_metric="loss", async_save=False)
    for step, loss in enumerate([5.0, 1.0, 3.0, 0.5, 4.0]):
        best.save(step, params, metrics={"loss": loss})
    assert sorted(best.all_steps()) == [1, 3] and best.best_step() == 3
    with pytest.raises(ValueError, match="metrics must hold a number under 'loss'"):
        best.save(9, params, metrics={"val_loss": 0.1})  # refused before orbax starts writing
    assert best.save(10, params, metrics={"loss": jnp.float32(0.1)}) and best.best_step() == 10  # a jax scalar
    assert best.save(11, params, metrics={"loss": jnp.bfloat16(0.05)}) and best.best_step() == 11  # bf16 (a bf16 model's loss)
    for bad in (float("nan"), np.inf, -np.inf):  # a diverged run: ranked by orbax, it displaced the best steps
        with pytest.raises(ValueError, match=rf"step 12 not written: metrics\['loss'\] is {bad}, so it cannot be ranked"):
            best.save(12, params, metrics={"loss": bad})
    assert sorted(best.all_steps()) == [10, 11]
    with pytest.raises(ValueError, match="metrics must be a dict of names to numbers, got 0.5"):
        best.save(12, params, metrics=0.5)
    # reopened ranking otherwise (a resume script without best_metric): orbax would keep the newest
    # steps and delete the best ones; refused, the steps untouched
    for other in ({}, {"best_metric": "loss", "best_mode": "max"}, {"best_metric": "acc"}):
        again = AdapterCheckpointer(tmp_path / "best", max_to_keep=2, async_save=False, **other)
        with pytest.raises(ValueError, match="keeps its steps best_metric='loss', best_mode='min', this checkpointer"):
            again.save(13, params, metrics={"loss": 0.01, "acc": 0.9})
        with pytest.raises(ValueError, match="open it with best_metric='loss', best_mode='min'"):
            again.best_step()
        again.restore(base)  # reading a step is fine
    assert sorted(best.all_steps()) == [10, 11]
    assert AdapterCheckpointer(tmp_path / "best", max_to_keep=2, best_metric="loss").best_step() == 11
    with pytest.raises(ValueError, match="keeps its steps by recency, this checkpointer best_metric='loss'"):
        AdapterCheckpointer(tmp_path / "last", best_metric="loss").save(9, params, metrics={"loss": 0.1})
    for keep in (0, -1, "3", 2.5, True):  # orbax's max_to_keep=0 deletes every step, older runs' too
        with pytest.raises(ValueError, match=f"max_to_keep must be an int >= 1, or None to keep every step; got {keep!r}"):
            AdapterCheckpointer(tmp_path / "last", max_to_keep=keep)
    assert last.all_steps() == [3, 4]


def test_the_ranking_is_read_from_the_newest_readable_step(tmp_path):
    """Read from the step's own metadata file (orbax's restore waits for every process: a call on
    one process alone hung); a damaged newest step leaves the one before to say it."""
    base, _, params, _ = setup()
    best = AdapterCheckpointer(tmp_path, max_to_keep=3, best_metric="loss", async_save=False)
    best.save(1, params, metrics={"loss": 1.0})
    best.save(2, params, metrics={"loss": 2.0})
    (tmp_path / "2" / "meta" / "metadata").write_text("{broken")
    assert AdapterCheckpointer(tmp_path, max_to_keep=3, best_metric="loss").best_step() == 1
    with pytest.raises(ValueError, match="keeps its steps best_metric='loss'"):
        AdapterCheckpointer(tmp_path, max_to_keep=3).best_step()


def test_optimizer_state_with_a_prng_key_round_trips(tmp_path):
    base, _, params, _ = setup()
    trainable = jlora.split(params)[0]
    tx = jlora.optimizer(optax.noisy_sgd(0.1), params)  # its state holds a typed key
    state = tx.init(trainable)
    ckpt = AdapterCheckpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, params, opt_state=state)
    _, back, _ = ckpt.restore(base, opt_state_like=tx.init(trainable))
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(state)):
        if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
            got, want = jax.random.key_data(got), jax.random.key_data(want)
        np.testing.assert_array_equal(got, want)


def test_a_checkpoint_is_the_bytes_of_the_adapters_plus_small_metadata(tmp_path):
    _, _, params, _ = setup()
    ckpt = AdapterCheckpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(0, params)
    size = sum(f.stat().st_size for f in pathlib.Path(tmp_path / "ckpt").rglob("*") if f.is_file())
    adapter_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jlora.split(params)[0]))
    base_bytes = 64 * 64 * 4
    assert adapter_bytes <= size < adapter_bytes + 64 * 1024 and size < base_bytes + adapter_bytes


TRAIN_SCRIPT = textwrap.dedent('''
    import sys, jax, jax.numpy as jnp, optax, numpy as np
    sys.path.insert(0, {tests!r})
    import jlora
    from jlora.checkpoint import AdapterCheckpointer
    from test_checkpoint import setup
    base, cfg, params, tx = setup()
    trainable, frozen = jlora.split(params)
    ckpt = AdapterCheckpointer({ckpt!r}, max_to_keep=3)
    state = tx.init(trainable)
    start = 0
    if ckpt.latest_step() is not None:
        params, state, start = ckpt.restore(base, opt_state_like=state)
        trainable, frozen = jlora.split(params)
    fwd = jlora.apply(lambda p, x: jnp.tanh(x @ p["q"]["kernel"] + p["q"]["bias"]) @ p["out"]["kernel"])
    x = jax.random.normal(jax.random.key(1), (16, 64))
    loss = lambda t: jnp.mean(fwd(jlora.combine(t, frozen), x) ** 2)
    @jax.jit
    def step(t, s):
        l, g = jax.value_and_grad(loss)(t)
        u, s = tx.update(g, s, t)
        return optax.apply_updates(t, u), s, l
    for i in range(start, {steps}):
        trainable, state, l = step(trainable, state)
        print(f"step {{i + 1}} loss {{float(l):.8f}}", flush=True)
        ckpt.save(i + 1, jlora.combine(trainable, frozen), opt_state=state)
        ckpt.wait()
        if i + 1 == {stall}:
            print("stalled", flush=True)
            import time; time.sleep(600)
    ckpt.close()
''')


def _run(tmp_path, ckpt, steps, stall=-1):
    script = TRAIN_SCRIPT.format(tests=str(pathlib.Path(__file__).parent), ckpt=str(ckpt), steps=steps, stall=stall)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _losses(lines):
    return {int(l.split()[1]): l.split()[3] for l in lines if l.startswith("step")}


def test_resume_after_sigkill_continues_the_same_loss_curve(tmp_path):
    full = _run(tmp_path, tmp_path / "full", steps=8)
    full_losses = _losses(full.communicate(timeout=240)[0].splitlines())
    assert full.returncode == 0 and len(full_losses) == 8

    crashed = _run(tmp_path, tmp_path / "crash", steps=8, stall=4)
    lines = []
    for line in crashed.stdout:
        lines.append(line)
        if line.startswith("stalled"):
            break
    crashed.send_signal(signal.SIGKILL)
    crashed.wait(timeout=60)
    resumed = _run(tmp_path, tmp_path / "crash", steps=8)
    out = resumed.communicate(timeout=240)[0].splitlines()
    assert resumed.returncode == 0
    got = {**_losses(lines), **_losses(out)}
    assert min(_losses(out)) == 5  # resumed after the last checkpoint, step 4
    assert got == full_losses


def test_a_save_killed_midway_leaves_the_previous_checkpoint_restorable(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    script = textwrap.dedent(f'''
        import sys, jax, jax.numpy as jnp
        sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
        import jlora
        from jlora.checkpoint import AdapterCheckpointer
        from test_checkpoint import setup
        base, cfg, params, tx = setup()
        ckpt = AdapterCheckpointer({str(ckpt_dir)!r})
        ckpt.save(1, params); ckpt.wait()
        print("saved 1", flush=True)
        big = jlora.lora_init(jax.random.key(0), {{"q": {{"kernel": jnp.ones((4096, 4096)), "bias": jnp.zeros(4096)}},
                              "out": {{"kernel": jnp.ones((4096, 8))}}}}, jlora.LoraConfig(rank=512, targets=["q"]))
        while True:
            ckpt.save(2, big, force=True)
    ''')
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.stdout.readline().startswith("saved 1")
    time.sleep(0.5)  # inside the large save of step 2
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    base, _, params, _ = setup()
    ckpt = AdapterCheckpointer(ckpt_dir)
    assert ckpt.latest_step() in (1, 2)
    back, _, step = ckpt.restore(base, step=1)
    np.testing.assert_array_equal(back["q"]["kernel"].b, params["q"]["kernel"].b)


def test_a_checkpoint_written_without_shapes_in_its_metadata_still_restores(tmp_path, monkeypatch):
    """Checkpoints from before the metadata kept rank, dtype and shape (restore then reads the
    arrays as saved and LoraWeight checks their shapes)."""
    import jlora.checkpoint as checkpoint

    base, _, params, _ = setup()
    plain = checkpoint._adapter_arrays
    legacy_keys = ("kind", "layout", "scale", "dropout")
    monkeypatch.setattr(checkpoint, "_adapter_arrays", lambda p: (
        plain(p)[0], {k: {f: v for f, v in s.items() if f in legacy_keys} for k, s in plain(p)[1].items()}))
    ckpt = AdapterCheckpointer(tmp_path / "old", async_save=False)
    ckpt.save(1, params)
    monkeypatch.undo()
    restored, _, _ = AdapterCheckpointer(tmp_path / "old").restore(base)
    np.testing.assert_array_equal(restored["q"]["kernel"].b, params["q"]["kernel"].b)
    other = {**base, "q": {"kernel": jnp.ones((64, 32)), "bias": jnp.zeros(32)}}
    with pytest.raises(ValueError, match="'q/kernel'"):
        AdapterCheckpointer(tmp_path / "old").restore(other)


def test_an_async_save_is_finished_when_the_program_ends_without_wait(tmp_path):
    """A script whose last line is an asynchronous save (no wait(), no close()) keeps that step."""
    script = textwrap.dedent(f"""
        import jax, jax.numpy as jnp, jlora
        from jlora.checkpoint import AdapterCheckpointer
        base = {{"q": {{"kernel": jnp.ones((64, 64))}}}}
        params = jlora.lora_init(jax.random.key(0), base, jlora.LoraConfig(rank=4, targets=["q"]))
        AdapterCheckpointer({str(tmp_path / "ckpt")!r}).save(1, params)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert AdapterCheckpointer(tmp_path / "ckpt").all_steps() == [1]
    with AdapterCheckpointer(tmp_path / "ckpt") as ckpt:  # a with block closes it
        assert ckpt.restore({"q": {"kernel": jnp.ones((64, 64))}})[2] == 1
    with pytest.raises(ValueError, match="AdapterCheckpointer.save: .*ckpt was closed"):
        ckpt.save(2, jlora.lora_init(jax.random.key(0), {"q": {"kernel": jnp.ones((64, 64))}},
                                     jlora.LoraConfig(rank=4, targets=["q"])))


def test_a_checkpointer_sees_the_steps_another_one_saves_and_never_writes_over_them(tmp_path):
    """An evaluator opened before the trainer's later saves reads them and restores the newest; its
    own save of a step already on disk is refused (it replaced the trainer's step)."""
    base, _, params, _ = setup()
    newer = perturb(params, jax.random.key(3))
    trainer, evaluator = AdapterCheckpointer(tmp_path, async_save=False), AdapterCheckpointer(tmp_path)
    trainer.save(1, params)
    trainer.save(3, newer)
    assert evaluator.all_steps() == [1, 3] and evaluator.latest_step() == 3
    restored, _, step = evaluator.restore(base)
    assert step == 3
    jax.tree.map(np.testing.assert_array_equal, restored, newer)
    with pytest.warns(UserWarning, match="step 3 not written: .* already holds step 3"):
        assert evaluator.save(3, params) is False
    with pytest.raises(ValueError, match="step 3 is already in"):
        evaluator.save(3, params, force=True)
    jax.tree.map(np.testing.assert_array_equal, AdapterCheckpointer(tmp_path).restore(base)[0], newer)
    trainer.save(4, params)
    shutil.rmtree(tmp_path / "1")  # pruned by another process
    assert evaluator.all_steps() == [3, 4] and evaluator.latest_step() == 4


def test_the_steps_metadata_is_read_again_only_when_the_steps_on_disk_change(tmp_path):
    """orbax's reload reads every kept step's metadata: at every save or query, a run keeping
    hundreds of steps slowed down with each one."""
    _, _, params, _ = setup()
    ckpt = AdapterCheckpointer(tmp_path, max_to_keep=None, async_save=False)
    reloads = []
    reload = ckpt._manager.reload
    ckpt._manager.reload = lambda: reloads.append(1) or reload()
    for step in range(1, 6):
        ckpt.save(step, params)
        assert ckpt.all_steps() == list(range(1, step + 1)) and ckpt.latest_step() == step
    assert not reloads
    AdapterCheckpointer(tmp_path, async_save=False).save(9, params)  # another process's save
    assert ckpt.latest_step() == 9 and len(reloads) == 1


def test_a_forced_older_step_leaves_the_newest_step_latest(tmp_path):
    base, _, params, _ = setup()
    ckpt = AdapterCheckpointer(tmp_path, max_to_keep=4)
    for step in (10, 20, 30):
        ckpt.save(step, params)
    assert ckpt.save(5, params, force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [5, 10, 20, 30] and ckpt.latest_step() == 30 and ckpt.restore(base)[2] == 30
    ckpt.save(40, params)
    ckpt.wait()
    assert ckpt.all_steps() == [10, 20, 30, 40]  # the oldest step pruned, not step 10
    # with max_to_keep steps kept, the forced step would count as the newest saved and prune step
    # 10, newer than it: refused, nothing deleted
    with pytest.raises(ValueError, match=r"step 7 not written: .* would delete step 10, newer than it"):
        ckpt.save(7, params, force=True)
    assert ckpt.all_steps() == [10, 20, 30, 40]
    assert ckpt.save(15, params, force=True)  # step 10 goes, older than it
    ckpt.wait()
    assert ckpt.all_steps() == [15, 20, 30, 40]


def test_metrics_are_json_scalars_or_refused_before_a_step_is_written(tmp_path):
    base, _, params, _ = setup()
    ckpt = AdapterCheckpointer(tmp_path / "main", best_metric="loss", async_save=False)
    assert ckpt.save(1, params, metrics={"loss": jnp.float32(0.5), "improved": jnp.array(True), "phase": "warmup",
                                         "epoch": 3, "per_class": [0.9, 0.8]})
    written = json.loads((tmp_path / "main" / "1" / "metrics" / "metrics").read_text())
    assert written == {"loss": 0.5, "improved": True, "phase": "warmup", "epoch": 3.0, "per_class": [0.9, 0.8]}
    assert AdapterCheckpointer(tmp_path / "by_epoch", best_metric="epoch", best_mode="max", async_save=False).save(
        1, params, metrics={"epoch": 3})  # a Python int ranks as a number
    for name, bad in (("grad_norms", jnp.ones(2)), ("where", object()), ("norms", [jnp.ones(2)])):
        with pytest.raises(ValueError, match=rf"metrics\['{name}'\] is .*: metrics are written as JSON"):
            ckpt.save(2, params, metrics={"loss": 0.4, name: bad})
    assert sorted(os.listdir(tmp_path / "main")) == ["1"]  # nothing half written


def test_optimizer_states_without_arrays_or_with_python_numbers_round_trip(tmp_path):
    base, _, params, _ = setup()
    trainable, _ = jlora.split(params)
    sgd_state = jlora.optimizer(optax.sgd(1e-2), trainable).init(trainable)  # no array leaves at all
    hand_state = {"count": 5, "lr": 0.1, "mu": jnp.arange(3.0)}
    ckpt = AdapterCheckpointer(tmp_path, async_save=False)
    for step, state in enumerate((sgd_state, hand_state), start=1):
        assert ckpt.save(step, params, opt_state=state)
        _, back, _ = ckpt.restore(base, step, opt_state_like=state)
        assert jax.tree.structure(back) == jax.tree.structure(state)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-7), back, state)  # 0.1 as float32
    with pytest.raises(ValueError, match=r"opt_state_like has 3 leaves, step 1's optimizer state 0: the state of "
                                         r"another optimizer, or of adapters on other params \(other targets\? step 1 "
                                         r"has 1 adapters: \['q/kernel'\]\)"):
        ckpt.restore(base, 1, opt_state_like=hand_state)
    # a state a jitted step was given to reuse (donate_argnums): refused before orbax writes anything
    donated = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    state = {"mu": jnp.arange(3.0) + 0}
    donated(state)
    with pytest.raises(ValueError, match=r"opt_state\['mu'\] was deleted \(donated: given to a jitted step to reuse, "
                                         r"donate_argnums, or by a framework's own loop, .*\); save the state the step returned"):
        ckpt.save(3, params, opt_state=state)
    assert ckpt.save(3, params, opt_state=hand_state) and ckpt.all_steps() == [1, 2, 3]


def test_a_relative_directory_stays_where_it_was_opened(tmp_path, monkeypatch):
    base, _, params, _ = setup()
    monkeypatch.chdir(tmp_path)
    ckpt = AdapterCheckpointer("ckpt", async_save=False)
    ckpt.save(1, params)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert ckpt.restore(base)[2] == 1 and ckpt.save(2, params)
    assert not (tmp_path / "elsewhere" / "ckpt").exists() and ckpt.all_steps() == [1, 2]


def test_a_reader_is_not_kept_alive_and_a_failed_last_save_is_an_error_at_exit(tmp_path):
    """Only a checkpointer with a save in flight is held until the program ends (an evaluator
    opening a fresh reader per poll leaked them all); the last save failing there (a full disk) is
    reported on stderr, naming the directory, and the step before stays restorable."""
    base, _, params, _ = setup()
    AdapterCheckpointer(tmp_path / "ckpt", async_save=False).save(1, params)
    reader = AdapterCheckpointer(tmp_path / "ckpt")
    reader.restore(base)
    gone = weakref.ref(reader)
    del reader
    gc.collect()
    assert gone() is None
    script = textwrap.dedent(f"""
        import resource, signal, jax, jax.numpy as jnp, jlora
        from jlora.checkpoint import AdapterCheckpointer
        params = jlora.lora_init(jax.random.key(0), {{"q": {{"kernel": jnp.ones((64, 64))}}}},
                                 jlora.LoraConfig(rank=4, targets=["q"]))
        ckpt = AdapterCheckpointer({str(tmp_path / "full")!r})
        ckpt.save(1, params)
        ckpt.wait()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, resource.RLIM_INFINITY))  # the disk is full
        ckpt.save(2, params)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert f"ERROR: AdapterCheckpointer: the last save to {tmp_path / 'full'} failed at exit" in run.stderr, run.stderr[-2000:]
    assert AdapterCheckpointer(tmp_path / "full").all_steps() == [1]


@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 devices (XLA_FLAGS in conftest.py)")
def test_a_state_like_jax_eval_shapes_is_placed_as_its_own_adapter(tmp_path):
    """On a mesh with Auto axes ``jax.eval_shape`` gives the moments no placement: each takes its
    adapter's (the longest path it ends in: 'x/up/kernel', not 'up/kernel')."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jlora import sharding

    mesh = sharding.make_mesh({"d": 2})
    rows, columns = NamedSharding(mesh, P("d", None)), NamedSharding(mesh, P(None, "d"))
    base = {"up": {"kernel": jax.device_put(jnp.ones((8, 8)), rows)},
            "x": {"up": {"kernel": jax.device_put(jnp.ones((8, 8)), columns)}}}
    params = jlora.lora_init(KEY, base, jlora.LoraConfig(rank=2, targets=["up"]))
    trainable = jlora.split(params)[0]
    tx = jlora.optimizer(optax.adam(1e-3))
    AdapterCheckpointer(tmp_path, async_save=False).save(1, params, opt_state=tx.init(trainable))
    _, state, _ = AdapterCheckpointer(tmp_path).restore(base, opt_state_like=jax.eval_shape(tx.init, trainable))
    mu = state.inner_states["adapter"].inner_state[0].mu
    spec = lambda x: tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
    restored = {path: (spec(lw.a), spec(lw.b)) for path, lw in
                (("up", mu["up"]["kernel"]), ("x/up", mu["x"]["up"]["kernel"]))}
    assert restored == {"up": (("d", None), (None, None)), "x/up": ((None, None), (None, "d"))}
    # in flax's boxes (nn.LogicallyPartitioned, as MaxText keeps its params) the moments' paths hold the box's
    # value key, the adapters' do not
    import flax.linen as nn

    boxed = {"up": {"kernel": nn.LogicallyPartitioned(base["up"]["kernel"], names=("embed", "mlp"))}}
    params = jlora.lora_init(KEY, boxed, jlora.LoraConfig(rank=2, targets=["up"]))
    trainable = jlora.split(params)[0]
    AdapterCheckpointer(tmp_path / "boxed", async_save=False).save(1, params, opt_state=tx.init(trainable))
    _, state, _ = AdapterCheckpointer(tmp_path / "boxed").restore(boxed, opt_state_like=jax.eval_shape(tx.init, trainable))
    lw = state.inner_states["adapter"].inner_state[0].mu["up"]["kernel"].value
    assert (spec(lw.a), spec(lw.b)) == (("d", None), (None, None))
    # a field named value (an Equinox attention's) is in both paths
    import dataclasses

    @dataclasses.dataclass
    class Attention:
        value: dict

    jax.tree_util.register_dataclass(Attention, data_fields=["value"], meta_fields=[])
    fields = {"attn": Attention(value={"kernel": base["up"]["kernel"]})}
    params = jlora.lora_init(KEY, fields, jlora.LoraConfig(rank=2, targets=["attn/value/kernel"]))
    trainable = jlora.split(params)[0]
    AdapterCheckpointer(tmp_path / "field", async_save=False).save(1, params, opt_state=tx.init(trainable))
    _, state, _ = AdapterCheckpointer(tmp_path / "field").restore(fields, opt_state_like=jax.eval_shape(tx.init, trainable))
    lw = state.inner_states["adapter"].inner_state[0].mu["attn"].value["kernel"]
    assert (spec(lw.a), spec(lw.b)) == (("d", None), (None, None))


def test_steps_another_writer_saved_are_never_pruned_and_each_format_names_the_others_reader(tmp_path):
    import orbax.checkpoint as ocp

    base, _, params, _ = setup()
    with ocp.CheckpointManager(tmp_path / "run") as manager:  # the run's own full-state checkpoints
        for step in (100, 200):
            manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"x": np.ones(3)})))
    ckpt = AdapterCheckpointer(tmp_path / "run", max_to_keep=1, async_save=False)
    with pytest.raises(ValueError, match=r"holds steps \[100, 200\] that AdapterCheckpointer did not write \(step 100 "
                                         r"holds \['state'\]\).*save the adapters into a directory of their own"):
        ckpt.save(300, params)
    assert sorted(os.listdir(tmp_path / "run")) == ["100", "200"]
    with pytest.raises(ValueError, match=r"step 200 was not written by AdapterCheckpointer \(it holds \['state'\]\): "
                                         "read it with orbax itself"):
        ckpt.restore(base)
    adapter = jlora.adapter.save_adapter(tmp_path / "adapter", params)
    with pytest.raises(ValueError, match="no checkpoint to restore .*read it with jlora.adapter.load_adapter"):
        AdapterCheckpointer(adapter).restore(base)
    AdapterCheckpointer(tmp_path / "ckpt", async_save=False).save(1, params)
    for where in (tmp_path / "ckpt", tmp_path / "ckpt" / "1"):
        with pytest.raises(ValueError, match=r"AdapterCheckpointer steps: restore one with "
                                             rf"jlora.checkpoint.AdapterCheckpointer\('{tmp_path / 'ckpt'}'\)"):
            jlora.adapter.load_adapter(where, base)


@pytest.mark.parametrize("written_by", ["34c4949", "6c2ff6f"])
def test_a_state_saved_before_its_keys_were_recorded_restores_them_as_keys(written_by, tmp_path):
    """``tests/data/checkpoint_<commit>_noisy_sgd``: a step written by jlora at that commit, whose
    ``optax.noisy_sgd`` state holds a PRNG key that orbax stored as a key (jlora has since stored
    keys as their data, recording which: ``opt_state_keys``). Restored, it is a key again."""
    shutil.copytree(pathlib.Path(__file__).parent / "data" / f"checkpoint_{written_by}_noisy_sgd", tmp_path / "ck")
    base = {"dense": {"kernel": jnp.arange(32.0).reshape(8, 4) / 10}}
    params = jlora.lora_init(jax.random.key(0), base, jlora.LoraConfig(rank=2, alpha=4.0, targets=["dense"]))
    tx = jlora.optimizer(optax.noisy_sgd(0.1, key=0), params)
    trainable = jlora.split(params)[0]
    like = tx.init(trainable)
    restored, state, step = AdapterCheckpointer(tmp_path / "ck").restore(base, opt_state_like=like)
    assert step == 1 and jax.tree.structure(state) == jax.tree.structure(like)
    _, abstract, _ = AdapterCheckpointer(tmp_path / "ck").restore(base, opt_state_like=jax.eval_shape(lambda: like))
    assert jax.tree.structure(abstract) == jax.tree.structure(like)  # restore takes eval_shape's state too
    is_key = lambda x: jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    (key,), (want,) = ([x for x in jax.tree.leaves(s) if is_key(x)] for s in (state, like))
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(want))  # noisy_sgd's key=0, as saved
    assert restored["dense"]["kernel"].a.shape == (8, 2)
    tx.update(jax.tree.map(jnp.zeros_like, trainable), state, trainable)  # the step resumes


def test_an_optimizer_state_saved_in_flax_boxes_restores_onto_unboxed_params_and_back(tmp_path):
    """Params in flax's boxes (nn.LogicallyPartitioned) put a box's ``.value`` in the moments' paths;
    the same state unboxed differs by that key alone, leaf for leaf (it was refused as the state of
    another optimizer)."""
    import flax.linen as nn

    kernel = jax.random.normal(jax.random.key(1), (8, 16))
    boxed = {"up": {"kernel": nn.LogicallyPartitioned(kernel, names=("embed", "mlp"))}}
    unboxed = {"up": {"kernel": kernel}}
    config = jlora.LoraConfig(rank=2, targets=["up"])
    tx = jlora.optimizer(optax.adam(1e-2))
    for i, (saved_on, restored_on) in enumerate(((boxed, unboxed), (unboxed, boxed))):
        trainable = jlora.split(perturb(jlora.lora_init(KEY, saved_on, config), KEY))[0]
        grads = jax.tree.map(jnp.ones_like, trainable)
        _, state = tx.update(grads, tx.init(trainable), trainable)  # moments that are not zeros
        with AdapterCheckpointer(tmp_path / str(i), lora_config=config, async_save=False) as ckpt:
            ckpt.save(1, jlora.combine(trainable, jlora.split(jlora.lora_init(KEY, saved_on, config))[1]),
                      opt_state=state)
        like = tx.init(jlora.split(jlora.lora_init(KEY, restored_on, config))[0])
        with AdapterCheckpointer(tmp_path / str(i), lora_config=config) as ckpt:
            _, got, _ = ckpt.restore(restored_on, opt_state_like=like)
        assert jax.tree.structure(got) == jax.tree.structure(like)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(state)):
            np.testing.assert_array_equal(x, y)


@pytest.mark.skipif(jax.device_count() < 3, reason="needs 3 devices (XLA_FLAGS in conftest.py)")
def test_a_base_or_state_placed_where_the_restore_cannot_go_is_refused_by_path(tmp_path):
    """From a probe moving checkpoints across meshes: an abstract base whose sharding does not divide
    a kernel failed inside JAX naming the adapters' factor; a state template kept from the run on
    another mesh restored there (the first step then refused the two); an int template cut the moments."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    base = {"enc": {"kernel": jnp.ones((32, 64))}, "dec": {"kernel": jnp.ones((64, 48))}}
    params = jlora.lora_init(KEY, base, jlora.LoraConfig(rank=4, targets=["enc", "dec"]))
    trainable = jlora.split(params)[0]
    tx = jlora.optimizer(optax.adam(1e-3))
    AdapterCheckpointer(tmp_path, async_save=False).save(1, params, opt_state=tx.init(trainable))
    jlora.adapter.save_adapter(tmp_path / "ad", params)
    three = jlora.sharding.make_mesh({"fsdp": 3}, devices=jax.devices()[:3])
    uneven = {"enc": {"kernel": jax.ShapeDtypeStruct((32, 64), jnp.float32, sharding=NamedSharding(three, P("fsdp")))},
              "dec": {"kernel": jax.ShapeDtypeStruct((64, 48), jnp.float32, sharding=NamedSharding(three, P(None, "fsdp")))}}
    match = r"the base's sharding for 'enc/kernel': axis 0 of shape \(32, 64\) has size 32, which does not divide"
    with pytest.raises(ValueError, match=match):
        AdapterCheckpointer(tmp_path).restore(uneven)
    with pytest.raises(ValueError, match=match):
        jlora.adapter.load_adapter(tmp_path / "ad", uneven)
    # a state template on other devices than the base's
    two = jlora.sharding.make_mesh({"fsdp": 2}, devices=jax.devices()[:2])
    on = lambda mesh, tree: jax.device_put(tree, NamedSharding(mesh, P()))
    kept = tx.init(on(three, trainable))  # the template from the run on three devices
    with pytest.raises(ValueError, match=r"opt_state_like.*\['kernel'\].a is placed on devices \[0, 1, 2\], its "
                                         r"adapter on \[0, 1\]: .*make opt_state_like on this base's placement"):
        AdapterCheckpointer(tmp_path).restore(on(two, base), opt_state_like=kept)
    restored, state, _ = AdapterCheckpointer(tmp_path).restore(on(two, base), opt_state_like=tx.init(on(two, trainable)))
    assert {d for x in jax.tree.leaves(state) for d in x.devices()} == set(jax.devices()[:2])
    # a base spread over two meshes (pipeline stages): each moment on its own adapter's devices is right
    other = jlora.sharding.make_mesh({"fsdp": 2}, devices=jax.devices()[2:4])
    staged = {"enc": on(two, base["enc"]), "dec": on(other, base["dec"])}
    staged_trainable = jlora.split(jlora.lora_init(KEY, staged, jlora.LoraConfig(rank=4, targets=["enc", "dec"])))[0]
    _, state, _ = AdapterCheckpointer(tmp_path).restore(staged, opt_state_like=tx.init(staged_trainable))
    mu = state.inner_states["adapter"].inner_state[0].mu
    assert mu["dec"]["kernel"].a.devices() == set(jax.devices()[2:4]) and mu["enc"]["kernel"].b.devices() == set(jax.devices()[:2])
    # a template of integers would cut the float moments
    ints = jax.tree.map(lambda x: x.astype(jnp.int32), tx.init(trainable))
    with pytest.raises(ValueError, match=r"opt_state_like.*\['dec'\]\['kernel'\].a is int32, step 1 saved float32: "
                                         r"restored into it, the values would be cut to integers"):
        AdapterCheckpointer(tmp_path).restore(base, opt_state_like=ints)
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, tx.init(trainable))
    _, state, _ = AdapterCheckpointer(tmp_path).restore(base, opt_state_like=bf16)  # narrowed as asked (the docstring)
    assert {x.dtype for x in jax.tree.leaves(state)} == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.int32)}


@pytest.mark.skipif(not hasattr(jax.sharding, "AxisType") or jax.device_count() < 4, reason="an Explicit mesh: JAX 0.7+, 4 devices")
def test_a_base_sharded_with_reduced_axes_loads(tmp_path):
    """A spec holding reduced axes (an Explicit mesh's FSDP gather) refuses to be iterated (JAX 0.8+):
    the base sharding check reads its partitions."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    try:
        spec = P(None, "model", reduced={"fsdp"})
    except TypeError:
        pytest.skip("PartitionSpec has no reduced axes before JAX 0.8")
    mesh = jax.make_mesh((2, 2), ("fsdp", "model"), axis_types=(AxisType.Explicit,) * 2, devices=jax.devices()[:4])
    leaf = jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=NamedSharding(mesh, spec))
    params = jlora.lora_init(KEY, {"q": {"kernel": jnp.ones((8, 8))}}, jlora.LoraConfig(rank=2, targets=["q"]))
    jlora.adapter.save_adapter(tmp_path / "ad", params)
    AdapterCheckpointer(tmp_path / "ckpt", async_save=False).save(1, params)
    for got in (jlora.adapter.load_adapter(tmp_path / "ad", {"q": {"kernel": leaf}}),
                AdapterCheckpointer(tmp_path / "ckpt").restore({"q": {"kernel": leaf}})[0]):
        np.testing.assert_array_equal(got["q"]["kernel"].a, params["q"]["kernel"].a)


def test_a_base_replicated_for_pmap_is_named_as_such(tmp_path):
    base = {"dense": {"kernel": jnp.ones((8, 4))}}
    params = jlora.lora_init(KEY, base, jlora.LoraConfig(rank=2, targets=["dense"]))
    AdapterCheckpointer(tmp_path, async_save=False).save(1, params)
    jlora.adapter.save_adapter(tmp_path / "ad", params)
    n = jax.local_device_count()
    replicated = jax.tree.map(lambda x: jnp.stack([x] * n), base)
    hint = (r"a leading axis of \d+, one per device: a tree replicated for jax.pmap\? load onto one replica, "
            r"jax.tree.map\(lambda x: x\[0\], base_params\)")
    with pytest.raises(ValueError, match=rf"'dense/kernel' has shape \({n}, 8, 4\) here but \(8, 4\) .*{hint}"):
        AdapterCheckpointer(tmp_path).restore(replicated)
    with pytest.raises(ValueError, match=rf"'dense/kernel' has shape \[{n}, 8, 4\] in the base, \[8, 4\] .*{hint}"):
        jlora.adapter.load_adapter(tmp_path / "ad", replicated)
