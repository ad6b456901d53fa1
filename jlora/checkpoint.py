"""Adapter checkpoints with orbax: the trainable half only, optionally the optimizer state.

Built on ``orbax.checkpoint.CheckpointManager``: keep the last N (or the best N by a metric),
asynchronous saves that do not stall training, and orbax's own atomic commit (a step directory is
renamed into place only when complete, so a process killed mid-save leaves the previous step
restorable). Arrays are stored under their param paths, so a restore needs only the directory and
the base params (or their abstract shapes and shardings).

Example:
    >>> import jlora
    >>> ckpt = jlora.checkpoint.AdapterCheckpointer("/tmp/run/ckpt", max_to_keep=2)  # doctest: +SKIP
    >>> ckpt.save(step, params, opt_state=opt_state, metrics={"loss": loss})  # doctest: +SKIP
    >>> params, opt_state, step = ckpt.restore(base_params, opt_state_like=opt_state)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
import os
import re
import sys
import threading
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from jlora import _compat
from jlora.adapter import (check_base, check_config_makes, is_saveable_array, replicated_hint, saved_arrays,
                           unadapted_layers)
from jlora.config import ALL_LINEAR, LoraConfig
from jlora.layout import Layout
from jlora.paths import DELETED, is_deleted, path_str, replace_leaves
from jlora.sharding import check_base_sharding, factor_shardings
from jlora.weight import LoraWeight, Trainable, is_param


def _adapter_arrays(params: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``({path: array}, {path: spec})`` for the trainable half of ``params``."""
    arrays, adapters, trained = saved_arrays("AdapterCheckpointer.save", params)
    specs = {p: {"kind": "lora", "layout": str(x.layout), "scale": x.scale, "dropout": x.dropout,
                 "rank": x.rank, "dtype": np.dtype(x.a.dtype).name, "b_dtype": np.dtype(x.b.dtype).name,
                 "shape": list(x.kernel_shape)} for p, x in adapters.items()}
    specs |= {p: {"kind": "trainable", "dtype": np.dtype(x.dtype).name, "shape": list(np.shape(x))}
              for p, x in trained.items()}
    return arrays, specs


def _as_global(arrays: dict[str, Any]) -> dict[str, Any]:
    """In a job of several processes, each array that lives on this process's devices only (one
    device's, as a restore from numpy base params or ``pmap``'s replica gives) as a numpy array:
    orbax refuses a process's own ``jax.Array`` there, and writes a numpy one as process 0 holds it."""
    if jax.process_count() == 1:
        return arrays
    local = lambda x: isinstance(x, jax.Array) and x.is_fully_addressable
    return {k: np.asarray(x) if local(x) else x for k, x in arrays.items()}


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _impl_name(key: Any) -> str:
    """The name of a typed PRNG key's implementation (``"threefry2x32"``), of a concrete key or of a
    ``jax.ShapeDtypeStruct`` of one (``jax.eval_shape``'s), found by its dtype."""
    if not isinstance(key, jax.ShapeDtypeStruct):
        return str(jax.random.key_impl(key))
    impls = ("threefry2x32", "rbg", "unsafe_rbg")
    return next(name for name in impls if jax.random.key(0, impl=name).dtype == key.dtype)


def _flat(tree: Any, keys_as_data: bool = True) -> dict[str, Any]:
    """Leaves by position; a typed PRNG key (``noisy_sgd``'s state) as its raw data, which every
    orbax version stores alike (abstract keys as the data's shape); with ``keys_as_data=False``,
    as the key itself (how jlora saved one before it recorded ``opt_state_keys``)."""
    def raw(x: Any) -> Any:
        if not _is_key(x) or not keys_as_data:
            return x
        return jax.eval_shape(jax.random.key_data, x) if isinstance(x, jax.ShapeDtypeStruct) else jax.random.key_data(x)

    return {str(i): raw(leaf) for i, leaf in enumerate(jax.tree.leaves(tree))}


class AdapterCheckpointer:
    """Save and restore adapters (and optimizer state) through an orbax ``CheckpointManager``.

    Args:
      directory: where step directories go.
      max_to_keep: how many checkpoints to keep (the newest, or the best with ``best_metric``).
      best_metric: a key of the ``metrics`` given to ``save``; keeps the best ``max_to_keep``. A
        save whose metric is NaN or infinite (a diverged run) is refused, keeping the steps saved.
      best_mode: ``"min"`` or ``"max"`` for ``best_metric``.
      async_save: write in a background thread; ``wait()`` (or ``close()``, or the end of a
        ``with`` block) joins it, raising its error, and so does the end of the program, where an
        error is printed to stderr (the exit status is the script's: call ``close()`` to have it).
        In a job of several processes a save commits through them all: call ``close()`` before
        ``jax.distributed.shutdown()``, or the last save is lost.
      lora_config: the ``jlora.LoraConfig`` the adapters were made with, kept with each step
        (``saved_config`` reads it back); ``save`` checks that it gives each adapter its rank, scale
        and dropout, and ``restore`` refuses a step saved with a config that makes other adapters
        (targets, ranks, scales; or, saved with none, adapters this one would not make), or onto a
        base where it adapts more layers than the step has adapters for: resumed with an edited
        config, the adapters would be the saved config's. Its LoRA dropout is the restored adapters'
        (without it, the step's): a resumed run may change the rate.

    Steps are read from the directory at each call, so a checkpointer sees the steps other processes
    save (an evaluator polling a trainer's directory). In a job of several processes (``jax.distributed``)
    make it, save and restore on every process, with the same arguments, as orbax synchronises
    them (a save that one process refuses, or that the processes call differently, is refused on
    all; ``metrics`` may differ, and process 0's are saved and rank the steps on every process);
    process 0 writes what all processes hold alike. ``saved_config``, ``all_steps``,
    ``latest_step`` and ``best_step`` read files only: one process may call them alone.

    Example:
        >>> import tempfile, jax, jax.numpy as jnp, jlora
        >>> base = {"dense": {"kernel": jnp.ones((4, 4))}}
        >>> params = jlora.lora_init(jax.random.key(0), base, jlora.LoraConfig(rank=2, targets=["dense"]))
        >>> ckpt = jlora.checkpoint.AdapterCheckpointer(tempfile.mkdtemp(), async_save=False)
        >>> ckpt.save(7, params)
        True
        >>> restored, _, step = ckpt.restore(base)
        >>> step, restored["dense"]["kernel"].a.shape, ckpt.all_steps(), ckpt.latest_step(), ckpt.best_step()
        (7, (4, 2), [7], 7, 7)
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, best_metric: str | None = None,
                 best_mode: str = "min", async_save: bool = True, lora_config: Any = None):
        if best_mode not in ("min", "max"):
            raise ValueError(f"AdapterCheckpointer: best_mode must be 'min' or 'max', got {best_mode!r}")
        if max_to_keep is not None and (isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int)
                                        or max_to_keep < 1):  # orbax's 0 deletes every step, older runs' too
            raise ValueError(f"AdapterCheckpointer: max_to_keep must be an int >= 1, or None to keep every "
                             f"step; got {max_to_keep!r}")
        if lora_config is not None and not isinstance(lora_config, LoraConfig):
            raise ValueError("AdapterCheckpointer: lora_config must be the jlora.LoraConfig the adapters were made "
                             f"with, got {type(lora_config).__name__}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            best_fn=(lambda metrics: metrics[best_metric]) if best_metric else None,
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            create=False,  # made by the first save: a restore from a mistyped path must not create it
        )
        self.directory = os.path.abspath(directory)  # a later os.chdir must not move it
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise ValueError(f"AdapterCheckpointer: {self.directory} is a file, not a directory")
        self.best_metric, self._best_mode, self._max_to_keep = best_metric, best_mode, max_to_keep
        self.lora_config = lora_config
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._reload_next = False
        self._own_steps: set[int] = set()  # steps seen to be adapter checkpoints (see _foreign_items)
        self._saved_ranking = self._read_ranking()
        self._closed = False
        self._async = async_save

    def save(self, step: int, params: Any, *, opt_state: Any = None, metrics: dict | None = None,
             force: bool = False) -> bool:
        """Save the trainable half of ``params`` (and ``opt_state``) as ``step``. Returns whether
        it was written: like orbax, a step not newer than the latest saved one is skipped (``False``,
        with a warning: a new run in an old run's directory would otherwise lose every save).
        ``force=True`` writes such a step too, but never over one on disk, nor where keeping the last
        ``max_to_keep`` saved (it counts as the newest) would delete a newer step (errors)."""
        self._check_open("save")
        step = _step_index("save", step)
        try:
            self._manager.wait_until_finished()  # as orbax's save does first; then the directory as it is now
            self._refresh()
            checked, refusal = self._checked_save(step, params, opt_state, metrics, force), None
        except Exception as err:  # any: in a job of several processes, the others must hear of it
            checked, refusal = None, err
        metrics = _agree_across_processes(step, checked, refusal, opt_state is not None, self.lora_config, force)
        if checked is False:
            return False
        arrays, specs, _ = checked
        os.makedirs(self.directory, exist_ok=True)
        meta = {"specs": specs, "lora_config": self.lora_config.to_dict() if self.lora_config else None,
                "ranking": self._ranking()}
        items = {"adapters": ocp.args.StandardSave(arrays)}
        if opt_state is not None:
            flat = _as_global(_flat(opt_state))
            if flat:  # orbax refuses an empty item (plain SGD's state): the metadata alone says it was saved
                items["opt_state"] = ocp.args.StandardSave(flat)
            meta["opt_state"] = [list(np.shape(x)) for x in flat.values()]
            meta["opt_state_dtypes"] = [str(_dtype_of(x)) for x in flat.values()]
            meta["opt_state_paths"] = _key_paths(opt_state)
            meta["opt_state_keys"] = {str(i): _impl_name(x)  # to wrap their data again
                                      for i, x in enumerate(jax.tree.leaves(opt_state)) if _is_key(x)}
        items["meta"] = ocp.args.JsonSave(meta)
        saved = self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)
        self._reload_next = force  # orbax holds an older step forced in as its newest: a reload orders it
        if saved and self._async:  # a script that ends without wait() or close() must not lose its last save
            _finish_at_exit(self)
        return saved

    def _checked_save(self, step: int, params: Any, opt_state: Any, metrics: Any, force: bool) -> Any:
        """What ``save`` writes, ``(arrays, specs, metrics)``, after every check of this process's
        arguments (a ``ValueError`` names what is wrong); ``False`` for a step not newer than the
        latest on disk (with a warning)."""
        steps = list(self._manager.all_steps())
        latest = max(steps, default=None)
        if force and step in steps:
            raise ValueError(f"AdapterCheckpointer.save: step {step} is already in {self.directory}, and a save never "
                             "replaces one; save into a new directory to start over")
        if (force and latest is not None and step < min(steps) and self.best_metric is None
                and self._max_to_keep is not None and len(steps) >= self._max_to_keep):
            raise ValueError(f"AdapterCheckpointer.save: step {step} not written: forced in beside steps {sorted(steps)}, "
                             f"it would count as the newest, and keeping the last {self._max_to_keep} saved "
                             f"(max_to_keep) would delete step {min(steps)}, newer than it; raise max_to_keep, or save into "
                             "another directory")
        if not force and latest is not None and step <= latest:
            warnings.warn(f"AdapterCheckpointer.save: step {step} not written: {self.directory} already holds "
                          f"step {latest}, and saved steps only increase; save into a new directory to start over",
                          stacklevel=3)
            return False
        if metrics is not None and not isinstance(metrics, Mapping):
            raise ValueError(f"AdapterCheckpointer.save: metrics must be a dict of names to numbers, got {metrics!r}")
        if metrics is not None:
            metrics = {k: _json_scalar(k, v) for k, v in metrics.items()}
        if self.best_metric is not None:
            value = (metrics or {}).get(self.best_metric)
            if not isinstance(value, float):
                raise ValueError(f"AdapterCheckpointer.save: metrics must hold a number under '{self.best_metric}' "
                                 f"(best_metric); got {metrics!r}")
            if not math.isfinite(value):  # orbax would rank it above the good steps and delete those
                raise ValueError(f"AdapterCheckpointer.save: step {step} not written: metrics['{self.best_metric}'] "
                                 f"is {value}, so it cannot be ranked against the kept steps {self.all_steps()}")
        self._check_ranking("save")
        foreign = {s: items for s in steps if (items := self._foreign_items(s)) is not None}
        if foreign:  # orbax would prune them as this checkpointer's own steps (max_to_keep)
            step_, items = next(iter(foreign.items()))
            raise ValueError(f"AdapterCheckpointer.save: {self.directory} holds steps {sorted(foreign)} that "
                             f"AdapterCheckpointer did not write (step {step_} holds {items}), and keeping its last "
                             "steps would delete them; save the adapters into a directory of their own")
        arrays, specs = _adapter_arrays(params)
        arrays = _as_global(arrays)
        if self.lora_config is not None:
            check_config_makes("AdapterCheckpointer.save", self.lora_config, params)
        if opt_state is not None:
            _check_arrays(opt_state)
            _check_state_fits(params, opt_state)
        return arrays, specs, metrics

    def restore(self, base_params: Any, step: int | None = None, *, opt_state_like: Any = None) -> tuple[Any, Any, int]:
        """``(params, opt_state, step)``: ``base_params`` (arrays or ``jax.ShapeDtypeStruct`` with
        shardings) with the saved adapters; ``opt_state`` restored into the structure, dtypes and
        shardings of ``opt_state_like`` (e.g. ``tx.init(trainable)`` or its ``jax.eval_shape``), or
        ``None``. Defaults to the latest step. Refused, naming the leaf: a base sharding that does not
        divide a kernel, an ``opt_state_like`` placed on other devices than the base (one kept from
        a run on another mesh), or of integers where the step saved floats."""
        self._check_open("restore")
        if callable(getattr(opt_state_like, "init", None)) and callable(getattr(opt_state_like, "update", None)):
            raise ValueError("AdapterCheckpointer.restore: opt_state_like is an optax transformation; pass a state of "
                             "it, e.g. tx.init(trainable) or jax.eval_shape(tx.init, trainable)")
        step, meta = self._meta(step)
        specs = meta["specs"]
        self._check_config(step, meta["lora_config"])
        like_flat = None if opt_state_like is None else _flat(opt_state_like)
        # a state saved before jlora recorded its keys (opt_state_keys) has their shapes as keys, not data
        keys = meta.get("opt_state_keys")
        if like_flat is not None:
            _check_opt_state(self.directory, step, meta, opt_state_like,
                             like_flat if keys is not None else _flat(opt_state_like, keys_as_data=False))
            if keys is None:
                keys = {str(i): _impl_name(x) for i, x in enumerate(jax.tree.leaves(opt_state_like)) if _is_key(x)}
        trainable = [p for p, s in specs.items() if s["kind"] == "trainable"]
        by_path = check_base(self.directory, base_params, [p for p in specs if p not in trainable], trainable)
        legacy = any("shape" not in spec for spec in specs.values())  # written before shapes were kept
        for p, spec in specs.items():
            if not legacy and tuple(spec["shape"]) != tuple(by_path[p].shape):
                raise ValueError(f"{self.directory}: checkpoint for another base model: '{p}' has shape "
                                 f"{tuple(by_path[p].shape)} here but {tuple(spec['shape'])} in the checkpoint"
                                 f"{replicated_hint(by_path[p].shape, spec['shape'])}")
        for p in specs:  # an abstract base may carry a sharding JAX refuses for the adapters put alike
            check_base_sharding(str(self.directory), p, by_path[p])
        default = _default_placement(by_path)
        targets = None if legacy else _adapter_targets(specs, by_path, default)  # legacy: LoraWeight checks shapes
        if like_flat:
            _check_state_devices(self.directory, opt_state_like, by_path, targets)
        restore_args = {"adapters": ocp.args.StandardRestore(targets)}
        if like_flat:
            restore_args["opt_state"] = ocp.args.StandardRestore(_abstract_state(opt_state_like, like_flat, targets,
                                                                                 default))
        try:
            got = self._manager.restore(step, args=ocp.args.Composite(**restore_args))
        except (KeyError, OSError, ValueError) as err:
            if not _damaged(err):
                raise
            raise self._corrupted(step, f"{type(err).__name__}: {str(err)[:300]}") from err
        arrays = _on_device(got["adapters"])
        # LoRA dropout is the lora_config's where one is given (a resumed run may change it), else the step's
        dropout = lambda spec: spec.get("dropout", 0.0) if self.lora_config is None else self.lora_config.dropout
        new = {p: Trainable(arrays[p]) if spec["kind"] == "trainable" else
               LoraWeight(by_path[p], arrays[f"{p}/a"], arrays[f"{p}/b"], scale=spec["scale"], layout=spec["layout"], path=p,
                          dropout=dropout(spec)) for p, spec in specs.items()}
        params = replace_leaves(base_params, new, is_leaf=is_param)
        if self.lora_config is not None and meta["lora_config"] is None:  # saved without one: the adapters say
            check_config_makes("AdapterCheckpointer.restore", self.lora_config, params)
        config = meta["lora_config"] or (self.lora_config.to_dict() if self.lora_config is not None else None)
        missing = unadapted_layers(config, by_path, {p for p, spec in specs.items() if spec["kind"] != "trainable"})
        if missing and self.lora_config is not None:  # it would be saved beside adapters it does not describe
            raise ValueError(f"{self.directory}: checkpoint for another base model: lora_config adapts "
                             f"{len(missing)} kernel(s) of this base, in layers of the modules step {step} has "
                             f"adapters for, that it holds none for (a deeper base than the one it was trained "
                             f"on?): {missing[:4]}")
        if missing:
            warnings.warn(f"{self.directory}: step {step}'s config adapts {len(missing)} kernel(s) of this base that it "
                          "holds no adapter for, left as they are (a deeper base than the one it was trained on?): "
                          f"{missing[:4]}", stacklevel=2)
        opt_state = None
        if opt_state_like is not None:
            saved = _on_device(dict(got["opt_state"])) if like_flat else {}
            for i, impl in keys.items():
                saved[i] = jax.random.wrap_key_data(saved[i], impl=impl)
            opt_state = jax.tree.unflatten(jax.tree.structure(opt_state_like), [saved[str(i)] for i in range(len(saved))])
        return params, opt_state, step

    def _check_config(self, step: int, saved: dict | None) -> None:
        """Refuse to restore adapters made with a config that makes other adapters than this
        checkpointer's ``lora_config`` (other targets, ranks, scales, leaves trained whole): they would
        be the saved config's, and this one would be saved beside them. Options that only start an
        adapter or a step (``init``, ``param_dtype``, ``dropout``: restored from the step) may differ."""
        if self.lora_config is None or saved is None:
            return
        with warnings.catch_warnings():  # the config's own advice (float16 factors) was given when it was made
            warnings.simplefilter("ignore")
            theirs, ours = _what_it_makes(LoraConfig(**saved)), _what_it_makes(self.lora_config)
        differ = [f"{k}={theirs[k]!r} there, {ours[k]!r} here" for k in theirs if theirs[k] != ours[k]]
        if differ:
            raise ValueError(f"AdapterCheckpointer.restore: step {step} of {self.directory} was saved with another "
                             f"LoraConfig than this checkpointer's lora_config ({'; '.join(differ)}): to go on "
                             "training those adapters, pass lora_config=AdapterCheckpointer(directory).saved_config(); "
                             "for adapters of the new config, lora_init them and save into another directory")

    def saved_config(self, step: int | None = None) -> LoraConfig | None:
        """The ``LoraConfig`` saved with ``step`` (default: the latest), or ``None`` if none was given.

        Example:
            >>> import tempfile, jax, jax.numpy as jnp, jlora
            >>> cfg = jlora.LoraConfig(rank=2, targets=["dense"])
            >>> params = jlora.lora_init(jax.random.key(0), {"dense": {"kernel": jnp.ones((4, 4))}}, cfg)
            >>> directory = tempfile.mkdtemp()
            >>> jlora.checkpoint.AdapterCheckpointer(directory, async_save=False, lora_config=cfg).save(1, params)
            True
            >>> jlora.checkpoint.AdapterCheckpointer(directory).saved_config() == cfg
            True
        """
        self._check_open("saved_config")
        saved = self._meta(step)[1]["lora_config"]
        return None if saved is None else LoraConfig(**saved)

    def _meta(self, step: int | None) -> tuple[int, dict]:
        """``(step, its metadata)``, the latest step by default; a clear error when there is none."""
        if not os.path.isdir(self.directory):
            raise ValueError(f"{self.directory}: no such directory, so no checkpoint to restore")
        steps = self.all_steps()
        step = max(steps, default=None) if step is None else _step_index("restore", step)
        if step is None:
            written_by_save_adapter = os.path.isfile(os.path.join(self.directory, "adapter_config.json"))
            raise ValueError(f"{self.directory}: no checkpoint to restore" + (
                " (it is an adapter directory, as save_adapter and jlora finetune write: read it with "
                "jlora.adapter.load_adapter)" if written_by_save_adapter else ""))
        if step not in steps:
            raise ValueError(f"{self.directory}: no checkpoint of step {step}; steps: {steps}")
        foreign = self._foreign_items(step)
        if foreign is not None:
            raise ValueError(f"{self.directory}: step {step} was not written by AdapterCheckpointer (it holds "
                             f"{foreign}): read it with orbax itself")
        if self._manager.is_saving_in_progress():  # its own step: read once written
            self._manager.wait_until_finished()
        meta = self._step_meta(step)  # from the file: orbax's restore would wait for every process
        if not (isinstance(meta, dict) and "specs" in meta):
            raise self._corrupted(step, "its metadata cannot be read" if meta is None else
                                  "its metadata holds no adapter specs")
        return step, meta

    def _foreign_items(self, step: int) -> list[str] | None:
        """The items of a step another writer saved here (plain orbax: no ``adapters`` item, and no
        ``meta`` item or one holding no adapter specs), or ``None`` for an adapter checkpoint, a
        damaged one included. Read from the step's files, once per step found to be an adapter
        checkpoint."""
        if step in self._own_steps:
            return None
        where = os.path.join(self.directory, str(step))
        try:
            names = os.listdir(where)
        except OSError:
            return None
        items = sorted(name for name in names if os.path.isdir(os.path.join(where, name)))
        if not names:  # nobody's checkpoint (a copy cut short): named damaged on restore
            return None
        if "adapters" in items:  # its metadata lost: still an adapter checkpoint, named damaged on restore
            self._own_steps.add(step)
            return None
        if "meta" in items:
            meta = self._step_meta(step)  # None, damaged: an adapter checkpoint still, named as such on restore
            if not isinstance(meta, dict) or "specs" in meta:
                self._own_steps.add(step)
                return None
        return items

    def _step_meta(self, step: int) -> Any:
        """The JSON of a step's ``meta`` item, read from its file, or ``None`` where it cannot be read.
        Not through orbax's restore, which would wait for every process (a call on one process alone
        would hang) and for a save in flight."""
        try:
            with open(os.path.join(self.directory, str(step), "meta", "metadata")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _corrupted(self, step: int, reason: str) -> ValueError:
        if not os.path.isdir(os.path.join(self.directory, str(step))):  # pruned by a writer as it was read
            return ValueError(f"{self.directory}: step {step} was deleted while it was read (the writer keeps only "
                              f"its last steps, max_to_keep); restore another step of {self.all_steps()}")
        others = [s for s in self.all_steps() if s != step]
        return ValueError(f"{self.directory}: step {step} is incomplete or corrupted ({reason}); "
                          + (f"restore another step of {self.all_steps()}" if others else "it is the only step"))

    def latest_step(self) -> int | None:
        """The newest saved step, or ``None``."""
        return max(self.all_steps(), default=None)

    def best_step(self) -> int | None:
        """The step with the best ``best_metric`` (the latest without one), or ``None``."""
        self._check_ranking("best_step")
        self._refresh()
        return self._manager.best_step()

    def _ranking(self) -> list | None:
        """``[best_metric, best_mode]``, or ``None`` when steps are kept by recency."""
        return None if self.best_metric is None else [self.best_metric, self._best_mode]

    def _read_ranking(self) -> list | None:
        """The ranking the directory's newest readable step was saved with; this checkpointer's own
        where there is none (no step, none readable, or one saved before rankings were kept)."""
        for step in sorted(self.all_steps(), reverse=True):
            meta = self._step_meta(step)  # None (damaged) or another writer's: the step before
            if isinstance(meta, dict) and "specs" in meta:
                return meta.get("ranking", self._ranking())
        return self._ranking()

    def _check_ranking(self, op: str) -> None:
        """Refuse to prune or rank the directory's steps otherwise than they were saved: reopened
        without its ``best_metric``, orbax would keep the newest steps and delete the best."""
        if self._saved_ranking != self._ranking():
            how = _describe_ranking(self._saved_ranking)
            raise ValueError(f"AdapterCheckpointer.{op}: {self.directory} keeps its steps {how}, this checkpointer "
                             f"{_describe_ranking(self._ranking())}: it would rank them otherwise and keep other "
                             f"steps; open it with {how}")

    def all_steps(self) -> list[int]:
        """Every step kept on disk, oldest first."""
        self._refresh()
        return sorted(self._manager.all_steps())

    def _refresh(self) -> None:
        """Read the directory's steps again where they are not the ones the manager knows: another
        process (the trainer, for an evaluator) may have saved or pruned some since. Only then:
        orbax's reload reads every step's metadata, a cost growing with the steps kept. Not while a
        save of this checkpointer's is in flight: its step is not on disk yet, and the directory
        holds nobody else's."""
        if self._manager.is_saving_in_progress():
            return
        if self._reload_next or self._steps_on_disk() != set(self._manager.all_steps()):
            for attempt in range(3):
                try:
                    self._manager.reload()
                    break
                except FileNotFoundError:  # a step the writer pruned (max_to_keep) while orbax listed it
                    if attempt == 2:
                        raise
            self._reload_next = False

    def _steps_on_disk(self) -> set[int]:
        """The steps whose directories are in ``directory`` (orbax names a finished one by its number)."""
        try:
            return {int(name) for name in os.listdir(self.directory) if name.isdigit()}
        except FileNotFoundError:
            return set()

    def wait(self) -> None:
        """Block until an asynchronous save has finished."""
        self._manager.wait_until_finished()
        _PENDING.discard(self)

    def close(self) -> None:
        """Finish any pending save and release the manager; later saves and restores are refused."""
        _PENDING.discard(self)
        self._manager.close()
        self._closed = True

    def _check_open(self, op: str) -> None:
        if self._closed:
            raise ValueError(f"AdapterCheckpointer.{op}: {self.directory} was closed; make a new AdapterCheckpointer")

    def __enter__(self) -> "AdapterCheckpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# Asynchronous checkpointers with a save not yet waited for, held until then: one dropped right
# after its save (a temporary) still has that save running.
_PENDING: "set[AdapterCheckpointer]" = set()
_HOOKED = False


def _finish_at_exit(ckpt: AdapterCheckpointer) -> None:
    """Finish ``ckpt``'s pending save when the program ends. The hook must run before Python joins
    the threads of ``concurrent.futures``, which orbax's asynchronous saves need, and atexit's
    functions run only after that join; threading's own exit hooks run before it, the last
    registered first (``threading._register_atexit``, CPython 3.9+; where it is missing, call
    ``wait()`` or ``close()`` yourself)."""
    global _HOOKED
    _PENDING.add(ckpt)
    register = getattr(threading, "_register_atexit", None)
    if not _HOOKED and register is not None:
        register(_finish_pending)
        _HOOKED = True


def _finish_pending() -> None:
    for ckpt in list(_PENDING):
        try:
            ckpt.wait()
        except Exception as err:  # one failure must not keep the others (and Python's own hooks) from running
            print(f"ERROR: AdapterCheckpointer: the last save to {ckpt.directory} failed at exit: {err!r}; "
                  "call wait() or close() before the end (and before jax.distributed.shutdown()) to have it "
                  "finished or raised", file=sys.stderr)


def _step_index(op: str, step: Any) -> int:
    """``step`` as a plain int: an int, or an integer scalar of numpy or JAX (a TrainState's step)."""
    try:
        index = None if isinstance(step, bool) else operator.index(step)
    except TypeError:
        index = None
    if index is None or index < 0:
        raise ValueError(f"AdapterCheckpointer.{op}: step must be an int >= 0, got {step!r}")
    return index


def _json_scalar(name: str, value: Any) -> Any:
    """A metric as the JSON value orbax writes: a number (a Python int, a 0-d jax or numpy array)
    as a float, a 0-d boolean as a bool, strings and JSON's lists and dicts as they are; anything
    else is refused, naming it, before a step is half written."""
    if isinstance(value, (str, bool, float)) or value is None:
        return value
    if isinstance(value, int):
        return float(value)
    if isinstance(value, (list, dict)):
        try:
            json.dumps(value, allow_nan=True)
            return value
        except (TypeError, ValueError):
            pass
    elif np.ndim(value) == 0 and hasattr(value, "dtype"):
        dtype = np.asarray(value).dtype
        if dtype == np.bool_:
            return bool(value)
        if jax.dtypes.issubdtype(dtype, np.number) and not jax.dtypes.issubdtype(dtype, np.complexfloating):
            return float(value)
    raise ValueError(f"AdapterCheckpointer.save: metrics['{name}'] is {type(value).__name__}"
                     f"{f' of shape {np.shape(value)}' if hasattr(value, 'shape') else ''}: metrics are written as "
                     "JSON, so each must be a number, a bool, a string, or a list or dict of those")


def _agree_across_processes(step: int, checked: Any, refusal: Exception | None, with_opt_state: bool,
                            lora_config: LoraConfig | None, force: bool) -> Any:
    """The metrics to save (process 0's, in a job of several processes: they rank the steps alike
    on every process), after raising ``refusal`` (this process's own check failed) on every process
    where any process refused the save or the processes were called differently: orbax's save is
    collective, so one process going ahead alone would wait for the others forever."""
    metrics = checked[2] if isinstance(checked, tuple) else None
    if jax.process_count() == 1:
        if refusal is not None:
            raise refusal
        return metrics
    from jax.experimental import multihost_utils

    fields = {"step": step, "force": force, "skipped": checked is False, "opt_state": with_opt_state,
              "lora_config": None if lora_config is None else lora_config.to_dict()}
    digests = b"".join(hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).digest()[:8]
                       for v in fields.values())
    said = (f"{type(refusal).__name__}: {refusal}" if refusal is not None else "").encode()[:_SAID]
    shared = json.dumps(metrics).encode()
    if len(shared) > _SHARED:
        refusal = refusal or ValueError(f"AdapterCheckpointer.save: metrics take {len(shared)} bytes as JSON; keep "
                                        f"them to a few numbers (at most {_SHARED} bytes)")
        shared = b"null"
    row = np.frombuffer(digests + bytes([refusal is not None]) + said.ljust(_SAID, b"\0") + shared.ljust(_SHARED, b"\0"),
                        np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(row))
    if refusal is not None:
        raise refusal
    flag = len(digests)
    refused = [k for k in range(len(rows)) if rows[k, flag]]
    if refused:
        text = bytes(rows[refused[0], flag + 1:flag + 1 + _SAID]).rstrip(b"\0").decode(errors="replace")
        raise ValueError(f"AdapterCheckpointer.save: step {step} not written: process {refused[0]} refused it ({text})")
    for j, name in enumerate(fields):
        differ = [k for k in range(len(rows)) if bytes(rows[k, 8 * j:8 * j + 8]) != bytes(rows[0, 8 * j:8 * j + 8])]
        if differ:
            raise ValueError(f"AdapterCheckpointer.save: step {step} not written: process {differ[0]} differs from "
                             f"process 0 in {_FIELDS[name]}; every process must make the same call, as the save is "
                             "collective")
    return json.loads(bytes(rows[0, flag + 1 + _SAID:]).rstrip(b"\0"))


_FIELDS = {"step": "the step", "force": "force", "skipped": "whether the step is newer than the directory's latest",
           "opt_state": "whether opt_state is given", "lora_config": "the checkpointer's lora_config"}
_SAID = 400  # bytes of a refusal's message that the other processes get
_SHARED = 4096  # bytes of process 0's metrics (JSON) that every process saves


def _check_arrays(opt_state: Any) -> None:
    """Refuse an optimizer state with leaves that are not arrays (the transformation itself, or
    ``jax.eval_shape``'s abstract values), naming the first."""
    for kp, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        if not is_saveable_array(leaf) and not isinstance(leaf, (int, float)):
            raise ValueError(f"AdapterCheckpointer.save: opt_state{jax.tree_util.keystr(kp)} is "
                             f"{type(leaf).__name__}, not an array: pass the state, e.g. tx.init(trainable)")
        if is_deleted(leaf):  # orbax would fail halfway, its temporary folder left
            raise ValueError(f"AdapterCheckpointer.save: opt_state{jax.tree_util.keystr(kp)} {DELETED}; save the "
                             "state the step returned")


def _check_state_fits(params: Any, opt_state: Any) -> None:
    """Refuse an optimizer state kept for adapters at paths ``params`` has none at (other targets),
    naming the first: its step could never be restored with them. One whose arrays have another
    shape than every factor at their path (another rank) is warned of: a restore with the state of
    these params refuses it, but a transformation may keep a state of its own shape. Arrays of other
    axes than their factor's (Adafactor's factored moments) are not compared; nor are nodes made by
    hand, without a path."""
    mine: dict[str, list] = {}  # two towers adapted apart share relative paths
    for node in jax.tree.leaves(params, is_leaf=is_param):
        if isinstance(node, LoraWeight):
            mine.setdefault(node.path, []).append(node)
    states = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=lambda x: isinstance(x, LoraWeight))[0]
    for kp, node in states:
        if not isinstance(node, LoraWeight) or not node.path:
            continue
        where = f"AdapterCheckpointer.save: opt_state{jax.tree_util.keystr(kp)}"
        if node.path not in mine:
            raise ValueError(f"{where} is kept for an adapter at '{node.path}', and params have none there (the state "
                             f"of other targets? params adapt {sorted(mine)[:4]}); save the state of these params")
        for name in ("a", "b"):
            kept = getattr(node, name)
            factors = [getattr(own, name) for own in mine[node.path]]
            if is_saveable_array(kept) and all(np.ndim(kept) == np.ndim(f) and np.shape(kept) != np.shape(f)
                                               for f in factors):
                warnings.warn(f"{where}.{name} has shape {tuple(np.shape(kept))}, the adapter's {name} at "
                              f"'{node.path}' {tuple(np.shape(factors[0]))}: the state of another rank? A restore "
                              "with the state of these params (opt_state_like) will refuse this step", stacklevel=4)
                return


def _what_it_makes(config: LoraConfig) -> dict[str, Any]:
    """The options of ``config`` that decide which adapters ``lora_init`` makes, their ranks and
    scales, and what is trained whole, in a form where the same ones compare equal (patterns in any
    order; ``targets=None`` is ``"all-linear"``)."""
    listed = lambda v: sorted(v) if isinstance(v, (list, tuple)) else v
    d = config.to_dict()
    return {"rank": d["rank"], "alpha": d["alpha"], "use_rslora": d["use_rslora"],
            "targets": ALL_LINEAR if d["targets"] is None else listed(d["targets"]),
            **{k: listed(d[k]) for k in ("exclude", "trainable")},
            **{k: dict(sorted(d[k].items())) for k in ("rank_pattern", "alpha_pattern", "layouts")}}


def _describe_ranking(ranking: list | None) -> str:
    return "by recency" if ranking is None else f"best_metric={ranking[0]!r}, best_mode={ranking[1]!r}"


def _damaged(err: Exception) -> bool:
    """Whether orbax's error on a restore says the step's files are missing or broken (not that the
    request does not fit them, nor a failing disk or permission): an item missing from the step,
    a file gone, broken JSON, tensorstore unable to read what it finds."""
    return (isinstance(err, (FileNotFoundError, json.JSONDecodeError))
            or (isinstance(err, KeyError) and "was not found in the checkpoint" in str(err))
            or (isinstance(err, ValueError) and any(code in str(err) for code in ("OUT_OF_RANGE", "DATA_LOSS",
                                                                                  "NOT_FOUND"))))


_UNCOMMITTED = object()  # a placement: restored on the host, then put where JAX puts new arrays


def _default_placement(base: Any) -> Any:
    """Where to restore what carries no placement of its own (a numpy leaf, ``jax.eval_shape``'s
    result): replicated on the mesh of a base leaf that has one, else on that leaf's device, else
    ``_UNCOMMITTED``, as ``lora_init`` and ``tx.init`` make arrays (a committed one would be another
    input to an already compiled step, compiling it again). Never ``None``: orbax would then put
    it where it was saved, on a mesh this process may not have. A base on an abstract mesh only
    (``jax.eval_shape`` under ``jax.set_mesh``) takes the mesh set where it is that mesh."""
    abstract = None
    for leaf in jax.tree.leaves(base):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, jax.sharding.Mesh):
            return NamedSharding(sharding.mesh, PartitionSpec())
        if isinstance(sharding, SingleDeviceSharding):
            return sharding if _committed(leaf) else _UNCOMMITTED
        if isinstance(sharding, NamedSharding) and abstract is None:
            abstract = sharding.mesh
    if abstract is not None:
        mesh = _compat.current_mesh()
        if not (isinstance(mesh, jax.sharding.Mesh) and mesh.abstract_mesh == abstract):
            raise ValueError(f"AdapterCheckpointer.restore: the base's shardings are on an abstract mesh {abstract} "
                             "and no mesh of that shape is set to restore onto: restore inside "
                             "`with jax.set_mesh(mesh):` (JAX 0.7+), or give the base's arrays")
        return NamedSharding(mesh, PartitionSpec())
    return _UNCOMMITTED


def _devices(x: Any) -> frozenset[Any]:
    """The devices ``x`` (an array or ``jax.ShapeDtypeStruct``) was placed on on purpose: a sharding
    over a mesh of devices, or a committed device; none for what follows its computation."""
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and not isinstance(sharding.mesh, jax.sharding.Mesh):
        return frozenset()  # over an abstract mesh (jax.eval_shape's): placed where it is restored
    if isinstance(sharding, jax.sharding.Sharding) and _committed(x):
        return frozenset(sharding.device_set)
    return frozenset()


def _check_state_devices(directory: str, like: Any, base: dict[str, Any], targets: dict[str, Any] | None) -> None:
    """Refuse an ``opt_state_like`` placed on other devices than the base (a template kept from a
    run on another mesh): the state would be restored there, and the first step refuse the two. A
    per-adapter leaf (a moment) is checked against its adapter's base leaf, any other against the
    devices of the whole base (a base may be spread over several meshes: pipeline stages)."""
    devices = {p: _devices(x) for p, x in base.items()}
    everywhere = frozenset().union(*devices.values())
    for keys, leaf in jax.tree_util.tree_flatten_with_path(like)[0]:
        there = _devices(leaf)
        adapter = _adapter_of(keys, leaf, targets)
        own = devices.get(adapter.removesuffix("/a").removesuffix("/b")) if adapter else None
        if own:  # a moment: on its adapter's devices
            here, whose, misplaced = own, "adapter", there != own
        else:  # a count, a leaf of no adapter: within the base's
            here, whose, misplaced = everywhere, "base", not there <= everywhere
        if there and here and misplaced:
            raise ValueError(f"{directory}: opt_state_like{jax.tree_util.keystr(keys)} is placed on devices "
                             f"{sorted(d.id for d in there)}, its {whose} on {sorted(d.id for d in here)}: restored "
                             "there, the state and the params could not go into one step; make opt_state_like on "
                             "this base's placement (tx.init of the restored trainable half, or "
                             "jax.eval_shape(tx.init, trainable), whose moments are restored as their adapters are)")


def _committed(x: Any) -> bool:
    """Whether ``x`` (an array, or a lazy kind's arrays: a quantized kernel) was put on its device on
    purpose (``device_put`` to a device, a sharding): JAX keeps it there, where an uncommitted array
    follows its computation. An abstract value with a placement counts as committed.

    Example:
        >>> _committed(jax.numpy.ones(2)), _committed(jax.device_put(jax.numpy.ones(2), jax.devices()[0]))
        (False, True)
    """
    arrays = [leaf for leaf in jax.tree.leaves(x) if isinstance(leaf, jax.Array)]
    return any(getattr(leaf, "committed", True) for leaf in arrays) if arrays else True


def _restore_target(shape: tuple, dtype: Any, sharding: Any) -> Any:
    """What orbax restores an array into: abstract with its placement, or, ``_UNCOMMITTED``, a
    numpy view of no memory (orbax then reads it to the host, and ``_on_device`` puts it)."""
    if sharding is _UNCOMMITTED:
        return np.broadcast_to(np.zeros((), dtype), shape)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _on_device(arrays: dict[str, Any]) -> dict[str, Any]:
    """Arrays restored on the host (``_UNCOMMITTED``) put on the default device, uncommitted."""
    return {k: jax.numpy.asarray(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()}


def _placed(x: Any, default: Any) -> Any:
    """Where to restore an array like ``x``: its sharding (one over an abstract mesh, as
    ``jax.eval_shape`` gives, on ``default``'s mesh where that is the same mesh), else ``default``."""
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and not isinstance(sharding.mesh, jax.sharding.Mesh):
        mesh = getattr(default, "mesh", None)
        same = mesh is not None and getattr(mesh, "abstract_mesh", None) == sharding.mesh
        return NamedSharding(mesh, sharding.spec) if same else default
    if isinstance(sharding, SingleDeviceSharding) and not _committed(x):
        return _UNCOMMITTED
    return sharding if isinstance(sharding, jax.sharding.Sharding) else default


def _abstract_state(like: Any, like_flat: dict[str, Any], targets: dict[str, Any] | None, default: Any) -> dict:
    """What to restore an optimizer state like ``like`` (flattened: ``like_flat``) into (``_restore_target``):
    each leaf's own placement (``_placed``), or, for one with none (``jax.eval_shape`` on a mesh
    with Auto axes) that is per adapter (its path ends in the adapter's, as Adam's
    ``mu['dense']['kernel'].a``, the longest such; same shape), the adapter's, not replicated."""
    out = {}
    for (keys, _), (i, x) in zip(jax.tree_util.tree_flatten_with_path(like)[0], like_flat.items()):
        place = _placed(x, default)
        adapter = _adapter_of(keys, x, targets) if getattr(x, "sharding", None) is None else None
        if adapter is not None:
            place = getattr(targets[adapter], "sharding", _UNCOMMITTED) or place
        out[i] = _restore_target(np.shape(x), _dtype_of(x), place)
    return out


def _adapter_of(keys: tuple, x: Any, targets: dict[str, Any] | None) -> str | None:
    """The target (``'dense/kernel/a'``, a trained leaf's path) that a state leaf at ``keys`` of
    ``x``'s shape is per-adapter for (its path ends in the target's, as Adam's
    ``mu['dense']['kernel'].a``, the longest such; same shape), or ``None``."""
    if not targets:
        return None
    path = "/" + path_str(keys)
    # a box's value key (flax's LogicallyPartitioned) sits inside a moment's path, not in the
    # adapter's; a field named value (Equinox's attention) is in both
    unboxed = "/" + path_str([k for k in keys if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value")])
    ends = [name for name, t in targets.items() if (path.endswith("/" + name) or unboxed.endswith("/" + name))
            and tuple(t.shape) == tuple(np.shape(x))]
    return max(ends, key=len) if ends else None


def _dtype_of(x: Any) -> np.dtype:
    """An array's dtype, or a Python number's as numpy's (``np.asarray(0.5).dtype``)."""
    return np.dtype(x.dtype) if hasattr(x, "dtype") else np.asarray(x).dtype


def _check_opt_state(directory: str, step: int, meta: dict, like: Any, like_flat: dict[str, Any]) -> None:
    """Refuse, naming the leaf, an ``opt_state_like`` (flattened: ``like_flat``) that does not fit the saved state."""
    if "opt_state" not in meta:
        if not os.path.isdir(os.path.join(directory, str(step), "opt_state")):
            raise ValueError(f"{directory}: step {step} was saved without an optimizer state; "
                             "restore it without opt_state_like")
        return  # written before the state's shapes were kept: orbax checks them
    saved = meta["opt_state"]
    paths = _key_paths(like)
    if len(paths) != len(saved):
        adapters = sorted(p for p, spec in meta["specs"].items() if spec["kind"] != "trainable")
        raise ValueError(f"{directory}: opt_state_like has {len(paths)} leaves, step {step}'s optimizer state "
                         f"{len(saved)}: the state of another optimizer, or of adapters on other params (other "
                         f"targets? step {step} has {len(adapters)} adapters: {adapters[:4]}"
                         f"{', ...' if len(adapters) > 4 else ''})")
    unboxed = lambda path: re.sub(r"\.value(?=[.\[]|$)", "", path)  # a Flax box's value, on one side only
    for path, saved_path in zip(paths, meta.get("opt_state_paths", paths)):  # none in older checkpoints
        if unboxed(path) != unboxed(saved_path):
            raise ValueError(f"{directory}: opt_state_like{path} is where step {step} saved opt_state{saved_path}: "
                             "the state of another optimizer (jlora.optimizer's b_lr_ratio of 1 wraps tx in "
                             "nothing, another ratio in a chain), or of adapters on other params (other targets?)")
    for path, leaf, shape in zip(paths, like_flat.values(), saved):
        if tuple(np.shape(leaf)) != tuple(shape):
            raise ValueError(f"{directory}: opt_state_like{path} has shape {tuple(np.shape(leaf))}, "
                             f"step {step} saved {tuple(shape)} (another rank or optimizer?)")
    for path, leaf, dtype in zip(paths, like_flat.values(), meta.get("opt_state_dtypes", ())):  # older steps: none kept
        like = _dtype_of(leaf)
        if jnp.issubdtype(np.dtype(dtype), jnp.inexact) and not jnp.issubdtype(like, jnp.inexact):
            raise ValueError(f"{directory}: opt_state_like{path} is {like}, step {step} saved {dtype}: restored into "
                             "it, the values would be cut to integers; make opt_state_like with the tx that saved "
                             "the state (tx.init(trainable) or its jax.eval_shape)")


def _key_paths(tree: Any) -> list[str]:
    """Each leaf's key path (``.inner_states['adapter']...mu['dense']['kernel'].a``)."""
    return [jax.tree_util.keystr(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _adapter_targets(specs: dict[str, Any], base: dict[str, Any], default: Any) -> dict[str, Any]:
    """What to restore the adapters into (``_restore_target``): factors sharded as derived from the base
    kernel's sharding (``jlora.sharding.factor_specs``), trainable leaves like their base leaf."""
    targets = {}
    for p, spec in specs.items():
        like = base[p]
        sharding = _placed(like, default)
        if spec["kind"] == "trainable":
            targets[p] = _restore_target(like.shape, spec.get("dtype", like.dtype), sharding)
            continue
        layout, rank = Layout.parse(spec["layout"]), spec["rank"]
        if isinstance(sharding, NamedSharding):
            a_sharding, b_sharding = factor_shardings(sharding, layout)
        elif isinstance(sharding, SingleDeviceSharding) or sharding is _UNCOMMITTED:
            a_sharding = b_sharding = sharding
        else:  # another multi-device kind: orbax places the factors as they were saved
            a_sharding = b_sharding = None
        targets[f"{p}/a"] = _restore_target(layout.a_shape(like.shape, rank), spec["dtype"], a_sharding)
        targets[f"{p}/b"] = _restore_target(layout.b_shape(like.shape, rank), spec.get("b_dtype", spec["dtype"]), b_sharding)
    return targets
