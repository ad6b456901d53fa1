import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.adapter import describe, load_adapter, read_config, save_adapter
from oracle import perturb
from quantized import quantize

KEY = jax.random.key(0)


def lora_tree():
    base = {"q": {"kernel": jax.random.normal(KEY, (8, 8)), "bias": jnp.zeros(8)},
            "stack": {"kernel": jnp.ones((3, 8, 4))}}
    cfg = jlora.LoraConfig(rank=2, targets=["q", "stack"], trainable=["q/bias"], layouts={"stack": "bio"})
    return base, cfg, perturb(jlora.lora_init(KEY, base, cfg), KEY)


def test_round_trip_is_exact_and_stores_only_the_trainable_half(tmp_path):
    base, cfg, p = lora_tree()
    save_adapter(tmp_path / "ad", p, lora_config=cfg, metadata={"base_model": "tiny"})
    back = load_adapter(tmp_path / "ad", base)
    jax.tree.map(np.testing.assert_array_equal, back, p)
    assert jax.tree.structure(back) == jax.tree.structure(p)
    weights = (tmp_path / "ad" / "adapter.safetensors").stat().st_size
    stored = sum(x.size * 4 for x in jax.tree.leaves(jlora.split(p)[0]))
    assert stored <= weights <= stored + 4096  # the bytes of a, b and the bias, plus a small header
    save_adapter(tmp_path / "half", jlora.split(p)[0], lora_config=cfg)  # no base weights: shapes from a, b
    jax.tree.map(np.testing.assert_array_equal, load_adapter(tmp_path / "half", base), p)
    text = describe(tmp_path / "ad")
    assert "q/kernel  8x8  layout io  r=2" in text and "base_model: tiny" in text


def test_describe_counts_what_the_weights_file_holds_and_refuses_a_mismatch(tmp_path, monkeypatch):
    """``describe`` (``jlora info``) counts the parameters from the weights file's header, without
    reading an array, and refuses weights that do not match the config as loading does."""
    from safetensors import safe_open

    base, cfg, p = lora_tree()
    save_adapter(tmp_path / "ad", p, lora_config=cfg)
    trained = jlora.split(p)[0]
    n_lora = sum(x.size for node in jax.tree.leaves(trained, is_leaf=jlora.weight.is_node)
                 if isinstance(node, jlora.LoraWeight) for x in (node.a, node.b))
    with safe_open(str(tmp_path / "ad" / "adapter.safetensors"), "np") as f:
        opened = type(f)
    monkeypatch.setattr(opened, "get_tensor", lambda *a: pytest.fail("describe read an array"), raising=False)
    assert f"parameters: {n_lora:,} LoRA + 8 fully trained;" in describe(tmp_path / "ad")
    monkeypatch.undo()
    from safetensors.numpy import load_file, save_file
    weights = str(tmp_path / "ad" / "adapter.safetensors")
    save_id = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["save_id"]
    kept = {k: v for k, v in load_file(weights).items() if k != "q/kernel/b"}
    save_file(kept, weights, metadata={"save_id": save_id})
    for read in (lambda: load_adapter(tmp_path / "ad", base), lambda: describe(tmp_path / "ad")):
        with pytest.raises(ValueError, match=r"do not match its config: missing \['q/kernel/b'\]"):
            read()


def _write_tensor(adapter, key, value):
    """Put ``value`` at ``key`` in a saved adapter's weights, as a hand edit would."""
    from safetensors.numpy import load_file, save_file
    weights = str(adapter / "adapter.safetensors")
    save_id = json.loads((adapter / "adapter_config.json").read_text())["save_id"]
    save_file({**load_file(weights), key: value}, weights, metadata={"save_id": save_id})


def test_a_leaf_trained_in_f32_over_a_bf16_base_loads_as_trained(tmp_path):
    """Mixed precision: the bias trained in f32 over a bf16 model comes back in f32, as
    AdapterCheckpointer.restore gives it; a non-float leaf in its place is refused."""
    base, cfg, p = lora_tree()
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    p = jlora.lora_init(KEY, base, cfg)
    p["q"]["bias"] = jlora.weight.Trainable(jnp.linspace(0.0, 1.0, 8, dtype=jnp.float32))
    save_adapter(tmp_path / "ad", p)
    back = load_adapter(tmp_path / "ad", base)
    assert back["q"]["bias"].value.dtype == jnp.float32
    jax.tree.map(np.testing.assert_array_equal, back, p)
    ckpt = jlora.checkpoint.AdapterCheckpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(1, p)
    jax.tree.map(np.testing.assert_array_equal, ckpt.restore(base)[0], back)
    with pytest.raises(ValueError, match="save_adapter: 'q/bias' is int32; LoRA factors and trained leaves are floating"):
        save_adapter(tmp_path / "int", {**p, "q": {**p["q"], "bias": jlora.weight.Trainable(jnp.arange(8, dtype=jnp.int32))}})
    _write_tensor(save_adapter(tmp_path / "int", p), "q/bias", np.arange(8, dtype=np.int32))  # an int leaf in the file
    with pytest.raises(ValueError, match=r"'q/bias' is int32\[8\] in the adapter, bfloat16\[8\] in the base"):
        load_adapter(tmp_path / "int", base)
    _write_tensor(save_adapter(tmp_path / "wide", p), "q/bias", np.zeros(9, np.float32))  # the config still says [8]
    with pytest.raises(ValueError, match=r"'q/bias' is float32\[9\] in the adapter, bfloat16\[8\] in the base"):
        load_adapter(tmp_path / "wide", base)


def test_a_second_save_replaces_the_first_and_nothing_else(tmp_path, monkeypatch):
    base, cfg, p = lora_tree()
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "notes.txt").write_text("the user's")  # e.g. the model saved beside its adapter
    save_adapter(tmp_path / "ad", p, lora_config=cfg)
    p2 = perturb(p, jax.random.key(5))
    save_adapter(tmp_path / "ad", p2, lora_config=cfg)
    jax.tree.map(np.testing.assert_array_equal, load_adapter(tmp_path / "ad", base), p2)
    assert sorted(f.name for f in (tmp_path / "ad").iterdir()) == ["adapter.safetensors", "adapter_config.json",
                                                                   "notes.txt"]
    # a save that fails half-way leaves the previous adapter whole, and no temporary files
    import safetensors.numpy

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_adapter(tmp_path / "ad", perturb(p, jax.random.key(6)), lora_config=cfg)
    jax.tree.map(np.testing.assert_array_equal, load_adapter(tmp_path / "ad", base), p2)
    assert len(list((tmp_path / "ad").iterdir())) == 3
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        save_adapter(tmp_path / "file", p2)


def test_a_save_interrupted_between_its_two_files_loads_as_the_newer_save(tmp_path, monkeypatch):
    """The weights file goes in place first and carries the save's config: a save stopped before its
    JSON replaced the last one (a kill, a second Ctrl-C) leaves the newer adapter, whole."""
    base, cfg, p = lora_tree()
    save_adapter(tmp_path / "ad", p, lora_config=cfg)
    newer = perturb(p, jax.random.key(9))
    replace = os.replace

    def interrupted(src, dst):  # Ctrl-C after the weights are in place, before the JSON
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(tmp_path / "ad", newer, lora_config=cfg.replace(init="gaussian"))  # a mark of this save
    monkeypatch.setattr(os, "replace", replace)
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["lora_config"]["init"] != "gaussian"  # old
    jax.tree.map(np.testing.assert_array_equal, load_adapter(tmp_path / "ad", base), newer)
    assert jlora.adapter.read_config(tmp_path / "ad")["lora_config"]["init"] == "gaussian"
    assert "q/kernel  8x8" in describe(tmp_path / "ad")
    (tmp_path / "ad" / "adapter_config.json").unlink()  # a first save stopped there: no JSON at all
    jax.tree.map(np.testing.assert_array_equal, load_adapter(tmp_path / "ad", base), newer)
    save_adapter(tmp_path / "ad", p, lora_config=cfg)  # saving again writes both, and clears the leftovers
    jax.tree.map(np.testing.assert_array_equal, load_adapter(tmp_path / "ad", base), p)
    assert not list((tmp_path / "ad").glob(".jlora-write-*"))
    # an adapter whose weights carry no config (written before they did) with a JSON of another save
    from safetensors.numpy import load_file, save_file
    weights = str(tmp_path / "ad" / "adapter.safetensors")
    save_file(load_file(weights), weights, metadata={"save_id": "an-earlier-save"})
    for read in (lambda: load_adapter(tmp_path / "ad", base), lambda: describe(tmp_path / "ad")):
        with pytest.raises(ValueError, match="come from two different saves"):
            read()


def test_a_save_landing_while_an_adapter_is_read_gives_that_save_whole(tmp_path, monkeypatch):
    """A server reloading the adapter a job saves every N steps: a save renamed into place between
    reading the config and the weights has both read again, never a refusal or a mix."""
    base, cfg, p = lora_tree()
    save_adapter(tmp_path / "ad", p)
    newer = perturb(p, jax.random.key(9))
    read, saved = jlora.adapter.read_config, []

    def read_then_saved_over(path):
        config = read(path)
        if not saved:
            saved.append(save_adapter(tmp_path / "ad", newer))
        return config

    monkeypatch.setattr(jlora.adapter, "read_config", read_then_saved_over)
    jax.tree.map(np.testing.assert_array_equal, load_adapter(tmp_path / "ad", base), newer)
    saved.clear()
    save_adapter(tmp_path / "ad", p)
    assert "q/kernel  8x8" in describe(tmp_path / "ad") and saved


def _metadata(file):
    from safetensors import safe_open

    with safe_open(str(file), "np") as f:
        return f.metadata()


def test_bad_adapters_give_clear_errors(tmp_path):
    base, cfg, p = lora_tree()
    with pytest.raises(ValueError, match="not a jlora adapter directory"):
        load_adapter(tmp_path / "nothing", base)
    save_adapter(tmp_path / "ad", p, lora_config=cfg)
    other = {**base, "q": {"kernel": jnp.ones((8, 16)), "bias": jnp.zeros(8)}}
    with pytest.raises(ValueError, match=r"another base model: 'q/kernel' has shape \[8, 16\]"):
        load_adapter(tmp_path / "ad", other)
    with pytest.raises(ValueError, match="another base model: no param at"):
        load_adapter(tmp_path / "ad", {"stack": base["stack"]})
    with pytest.raises(ValueError, match=r"no param at .*; base_params holds them under 'params': pass base_params\['params'\]"):
        load_adapter(tmp_path / "ad", {"params": base})  # linen's variables instead of their params
    save_adapter(tmp_path / "wrapped", {"params": p})  # saved from linen's variables: the other way round
    with pytest.raises(ValueError, match=r"no param at .*; they are base_params' own paths under 'params': pass "
                                         r"\{'params': base_params\}"):
        load_adapter(tmp_path / "wrapped", base)
    for not_params in (None, {}, object()):
        with pytest.raises(ValueError, match="base_params must be the base model's params .*, got "):
            load_adapter(tmp_path / "ad", not_params)
    for metadata in ("run1", ["run1"], {"when": object()}):  # saved, they would break describe and `jlora info`
        with pytest.raises(ValueError, match="save_adapter: metadata must "):
            save_adapter(tmp_path / "meta", p, metadata=metadata)
    assert not (tmp_path / "meta").exists()
    save_adapter(tmp_path / "meta", p, metadata={"loss": jnp.float32(0.5), "steps": np.int64(3)})
    assert "loss: 0.5" in describe(tmp_path / "meta") and "steps: 3" in describe(tmp_path / "meta")
    with pytest.raises(ValueError, match="save_adapter: 'q/(bias|kernel)' holds ShapeDtypeStruct, not an array"):
        save_adapter(tmp_path / "abstract", jax.eval_shape(lambda: p))
    diverged = jax.tree.map(lambda x: x.replace(b=x.b.at[0, 0].set(jnp.nan)) if isinstance(x, jlora.LoraWeight) else x,
                            p, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
    with pytest.raises(ValueError, match=r"save_adapter: NaN or inf in \['q/kernel/b', .*\] \(a diverged run, or a "
                                         r"damaged file\); no adapter is written"):
        save_adapter(tmp_path / "diverged", diverged)
    assert not (tmp_path / "diverged").exists()
    from safetensors.numpy import load_file, save_file  # a file whose numbers were damaged: NaN, read as such
    tensors, metadata = load_file(tmp_path / "ad" / "adapter.safetensors"), _metadata(tmp_path / "ad" / "adapter.safetensors")
    shutil.copytree(tmp_path / "ad", tmp_path / "damaged")
    save_file({**tensors, "q/kernel/a": np.full_like(tensors["q/kernel/a"], np.inf)},
              tmp_path / "damaged" / "adapter.safetensors", metadata=metadata)
    with pytest.raises(ValueError, match=r"damaged/adapter.safetensors: NaN or inf in \['q/kernel/a'\] .*; nothing is "
                                         r"loaded"):
        load_adapter(tmp_path / "damaged", base)
    weights = tmp_path / "ad" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="cannot read adapter weights"):
        load_adapter(tmp_path / "ad", base)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps({**config, "version": 99}))
    with pytest.raises(ValueError, match="format version 99; this jlora reads versions up to 1 .a newer jlora"):
        load_adapter(tmp_path / "ad", base)
    (tmp_path / "ad" / "adapter_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="corrupted JSON"):
        load_adapter(tmp_path / "ad", base)


def test_a_lora_weight_subclass_of_another_value_is_not_saved_as_plain_lora(tmp_path):
    """A DoRA-like subclass (its own materialize, a magnitude beside a and b) has no form in these
    files: saved, it would come back as plain LoRA, computing something else."""
    class Halved(jlora.LoraWeight):
        def materialize(self):
            return 0.5 * super().materialize()

    jax.tree_util.register_pytree_with_keys_class(Halved)
    base, cfg, p = lora_tree()
    lw = p["q"]["kernel"]
    halved = {**p, "q": {**p["q"], "kernel": Halved(lw.w, lw.a, lw.b, scale=lw.scale, path="q/kernel")}}
    for op, save in (("save_adapter", lambda: save_adapter(tmp_path / "ad", halved)),
                     ("AdapterCheckpointer.save", lambda: jlora.checkpoint.AdapterCheckpointer(
                         tmp_path / "ckpt", async_save=False).save(1, halved))):
        with pytest.raises(ValueError, match=rf"{op}: 'q/kernel' is a Halved, a LoraWeight that stands for another "
                                             r"value .* load as plain LoRA"):
            save()
    assert not (tmp_path / "ad").exists()


def test_mistakes_that_would_lose_or_double_an_adapter_are_refused(tmp_path):
    base, cfg, p = lora_tree()
    trainable, frozen = jlora.split(p)
    with pytest.raises(ValueError, match="save_adapter: 'q/bias' comes from the frozen half of jlora.split"):
        save_adapter(tmp_path / "ad", frozen)
    donated = jax.tree.map(jnp.copy, trainable)
    jax.jit(lambda t: t, donate_argnums=0)(donated)  # a step given donate_argnums: the arrays are gone
    with pytest.raises(ValueError, match=r"save_adapter: '.*' was deleted \(donated: given to a jitted step to reuse, donate_argnums"):
        save_adapter(tmp_path / "ad", donated)

    class PeftLikeConfig:  # PEFT's LoraConfig has a to_dict too
        def to_dict(self):
            return {"r": 2}

    for foreign in ({"rank": 2}, PeftLikeConfig()):
        with pytest.raises(ValueError, match="lora_config must be the jlora.LoraConfig the adapter was made with"):
            save_adapter(tmp_path / "ad", p, lora_config=foreign)
    # an ensemble (jax.vmap(lora_init)): its 'io' layout names none of the members' axis, so the file
    # would hold arrays no base fits; refused, whole or halved
    ensemble = jax.vmap(lambda key: jlora.lora_init(key, base, cfg))(jax.random.split(KEY, 3))
    for tree in (ensemble, jlora.split(ensemble)[0]):
        with pytest.raises(ValueError, match=r"'q/kernel' has a \(3, 8, 2\), b \(3, 2, 8\), leading axes more than its "
                                             r"adapter's layout 'io' names \(an ensemble .*; 'bio' with them\)"):
            save_adapter(tmp_path / "ensemble", tree)
    # one adapter over a stack of bases: the trainable half is what to save
    shared = jlora.combine(jlora.split(p)[0], jax.tree.map(lambda x: jnp.stack([x] * 3), jlora.split(p)[1]))
    with pytest.raises(ValueError, match=r"'q/kernel' is one adapter \(a \(8, 2\), b \(2, 8\)\) over a stack of bases "
                                         r"\(w \(3, 8, 8\)\): save the trainable half"):
        save_adapter(tmp_path / "shared", shared)
    # adapters stacked over one base (for jax.vmap over the trainable half): saved one at a time
    trainable, frozen = jlora.split(p)
    stacked = jlora.combine(jax.tree.map(lambda v: jnp.stack([v, v + 1]), trainable), frozen)
    with pytest.raises(ValueError, match=r"'q/kernel' holds adapters stacked over one base \(a \(2, 8, 2\), b \(2, 2, 8\) "
                                         r"over w \(8, 8\)\): save one at a time from the trainable half"):
        save_adapter(tmp_path / "stacked", stacked)
    with pytest.raises(ValueError, match=r"'q/kernel': w \(8,\) has fewer axes than its layout 'io' names, a \(8, 2\) "
                                         r"and b \(2, 8\) do not: a slice of the whole tree cut the base too; slice the "
                                         r"trainable half only"):
        save_adapter(tmp_path / "stacked", jax.tree.map(lambda v: v[1], stacked))  # the base cut too
    with pytest.raises(ValueError, match=r"'stack/kernel' has w \(8, 4\), fewer axes than its layout 'bio' names \(a "
                                         r"\(8, 2\), b \(2, 4\)\): a slice of the whole tree cut the base too"):
        save_adapter(tmp_path / "sliced", jax.tree.map(lambda v: v[1], {"stack": p["stack"]}))  # a layer's cut alike
    save_adapter(tmp_path / "stacked", jax.tree.map(lambda v: v[1], jlora.split(stacked)[0]))
    save_adapter(tmp_path / "ad", p)
    # loaded onto the LoRA tree itself, it would apply twice
    with pytest.raises(ValueError, match=r"base_params holds jlora nodes \(at \['q/bias', 'q/kernel', 'stack/kernel'\]\)"):
        load_adapter(tmp_path / "ad", p)
    # onto an integer kernel, merge would round the adapter away while apply kept it
    with pytest.raises(ValueError, match="'q/kernel' is int8 in the base: an adapter goes on a float kernel"):
        load_adapter(tmp_path / "ad", {**base, "q": {**base["q"], "kernel": base["q"]["kernel"].astype(jnp.int8)}})
    # the PEFT format shares adapter_config.json: one directory holds one adapter
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="holds a PEFT adapter .adapter_model.safetensors., whose adapter_config.json"):
        save_adapter(tmp_path / "peft", p)
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    with pytest.raises(ValueError, match=r"a PEFT adapter, not a jlora one \(jlora.peft.load_adapter reads it\)"):
        load_adapter(tmp_path / "peft", base)


def test_what_is_not_an_adapter_is_not_written_over_one(tmp_path):
    """Integer factors or trained leaves (a cast tree), or two params at one path, are refused before
    the good adapter on disk is replaced; integer factors in a file are refused on load."""
    base, cfg, p = lora_tree()
    save_adapter(tmp_path / "ad", p)
    for dtype in (jnp.int8, jnp.complex64):
        with pytest.raises(ValueError, match=f"save_adapter: 'q/bias' is {np.dtype(dtype)}; LoRA factors and trained"):
            save_adapter(tmp_path / "ad", jax.tree.map(lambda x: x.astype(dtype), p))
    lw = p["q"]["kernel"]
    with pytest.raises(ValueError, match="save_adapter: two params have the path 'q/kernel'"):
        save_adapter(tmp_path / "ad", {"q/kernel": lw, "q": {"kernel": lw.replace(b=lw.b + 1)}})
    jax.tree.map(np.testing.assert_array_equal, load_adapter(tmp_path / "ad", base), p)
    _write_tensor(tmp_path / "ad", "q/kernel/a", np.asarray(lw.a).astype(np.int8))
    with pytest.raises(ValueError, match="tensor 'q/kernel/a' is int8; LoRA factors are floating point"):
        load_adapter(tmp_path / "ad", base)


def test_files_are_readable_as_the_umask_allows(tmp_path):
    """A server running as another user reads the adapter (safetensors writes owner-only files)."""
    _, _, p = lora_tree()
    old = os.umask(0o022)
    try:
        save_adapter(tmp_path / "ad", p)
    finally:
        os.umask(old)
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in (tmp_path / "ad").iterdir()} == {
        "adapter.safetensors": "0o644", "adapter_config.json": "0o644"}


def test_a_hand_edited_config_is_refused_naming_the_entry(tmp_path):
    base, cfg, p = lora_tree()
    config_file = save_adapter(tmp_path / "ad", p) / "adapter_config.json"
    good = json.loads(config_file.read_text())
    q_spec = good["targets"]["q/kernel"]
    for config, match in (
        ([1, 2], "not a jlora adapter .format 'list'."),
        ({k: v for k, v in good.items() if k != "targets"}, "'targets' and 'trainable' must be JSON objects"),
        ({**good, "trainable": ["q/bias"]}, "got dict and list"),
        ({**good, "targets": {**good["targets"], "q/kernel": {**q_spec, "scale": "x"}}}, "target 'q/kernel' is"),
        ({**good, "targets": {**good["targets"], "q/kernel": {**q_spec, "rank": 0}}}, "rank .an int >= 1."),
        ({**good, "targets": {**good["targets"], "q/kernel": {**q_spec, "dropout": 5.0}}}, r"dropout .in \[0, 1\)."),
        ({**good, "targets": {**good["targets"], "q/kernel": {**q_spec, "scale": float("nan")}}}, "scale .a finite number."),
        ({**good, "metadata": "run1"}, "'metadata' must be a JSON object, got str"),
        ({**good, "trainable": {"q/bias": "8"}}, "trainable 'q/bias' is '8'; want its shape"),
        ({**good, "trainable": {**good["trainable"], "q/kernel": [8, 8]}}, r"\['q/kernel'\] are both LoRA targets and fully"),
        ({**good, "targets": {**good["targets"], "q/kernel": {**q_spec, "layout": "xyz"}}},
         "ad: 'q/kernel' in adapter_config.json: layout 'xyz'"),
    ):
        config_file.write_text(json.dumps(config))
        with pytest.raises(ValueError, match=match):
            load_adapter(tmp_path / "ad", base)


def test_an_adapter_loads_onto_a_quantized_base(tmp_path):
    """The same adapter as on the float base, over the lazy (int8) kernel itself; a leaf trained in
    full cannot go where the base is quantized."""
    base, cfg, p = lora_tree()
    save_adapter(tmp_path / "ad", p, lora_config=cfg)
    q8 = quantize(base["q"]["kernel"])
    back = load_adapter(tmp_path / "ad", {**base, "q": {**base["q"], "kernel": q8}})
    assert back["q"]["kernel"].w is q8
    back["q"]["kernel"] = back["q"]["kernel"].replace(w=base["q"]["kernel"])
    jax.tree.map(np.testing.assert_array_equal, back, p)
    with pytest.raises(ValueError, match="'q/bias' was trained in full, but the base holds a lazy Int8Weight"):
        load_adapter(tmp_path / "ad", {**base, "q": {**base["q"], "bias": quantize(base["q"]["bias"])}})


TWO_PROCESS_SAVES = """
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{sys.argv[1]}", 2, int(sys.argv[2]))
import jax.numpy as jnp, numpy as np, jlora
from jax.experimental import multihost_utils
from jlora import sharding
from jlora.checkpoint import AdapterCheckpointer

out, config = sys.argv[3], jlora.LoraConfig(rank=2, targets=["l1", "l2"])
base = {"l1": {"kernel": np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)},
        "l2": {"kernel": np.linspace(1, 2, 32, dtype=np.float32).reshape(8, 4)}}
mesh = sharding.make_mesh({"fsdp": 2, "data": -1})  # fsdp over the two processes
params = jlora.lora_init(jax.random.key(1), sharding.place(base, mesh, [sharding.rule("l1", jax.sharding.PartitionSpec("fsdp"))]), config)
try:
    jlora.adapter.save_adapter(out + "/split", params)
except ValueError as err:
    print("refused:", err)
placed = sharding.place(jlora.split(params)[0], mesh, [])  # the message's recipe: replicated, process 0 writes
print("placed writes here:", jlora.adapter.writes_here("save_adapter", placed))
jlora.adapter.save_adapter(out + "/placed", placed, lora_config=config)
gathered = multihost_utils.process_allgather(jlora.split(params)[0], tiled=True)  # numpy: this process's own
jlora.adapter.save_adapter(out + f"/gathered{jax.process_index()}", gathered, lora_config=config)
replicated = jlora.lora_init(jax.random.key(1), sharding.place(base, mesh, []), config)  # data parallel
for _ in range(20):  # every process saves: process 0 writes, the others leave its files alone
    jlora.adapter.save_adapter(out + "/replicated", replicated, lora_config=config)
tp_mesh = sharding.make_mesh({"data": 2, "model": -1})  # tensor parallel inside each process, data across them
tp_rules = [sharding.rule("l1", jax.sharding.PartitionSpec(None, "model")),
            sharding.rule("l2", jax.sharding.PartitionSpec("model", None))]
tp = jlora.lora_init(jax.random.key(1), sharding.place(base, tp_mesh, tp_rules), config)
assert not tp["l1"]["kernel"].b.is_fully_replicated and not tp["l2"]["kernel"].a.is_fully_replicated
jlora.adapter.save_adapter(out + "/tensor_parallel", tp, lora_config=config)  # held whole by each: process 0 writes
try:
    jlora.adapter.host_array(params["l1"]["kernel"].a, "'l1/kernel' a")
except ValueError as err:
    print("host_array refused:", err)
local = jlora.lora_init(jax.random.key(1), jax.tree.map(jnp.asarray, base), config)  # on one device of each process
with AdapterCheckpointer(out + "/ckpt", async_save=False) as ckpt:
    ckpt.save(1, local)
    restored, _, _ = ckpt.restore(base)  # numpy base: onto one device of each process
    ckpt.save(2, jax.tree.map(lambda x: x * 2, restored))
multihost_utils.sync_global_devices("done")
jax.distributed.shutdown()
"""


def test_two_processes_save_an_adapter_from_process_0_and_checkpoint_their_own_arrays(tmp_path, cpu_env):
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = cpu_env(2)
    procs = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_SAVES, str(port), str(i), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    for i, out in enumerate(outs):
        assert "refused: save_adapter: 'l1/kernel' is split across the devices of several processes" in out
        assert "trainable = jlora.sharding.place(jlora.split(params)[0], mesh, [])" in out
        assert f"placed writes here: {i == 0}" in out
        assert "host_array refused: 'l1/kernel' a (8, 2) is split across the devices of several processes" in out
    base = {"l1": {"kernel": np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)},
            "l2": {"kernel": np.linspace(1, 2, 32, dtype=np.float32).reshape(8, 4)}}
    with jax.default_device(jax.devices("cpu")[0]):  # the processes ran on CPU; a GPU draws other last bits
        want = jlora.lora_init(jax.random.key(1), base, jlora.LoraConfig(rank=2, targets=["l1", "l2"]))
    saved = [load_adapter(tmp_path / name, base) for name in ("placed", "gathered0", "gathered1", "replicated", "tensor_parallel")]
    assert not list(tmp_path.glob("replicated/.jlora-write-*"))
    from jlora.checkpoint import AdapterCheckpointer

    doubled, _, step = AdapterCheckpointer(tmp_path / "ckpt").restore(base)
    assert step == 2
    for name in ("l1", "l2"):
        for part in ("a", "b"):
            want_part = getattr(want[name]["kernel"], part)
            for got in saved:
                np.testing.assert_array_equal(getattr(got[name]["kernel"], part), want_part)
            np.testing.assert_array_equal(getattr(doubled[name]["kernel"], part), 2 * want_part)


def test_an_adapter_loaded_onto_a_deeper_base_says_which_kernels_it_leaves_as_they_are(tmp_path):
    """all-MiniLM-L6's adapter on -L12: the saved config adapts kernels the adapter has none for."""
    layer = lambda k: {"q": {"kernel": jax.random.normal(jax.random.key(k), (8, 8))}}
    cfg = jlora.LoraConfig(rank=2, targets=["q"])
    shallow = {"layers": {"0": layer(0), "1": layer(1)}}
    save_adapter(tmp_path / "ad", jlora.lora_init(KEY, shallow, cfg), lora_config=cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(tmp_path / "ad", shallow)  # its own base: no warning
        load_adapter(tmp_path / "ad", {**shallow, "pooler": layer(5)})  # a module the trained model lacked: none
        f16 = jax.tree.map(lambda x: x.astype(jnp.float16), shallow)  # the config's advice on Adam is for training
        with pytest.warns(UserWarning, match="float16"):
            cfg16 = jlora.LoraConfig(rank=2, targets=["q"], param_dtype=jnp.float16)
        save_adapter(tmp_path / "ad16", jlora.lora_init(KEY, f16, cfg16), lora_config=cfg16)
        load_adapter(tmp_path / "ad16", f16)
    deeper = {"layers": {**shallow["layers"], "2": layer(2)}}
    with pytest.warns(UserWarning, match=r"its config adapts 1 kernel\(s\) of this base that the adapter holds no "
                                         r"adapter for, left as they are .*\['layers/2/q/kernel'\]"):
        loaded = load_adapter(tmp_path / "ad", deeper)
    assert not isinstance(loaded["layers"]["2"]["q"]["kernel"], jlora.LoraWeight)
    # all-linear over (out, in) 'weight' leaves (Equinox's Linear), which only infer_layout tells from norms
    torch_style = lambda n: {"layers": {str(k): {"lin": {"weight": layer(k)["q"]["kernel"]}} for k in range(n)}}
    forward = lambda p: sum(jnp.ones(8) @ p["layers"][k]["lin"]["weight"].T for k in p["layers"])
    cfg = jlora.LoraConfig(rank=2, targets="all-linear")
    save_adapter(tmp_path / "eqx", jlora.lora_init(KEY, torch_style(2), cfg, infer_layout=forward), lora_config=cfg)
    with pytest.warns(UserWarning, match=r"holds no adapter for, left as they are .*\['layers/2/lin/weight'\]"):
        load_adapter(tmp_path / "eqx", torch_style(3))


def test_an_adapter_loaded_over_another_base_of_the_same_shapes_is_told(tmp_path):
    """A random init where the pretrained model was meant (or another checkpoint, or a base its
    init changed) loads silently in PEFT; jlora names the kernels that differ from the ones the
    adapter was saved over. The same base in bf16, quantized, abstract or sharded is the same."""
    base, cfg, p = lora_tree()
    save_adapter(tmp_path / "ad", p, lora_config=cfg)
    assert len(read_config(tmp_path / "ad")["targets"]["q/kernel"]["base"]) == 4
    other = {**base, "q": {**base["q"], "kernel": jax.random.normal(jax.random.key(7), (8, 8))}}
    with pytest.warns(UserWarning, match=r"the base differs from the one the adapter was saved over at 1 of 2 adapted "
                                         r"kernels \(\['q/kernel'\]\): a random init where the pretrained model was "
                                         r"meant \(from_config, not from_pretrained\?\)"):
        back = load_adapter(tmp_path / "ad", other)
    assert back["q"]["kernel"].w is other["q"]["kernel"]  # loaded all the same
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for same_base in (jax.tree.map(lambda x: x.astype(jnp.bfloat16), base),
                          {**base, "q": {**base["q"], "kernel": quantize(base["q"]["kernel"])}},
                          jax.eval_shape(lambda: base),
                          jlora.sharding.place(base, jlora.sharding.make_mesh({"fsdp": -1}), [jlora.sharding.fsdp(min_size=1)])):
            load_adapter(tmp_path / "ad", same_base)
        save_adapter(tmp_path / "half", jlora.split(p)[0], lora_config=cfg)  # no base to take a fingerprint of
        assert "base" not in read_config(tmp_path / "half")["targets"]["q/kernel"]
        load_adapter(tmp_path / "half", other)
