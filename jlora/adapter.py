"""jlora's own adapter files: ``adapter_config.json`` + ``adapter.safetensors``.

Only the trainable half is stored (``a``, ``b`` and fully trained leaves), keyed by param path; the
JSON holds the LoRA config, each target's layout, rank, scale and base shape, and free-form
metadata (the base model). Loading checks every key and shape against the base params, and that
each adapted kernel and fully trained leaf is a float, before building anything; a fully trained
leaf keeps the dtype it was trained in (f32 over a bf16 base). A save writes its two files beside
the old ones and renames each into place (the weights, then the JSON): other files in the
directory are left alone, and an interrupted save leaves whole files, never a truncated one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora.config import LoraConfig
from jlora.fingerprint import fingerprint, warn_other_base
from jlora.init import pattern_value, select
from jlora.layout import Layout
from jlora.lazy import _user_stacklevel
from jlora.paths import DELETED, is_deleted, leaves_with_paths, replace_leaves
from jlora.sharding import follow_bases
from jlora.tree import check_whole
from jlora.weight import Lazy, LoraWeight, Trainable, is_node, is_param

CONFIG_FILE, WEIGHTS_FILE, FORMAT = "adapter_config.json", "adapter.safetensors", "jlora-adapter"
VERSION = 1  # of the adapter format this jlora writes and reads
_STALE_AFTER_S = 3600  # a temporary directory of a write older than this was left by a killed writer


def save_adapter(path: str | os.PathLike, params: Any, *, lora_config: Any = None, metadata: dict | None = None) -> Path:
    """Write the adapters of ``params`` (a LoRA tree or its trainable half) to directory ``path``.
    ``lora_config``: the ``jlora.LoraConfig`` the adapters were made with, kept in
    ``adapter_config.json``; ``metadata``: a dict of JSON values kept there too (the base model's
    name, a metric), which ``describe`` and ``jlora info`` show. In a job of several processes,
    arrays on the devices of all of them (data parallelism) are written by process 0 alone (the
    others return at once: read the files after a barrier); see ``writes_here``.

    Example:
        >>> import tempfile, jax.numpy as jnp, jlora
        >>> lw = jlora.LoraWeight(jnp.ones((4, 4)), jnp.ones((4, 2)), jnp.zeros((2, 4)), scale=1.0, path="k")
        >>> _ = jlora.adapter.save_adapter(tempfile.mkdtemp() + "/adapter", {"k": lw})
    """
    from safetensors.numpy import save_file

    arrays, adapters, trained = saved_arrays("save_adapter", params)
    here = writes_here("save_adapter", params)
    check_other_format(path, "PEFT", ["adapter_model.safetensors", "adapter_model.bin"])
    if lora_config is not None and not isinstance(lora_config, LoraConfig):
        raise ValueError(f"save_adapter: lora_config must be the jlora.LoraConfig the adapter was made with, "
                         f"got {type(lora_config).__name__}")
    if lora_config is not None:
        check_config_makes("save_adapter", lora_config, params)
    metadata = plain_metadata(metadata)
    tensors = {key: host_array(x) for key, x in arrays.items()}
    check_finite("save_adapter", tensors, "no adapter is written")
    targets = {p: {"layout": str(x.layout), "rank": x.rank, "scale": x.scale, "dropout": x.dropout,
                   "shape": [int(d) for d in x.kernel_shape]} for p, x in adapters.items()}
    for p, x in adapters.items():  # what a load checks the base against (not from a trainable half)
        base = fingerprint(x.w)
        if base is not None:
            targets[p]["base"] = base
    trainable = {p: list(np.shape(x)) for p, x in trained.items()}
    save_id = uuid.uuid4().hex  # in both files: a load refuses a pair from two saves
    config = {
        "format": FORMAT, "version": VERSION, "save_id": save_id, "targets": targets, "trainable": trainable,
        "lora_config": lora_config.to_dict() if lora_config is not None else None,
        "metadata": metadata,
    }

    def write(tmp: Path) -> None:  # the weights carry the config too: they go in place first, whole
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"save_id": save_id, "config": json.dumps(config)})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))

    return write_files(path, write) if here else Path(path)


def plain_metadata(metadata: Any) -> dict:
    """``metadata`` as plain JSON values (numpy and JAX scalars as numbers), or a ValueError: a
    string or a list would be saved, then break ``describe`` and ``jlora info``.

    Example:
        >>> import numpy as np, jlora
        >>> jlora.adapter.plain_metadata({"base_model": "all-MiniLM-L6-v2", "loss": np.float32(0.5)})
        {'base_model': 'all-MiniLM-L6-v2', 'loss': 0.5}
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
        raise ValueError(f"save_adapter: metadata must be a dict with str keys, got {type(metadata).__name__}")

    def scalar(x: Any) -> Any:
        if np.ndim(x) == 0 and hasattr(x, "item"):
            return x.item()
        raise TypeError(f"{type(x).__name__} is not a JSON value")

    try:
        return json.loads(json.dumps(metadata, default=scalar))
    except (TypeError, ValueError) as err:
        raise ValueError("save_adapter: metadata must hold JSON values (str, numbers, bools, None, "
                         f"lists, dicts): {err}") from None


def check_other_format(path: str | os.PathLike, other: str, other_weights: Sequence[str]) -> None:
    """Refuse to write an adapter into a directory that holds one in the other format: the two
    share ``adapter_config.json``, so the first would be lost.

    Example:
        >>> import tempfile, jlora
        >>> weights = ["adapter_model.safetensors", "adapter_model.bin"]
        >>> jlora.adapter.check_other_format(tempfile.mkdtemp(), "PEFT", weights)
    """
    for name in other_weights:
        if (Path(path) / name).exists():
            raise ValueError(f"{path}: holds a {other} adapter ({name}), whose {CONFIG_FILE} this save "
                             "would replace; save into another directory")


def write_files(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Put the files that ``write(tmp_dir)`` makes into directory ``path`` (created if needed), each
    by an atomic rename over its namesake, JSON files last; other files in ``path`` stay as they
    are, and an interrupted write leaves each file whole (old or new), never truncated.

    Example:
        >>> import tempfile, jlora
        >>> out = jlora.adapter.write_files(tempfile.mkdtemp() + "/d", lambda tmp: (tmp / "f.txt").write_text("hi"))
        >>> (out / "f.txt").read_text()
        'hi'
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: exists and is not a directory; an adapter is a directory of files")
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob(".jlora-write-*"):  # left by a writer that was killed (not one writing now)
        with contextlib.suppress(OSError):
            if time.time() - stale.stat().st_mtime > _STALE_AFTER_S:
                shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".jlora-write-", dir=path))
    try:
        write(tmp)
        for file in sorted(tmp.iterdir(), key=lambda f: (f.suffix == ".json", f.name)):
            as_opened(file)
            os.replace(file, path / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def as_opened(file: Path) -> None:
    """Give ``file`` the mode ``open()`` would have (safetensors writes owner-only temporary files);
    a file system without modes keeps its own.

    Example:
        >>> import os, tempfile, jlora
        >>> from pathlib import Path
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "opened").write_text("")                # the mode open() gives
        >>> os.close(os.open(folder / "written", os.O_CREAT, 0o600))  # owner-only
        >>> jlora.adapter.as_opened(folder / "written")
        >>> (folder / "written").stat().st_mode == (folder / "opened").stat().st_mode
        True
    """
    with contextlib.suppress(PermissionError):
        os.chmod(file, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask: read from Linux's /proc, else by setting it (for an instant, which
    another thread creating a file then would see)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_config(path: str | os.PathLike) -> dict:
    """The adapter's JSON, with a clear error for a missing or foreign directory.

    Example:
        >>> import tempfile, jax.numpy as jnp, jlora
        >>> lw = jlora.LoraWeight(jnp.ones((4, 4)), jnp.ones((4, 2)), jnp.zeros((2, 4)), scale=1.0, path="k")
        >>> path = jlora.adapter.save_adapter(tempfile.mkdtemp() + "/adapter", {"k": lw})
        >>> jlora.adapter.read_config(path)["targets"]["k"]["rank"]
        2
    """
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    own = _weights_config(path)  # the config the weights file carries: a save stopped before its JSON was in place
    if not cfg_file.is_file() and own is None:
        step = lambda p: (p / "adapters").is_dir() and (p / "meta").is_dir()  # an AdapterCheckpointer step
        steps = path.is_dir() and any(step(p) for p in path.iterdir() if p.name.isdigit())
        where = path if steps else path.parent if step(path) else None
        run = path.is_dir() and (path / "adapter" / CONFIG_FILE).is_file()  # jlora finetune's --out
        raise ValueError(f"{path}: not a jlora adapter directory (no {CONFIG_FILE})" + (
            f"; it holds AdapterCheckpointer steps: restore one with jlora.checkpoint.AdapterCheckpointer('{where}')"
            ".restore(base_params)" if where is not None else
            f"; it is a jlora finetune run: its adapter is {path / 'adapter'}" if run else ""))
    try:
        config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else own
    except json.JSONDecodeError as err:
        if own is None:
            raise ValueError(f"{cfg_file}: corrupted JSON ({err})") from None
        config = own
    if own is not None and isinstance(config, dict) and config.get("save_id") != own.get("save_id"):
        config = own  # the JSON of an earlier save: the weights, renamed into place first, are the newer one's
    if isinstance(config, dict) and "peft_type" in config:
        raise ValueError(f"{path}: a PEFT adapter, not a jlora one (jlora.peft.load_adapter reads it)")
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        got = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{cfg_file}: not a jlora adapter (format {got!r})")
    version = config.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version > VERSION:
        raise ValueError(f"{cfg_file}: format version {version!r}; this jlora reads versions up to {VERSION} "
                         "(a newer jlora wrote it: upgrade jlora)")
    _check_specs(cfg_file, config)
    return config


def _weights_config(path: Path) -> dict | None:
    """The config that the adapter's weights file carries in its header; ``None`` for weights saved
    before they carried it, or where there is no readable weights file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path / WEIGHTS_FILE), "np") as f:
            text = (f.metadata() or {}).get("config")
        config = None if text is None else json.loads(text)
    except (SafetensorError, OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _check_specs(cfg_file: Path, config: dict) -> None:
    """The adapter JSON's per-param entries have the types jlora wrote (a hand edit may break them)."""
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    is_shape = lambda v: isinstance(v, list) and all(is_int(d) and d >= 0 for d in v)
    targets, trainable = config.get("targets"), config.get("trainable")
    if not isinstance(targets, dict) or not isinstance(trainable, dict):
        raise ValueError(f"{cfg_file}: 'targets' and 'trainable' must be JSON objects keyed by param path; "
                         f"got {type(targets).__name__} and {type(trainable).__name__}")
    for p, spec in targets.items():
        if not (isinstance(spec, dict) and isinstance(spec.get("layout"), str) and is_int(spec.get("rank"))
                and spec["rank"] >= 1 and is_number(spec.get("scale")) and is_shape(spec.get("shape"))
                and is_number(spec.get("dropout", 0.0)) and 0 <= spec.get("dropout", 0.0) < 1):
            raise ValueError(f"{cfg_file}: target '{p}' is {spec!r}; want layout (a string), rank (an int >= 1), "
                             "scale (a finite number), shape (a list of ints) and an optional dropout (in [0, 1))")
    for p, shape in trainable.items():
        if not is_shape(shape):
            raise ValueError(f"{cfg_file}: trainable '{p}' is {shape!r}; want its shape, a list of ints")
    if not isinstance(config.get("metadata") or {}, dict):
        raise ValueError(f"{cfg_file}: 'metadata' must be a JSON object, got {type(config['metadata']).__name__}")
    both = sorted(set(targets) & set(trainable))
    if both:
        raise ValueError(f"{cfg_file}: {both[:3]} are both LoRA targets and fully trained; a param is one or the other")


def load_tensors(path: str | os.PathLike, config: dict) -> dict[str, np.ndarray]:
    """The adapter's arrays by key (``<param path>/a``, ``<param path>/b``, trained leaves' paths);
    ``config`` is its JSON (``read_config``), whose save id the weights must carry.

    Example:
        >>> import tempfile, jax.numpy as jnp, jlora
        >>> lw = jlora.LoraWeight(jnp.ones((4, 4)), jnp.ones((4, 2)), jnp.zeros((2, 4)), scale=1.0, path="k")
        >>> path = jlora.adapter.save_adapter(tempfile.mkdtemp() + "/adapter", {"k": lw})
        >>> sorted(jlora.adapter.load_tensors(path, jlora.adapter.read_config(path)))
        ['k/a', 'k/b']
    """
    return _read_weights(path, config, lambda f: {key: f.get_tensor(key) for key in f.keys()})


def tensor_shapes(path: str | os.PathLike, config: dict) -> dict[str, tuple[int, ...]]:
    """The shape of each of the adapter's arrays by key, as ``load_tensors`` names them, read from
    the weights file's header alone (no array is read).

    Example:
        >>> import tempfile, jax.numpy as jnp, jlora
        >>> lw = jlora.LoraWeight(jnp.ones((4, 4)), jnp.ones((4, 2)), jnp.zeros((2, 4)), scale=1.0, path="k")
        >>> path = jlora.adapter.save_adapter(tempfile.mkdtemp() + "/adapter", {"k": lw})
        >>> jlora.adapter.tensor_shapes(path, jlora.adapter.read_config(path))
        {'k/a': (4, 2), 'k/b': (2, 4)}
    """
    return _read_weights(path, config, lambda f: {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})


def one_save(path: str | os.PathLike, read: Callable[[Any, dict], Any]) -> tuple[dict, Any]:
    """The adapter's config and ``read(path, config)`` (``load_tensors``, ``tensor_shapes``), of one
    save: a save renaming its files into place while they are read (a server reloading the adapter
    that a job saves every N steps) has the two read again, up to three times.

    Example:
        >>> import tempfile, jax.numpy as jnp, jlora
        >>> lw = jlora.LoraWeight(jnp.ones((4, 4)), jnp.ones((4, 2)), jnp.zeros((2, 4)), scale=1.0, path="k")
        >>> path = jlora.adapter.save_adapter(tempfile.mkdtemp() + "/adapter", {"k": lw})
        >>> config, tensors = jlora.adapter.one_save(path, jlora.adapter.load_tensors)
        >>> sorted(tensors), config["targets"]["k"]["rank"]
        (['k/a', 'k/b'], 2)
    """
    for _ in range(2):
        config = read_config(path)
        try:
            return config, read(path, config)
        except ValueError:
            now = _weights_config(Path(path))  # the weights of a save newer than the config read
            if now is None or now.get("save_id") == config.get("save_id"):
                raise
    config = read_config(path)
    return config, read(path, config)


def _read_weights(path: str | os.PathLike, config: dict, read: Callable[[Any], Any]) -> Any:
    """``read`` applied to the opened weights file of the adapter at ``path``, once its save id is
    checked against ``config``'s; a clear error for a file that cannot be read."""
    from safetensors import SafetensorError, safe_open

    file = Path(path) / WEIGHTS_FILE
    try:
        with safe_open(str(file), "np") as f:
            save_id = (f.metadata() or {}).get("save_id")
            expected = config.get("save_id")
            if expected is not None and save_id != expected:
                raise ValueError(f"{path}: {WEIGHTS_FILE} and {CONFIG_FILE} come from two different saves (one "
                                 "was interrupted between writing them); save the adapter again")
            return read(f)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{file}: cannot read adapter weights ({err})") from None


def check_finite(where: str, tensors: dict[str, np.ndarray], outcome: str) -> None:
    """Refuse float arrays holding NaN or inf (a diverged run's, or a damaged file's), naming them.

    Example:
        >>> import numpy as np
        >>> from jlora.adapter import check_finite
        >>> check_finite("save_adapter", {"k/a": np.array([1.0, np.nan])}, "nothing is written")
        Traceback (most recent call last):
        ...
        ValueError: save_adapter: NaN or inf in ['k/a'] (a diverged run, or a damaged file); nothing is written
    """
    bad = [key for key, x in tensors.items() if jnp.issubdtype(x.dtype, jnp.inexact) and not np.isfinite(x).all()]
    if bad:
        raise ValueError(f"{where}: NaN or inf in {bad[:3]}" + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
                         + f" (a diverged run, or a damaged file); {outcome}")


def saved_arrays(op: str, params: Any) -> tuple[dict[str, Any], dict[str, LoraWeight], dict[str, Any]]:
    """What a save of ``params`` (a LoRA tree or its trainable half) writes: ``(arrays, adapters,
    trained)``, the arrays keyed ``<path>/a``, ``<path>/b`` and ``<path>``, the ``LoraWeight`` nodes
    and the fully trained values by path. A ValueError naming ``op`` if there is nothing to save.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> lw = jlora.LoraWeight(jnp.ones((4, 4)), jnp.ones((4, 2)), jnp.zeros((2, 4)), scale=1.0)
        >>> params = {"k": lw, "bias": jlora.Trainable(jnp.zeros(4))}
        >>> arrays, adapters, trained = jlora.adapter.saved_arrays("save", params)
        >>> sorted(arrays), list(adapters), list(trained)
        (['bias', 'k/a', 'k/b'], ['k'], ['bias'])
    """
    check_saveable(op, params)
    arrays, adapters, trained = {}, {}, {}
    for p, x in leaves_with_paths(params, is_leaf=is_node):
        if p in adapters or p in trained:
            raise ValueError(f"{op}: two params have the path '{p}' (a key holding '/'); the saved adapter would "
                             "give both the same arrays")
        if isinstance(x, LoraWeight):
            arrays[f"{p}/a"], arrays[f"{p}/b"], adapters[p] = x.a, x.b, x
        elif isinstance(x, Trainable):
            arrays[p] = trained[p] = x.value
    for key, x in arrays.items():
        if is_deleted(x):
            raise ValueError(f"{op}: '{key}' {DELETED}; save the params the step returned")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{op}: '{key}' is {np.dtype(x.dtype)}; LoRA factors and trained leaves are floating point")
    if not arrays:
        raise ValueError(f"{op}: params hold no LoraWeight or Trainable leaf{model_hint(params)}")
    return arrays, adapters, trained


def _unsaveable_axes(op: str, path: str, lw: LoraWeight) -> str:
    """Why an adapter whose arrays have other axes than its layout names cannot be saved, and what
    to save instead: one member of an ensemble, one adapter of several over one base."""
    shapes = f"a {tuple(lw.a.shape)}, b {tuple(lw.b.shape)}"
    if lw.w is not None and hasattr(lw.w, "shape") and len(lw.w.shape) < lw.layout.ndim:
        return (f"{op}: '{path}' has w {tuple(lw.w.shape)}, fewer axes than its layout '{lw.layout}' names ({shapes}): "
                "a slice of the whole tree cut the base too; slice the trainable half only")
    if lw.over_stacked_bases():
        return (f"{op}: '{path}' is one adapter ({shapes}) over a stack of bases (w {tuple(lw.w.shape)}): save the "
                "trainable half, jlora.split(params)[0], whose adapter it is")
    if lw.w is not None and hasattr(lw.w, "shape") and len(lw.a.shape) > len(lw.layout.a_shape(lw.w.shape, 1)) \
            and len(lw.w.shape) == lw.layout.ndim:
        return (f"{op}: '{path}' holds adapters stacked over one base ({shapes} over w {tuple(lw.w.shape)}): save "
                "one at a time from the trainable half, jax.tree.map(lambda v: v[i], jlora.split(params)[0])")
    return (f"{op}: '{path}' has {shapes}, leading axes more than its adapter's layout '{lw.layout}' names (an "
            f"ensemble from jax.vmap(lora_init), or replicas; '{lw.fitted().layout}' with them): save one member at "
            "a time, jax.tree.map(lambda v: v[i], params)")


def check_saveable(op: str, params: Any) -> None:
    """Refuse the frozen half of ``jlora.split`` where adapters are to be saved (a LoRA tree or its
    trainable half will do).

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> jlora.adapter.check_saveable("save_adapter", {"bias": jlora.Trainable(jnp.zeros(2))})
    """
    for p, x in leaves_with_paths(params, is_leaf=is_node):
        check_whole(x, p, op, need_w=False)
        if isinstance(x, LoraWeight) and (type(x).materialize is not LoraWeight.materialize
                                          or len(x.tree_flatten_with_keys()[0]) != 3):  # w, a, b
            raise ValueError(f"{op}: '{p}' is a {type(x).__name__}, a LoraWeight that stands for another value "
                             "(its own materialize) or holds more arrays than w, a and b: the saved adapter would "
                             "hold its a and b alone and load as plain LoRA; save it with a saver of its own")
        if isinstance(x, LoraWeight) and hasattr(x.a, "shape") and tuple(x.a.shape) != x.layout.a_shape(
                x.kernel_shape, x.rank):
            raise ValueError(_unsaveable_axes(op, p, x))
        parts = _saved_parts(x)
        abstract = [part for part in parts if not is_saveable_array(part)]
        if abstract:
            raise ValueError(f"{op}: '{p}' holds {type(abstract[0]).__name__}, not an array: save concrete "
                             "arrays (jax.eval_shape's results have no values)")


def _saved_parts(x: Any) -> tuple:
    """The arrays a save writes of node ``x``: a ``LoraWeight``'s factors, a ``Trainable``'s value."""
    return (x.a, x.b) if isinstance(x, LoraWeight) else (x.value,) if isinstance(x, Trainable) else ()


def writes_here(op: str, params: Any, parts: Callable[[Any], tuple] | None = None) -> bool:
    """Whether this process writes the save of ``params``: arrays on the devices of several
    processes that each process holds whole (replicated over them, as in data parallelism, or split
    only among each process's own devices, as in tensor parallelism inside a host) are the same on
    each, and process 0 writes them; a process's own arrays it writes itself. Factors or trained
    values split across processes (FSDP over hosts) are refused: a file needs each array whole on
    its writer. ``host_array`` reads an array so held. ``parts`` gives the arrays a save writes of
    a leaf or node (default: the factors of a ``LoraWeight``, a ``Trainable``'s value).

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> jlora.adapter.writes_here("save_adapter", {"bias": jlora.Trainable(jnp.zeros(2))})
        True
    """
    spans = False
    for p, x in leaves_with_paths(params, is_leaf=is_node):
        for part in (parts or _saved_parts)(x):
            if isinstance(part, jax.Array) and not part.is_fully_addressable:
                if not _held_whole(part):
                    raise ValueError(
                        f"{op}: '{p}' is split across the devices of several processes (this one holds "
                        f"{'part' if part.addressable_shards else 'none'} of it); replicate it over the mesh on "
                        "every process first, then save that on every process (process 0 writes): "
                        + ("trainable = jlora.sharding.place(jlora.split(params)[0], mesh, [])" if parts is None
                           else "params = jlora.sharding.place(params, mesh, [])"))
                spans = True
    return not spans or jax.process_index() == 0


def _held_whole(x: jax.Array) -> bool:
    """Whether this process's own shards of ``x`` hold every element of it."""
    if x.is_fully_replicated:
        return True
    index = lambda slices: tuple(s.indices(n) for s, n in zip(slices, x.shape))
    every = {index(i) for i in x.sharding.devices_indices_map(x.shape).values()}
    return every <= {index(shard.index) for shard in x.addressable_shards}


def host_array(x: Any, path: str = "an array") -> np.ndarray:
    """``x`` as a numpy array, read from this process's own shards where ``x`` spans the devices
    of several processes but each holds it whole (tensor parallel inside each host; see
    ``writes_here``), which ``np.asarray`` refuses; a ValueError naming ``path`` where this process
    holds part of it only.

    Example:
        >>> import jax.numpy as jnp
        >>> from jlora.adapter import host_array
        >>> host_array(jnp.arange(3))
        array([0, 1, 2], dtype=int32)
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    if not _held_whole(x):
        raise ValueError(f"{path} {x.shape} is split across the devices of several processes (this one holds "
                         f"{'part' if x.addressable_shards else 'none'} of it): replicate it over the mesh first, on "
                         "every process: jlora.sharding.place(x, mesh, [])")
    out = np.empty(x.shape, x.dtype)
    for shard in x.addressable_shards:
        out[shard.index] = np.asarray(shard.data)
    return out


def is_saveable_array(x: Any) -> bool:
    """Whether ``x`` holds values to write (a JAX or numpy array, not ``jax.ShapeDtypeStruct``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jlora.adapter import is_saveable_array
        >>> is_saveable_array(jnp.ones(2)), is_saveable_array(jax.ShapeDtypeStruct((2,), jnp.float32))
        (True, False)
    """
    return hasattr(x, "__array__") and not isinstance(x, jax.ShapeDtypeStruct)


def replicated_hint(here: Sequence[int], saved: Sequence[int]) -> str:
    """What to say where a base leaf's shape is the saved one with a leading axis of one per local
    device: a tree replicated for ``jax.pmap`` (``jax.device_put_replicated``), else nothing.

    Example:
        >>> import jax
        >>> from jlora.adapter import replicated_hint
        >>> replicated_hint((jax.local_device_count(), 4, 2), (4, 2)).startswith(" (a leading axis of")
        True
        >>> replicated_hint((4, 2), (4, 3))
        ''
    """
    if len(here) == len(saved) + 1 and here[0] == jax.local_device_count() and list(here[1:]) == list(saved):
        return (f" (a leading axis of {here[0]}, one per device: a tree replicated for jax.pmap? load onto one "
                "replica, jax.tree.map(lambda x: x[0], base_params), and replicate the result)")
    return ""


def check_base(source: str | os.PathLike, base_params: Any, targets: Iterable[str] = (),
               trainable: Iterable[str] = ()) -> dict[str, Any]:
    """``base_params``' leaves by path (a quantized kernel is one leaf), checked as the base of an
    adapter with LoRA ``targets`` and fully ``trainable`` leaves: it holds no adapters already (one
    loaded over them would apply on top of theirs), and it has a param at every path, a float
    kernel under each target and a plain array at each trainable leaf.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> sorted(jlora.adapter.check_base("adapter", {"k": jnp.ones((2, 2))}, targets=["k"]))
        ['k']
    """
    by_path = dict(leaves_with_paths(base_params, is_leaf=is_param))
    if not by_path or ("" in by_path and not hasattr(by_path[""], "shape")):  # None, {}, a model, not its params
        raise ValueError(f"{source}: base_params must be the base model's params (a tree of arrays or "
                         f"jax.ShapeDtypeStruct), got {type(base_params).__name__}")
    nodes = [p for p, x in by_path.items() if is_node(x)]
    if nodes:
        raise ValueError(f"{source}: base_params holds jlora nodes (at {nodes[:3]}); pass the base params the "
                         "adapter was trained over (arrays or jax.ShapeDtypeStruct). To swap adapters, load the "
                         "next onto those base params again (the LoRA tree keeps them as its LoraWeights' w); to "
                         "stack one adapter over another, merge the first in (jlora.merge)")
    targets, trainable = list(targets), list(trainable)
    absent = sorted(p for p in targets + trainable if p not in by_path)
    if absent:
        raise ValueError(f"{source}: made for another base model: no param at {absent[:5]}{_nested_hint(absent, by_path)}")
    check_float_targets(source, targets, by_path)
    check_trainable_not_lazy(source, trainable, by_path)
    return by_path


def _nested_hint(absent: list[str], by_path: dict[str, Any]) -> str:
    """Where the absent paths are under one key of ``base_params`` (``{"params": ...}``), say so."""
    for top in sorted({p.split("/", 1)[0] for p in by_path}):
        if all(f"{top}/{p}" in by_path for p in absent):
            return f"; base_params holds them under '{top}': pass base_params['{top}']"
    tops = {p.split("/", 1)[0] for p in absent if "/" in p}
    if len(tops) == 1 and all(p.split("/", 1)[-1] in by_path for p in absent):  # saved from {"params": ...}
        top = tops.pop()
        return f"; they are base_params' own paths under '{top}': pass {{'{top}': base_params}}"
    return ""


def check_float_targets(source: str | os.PathLike, targets: Iterable[str], base: dict[str, Any]) -> None:
    """Refuse adapters for base leaves that are not float kernels (``lora_init`` adapts no other).

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> jlora.adapter.check_float_targets("adapter", ["k"], {"k": jnp.ones((2, 2))})
    """
    for p in targets:
        if not jnp.issubdtype(base[p].dtype, jnp.floating):
            raise ValueError(f"{source}: '{p}' is {jnp.dtype(base[p].dtype).name} in the base: an adapter goes on "
                             "a float kernel (load it onto the float base the adapter was trained over)")


def check_trainable_not_lazy(source: str | os.PathLike, trainable: Iterable[str], base: dict[str, Any]) -> None:
    """Refuse fully trained leaves saved for base leaves that are lazy here (a quantized kernel
    cannot hold a trained float array).

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> jlora.adapter.check_trainable_not_lazy("adapter", ["bias"], {"bias": jnp.zeros(2)})
    """
    lazy = [p for p in trainable if isinstance(base[p], Lazy)]
    if lazy:
        raise ValueError(f"{source}: '{lazy[0]}' was trained in full, but the base holds a lazy "
                         f"{type(base[lazy[0]]).__name__} there; load onto the float base, or leave it out")


def model_hint(params: Any) -> str:
    """A hint where a model was passed for its params (a ``jlora.hf.LoraModel``, a Flax HF model).

    Example:
        >>> import jlora
        >>> class Model:
        ...     params = {}
        >>> jlora.adapter.model_hint(Model())
        ' (that is a Model: pass its .params)'
    """
    return f" (that is a {type(params).__name__}: pass its .params)" if hasattr(params, "params") else ""


def check_config_makes(op: str, config: LoraConfig, params: Any) -> None:
    """Refuse a ``lora_config`` to be saved beside adapters it would not make (a reader would
    rebuild other ones): each adapter's rank, scale and dropout against the config's for its path,
    no layer of an adapted module left without the adapter the config makes there, and, where the
    params are the tree ``lora_init`` made, no adapter or leaf trained whole it does not make.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> lw = jlora.LoraWeight(jnp.ones((4, 4)), jnp.ones((4, 2)), jnp.zeros((2, 4)), scale=1.0, path="k")
        >>> config = jlora.LoraConfig(rank=2, alpha=2, targets=["k"])
        >>> jlora.adapter.check_config_makes("save_adapter", config, {"k": lw})
    """
    for x in jax.tree.leaves(params, is_leaf=is_param):
        if not isinstance(x, LoraWeight) or not x.path:
            continue
        rank = pattern_value(x.path, config.rank_pattern, "rank_pattern", config.rank)
        scale = config.scale_for(rank, pattern_value(x.path, config.alpha_pattern, "alpha_pattern", config.alpha))
        checks = (("rank", rank, x.rank, x.rank == rank),
                  ("scale", scale, x.scale, math.isclose(x.scale, scale, rel_tol=1e-6)),
                  ("dropout", config.dropout, x.dropout, x.dropout == config.dropout))
        differ = [(name, made, held) for name, made, held, same in checks if not same]
        if differ:  # only what differs: a caller may have set the dropout to the config's (LoraModel)
            made = ", ".join(f"{name} {value:g}" for name, value, _ in differ)
            held = ", ".join(f"{name} {value:g}" for name, _, value in differ)
            raise ValueError(f"{op}: lora_config makes '{x.path}' {made}; the adapter there has {held}: pass the "
                             "LoraConfig the adapters were made with" + (" (adapters changed since, e.g. a rank cut: "
                             "one whose rank_pattern and alpha_pattern say so, or none)" if x.rank != rank else ""))
    entries = leaves_with_paths(params, is_leaf=is_param)
    kernel = lambda x: x.w if x.w is not None else jax.ShapeDtypeStruct(x.kernel_shape, x.a.dtype)  # a split's half
    base = {p: kernel(x) if isinstance(x, LoraWeight) else x.value if isinstance(x, Trainable) else x for p, x in entries}
    picked = _selects(config, {p: x for p, x in base.items() if x is not None})
    if picked is None:  # a config this tree does not fit at all: the checks above say what matters
        return
    missing = _unadapted(picked[0], {p for p, x in entries if isinstance(x, LoraWeight)})
    if missing:
        raise ValueError(f"{op}: lora_config adapts {len(missing)} kernel(s), in layers of the modules the params hold "
                         f"adapters for, that they hold none for: {missing[:4]}; pass the LoraConfig the adapters "
                         "were made with")
    if any(isinstance(x, LoraWeight) and x.path != p for p, x in entries):
        return  # not the tree lora_init made but one holding it (a job's head beside the model): its own leaves
    saved = config.to_dict()
    for kind, made, what, yours in (
            (LoraWeight, picked[0], f"no adapter (its targets are {saved['targets']})", ""),
            (Trainable, picked[1], f"no leaf trained whole (its trainable is {saved['trainable']})",
             " (for a leaf made Trainable by hand, one that names it in trainable)")):
        held = [p for p, x in entries if isinstance(x, kind) and p not in made]
        if held:
            raise ValueError(f"{op}: lora_config makes {what} at '{held[0]}', where the params hold one"
                             + (f" ({len(held)} such paths: {held[:4]})" if len(held) > 1 else "")
                             + f"; pass the LoraConfig the adapters were made with{yours}")


def size_on_disk(path: str | os.PathLike) -> str:
    """The size of the files in the directory ``path``, in KiB or MiB, as ``describe`` says it."""
    size = sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())
    return f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def load_config(path: str | os.PathLike) -> LoraConfig | None:
    """The ``jlora.LoraConfig`` an adapter was saved with (``save_adapter``'s ``lora_config``), or
    ``None`` where it was saved without one: what a saved adapter's next save, or a
    ``jlora.hf.LoraModel`` of it, passes on.

    Example:
        >>> import tempfile, jax.numpy as jnp, jlora
        >>> cfg = jlora.LoraConfig(rank=2, alpha=2, targets=["k"])
        >>> lw = jlora.LoraWeight(jnp.ones((4, 4)), jnp.ones((4, 2)), jnp.zeros((2, 4)), scale=1.0, path="k")
        >>> path = jlora.adapter.save_adapter(tempfile.mkdtemp() + "/adapter", {"k": lw}, lora_config=cfg)
        >>> jlora.adapter.load_config(path) == cfg
        True
    """
    saved = read_config(path).get("lora_config")
    if saved is None:
        return None
    try:
        return LoraConfig(**saved)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: its lora_config is not one this jlora reads: {err}") from None


def load_adapter(path: str | os.PathLike, base_params: Any) -> Any:
    """The LoRA tree: ``base_params`` with the adapter's ``LoraWeight`` and ``Trainable`` leaves.

    Every key and shape is checked against the base before anything is built; a fully trained leaf
    keeps the float dtype it was saved in.

    Example:
        >>> import tempfile, jax.numpy as jnp, jlora
        >>> lw = jlora.LoraWeight(jnp.ones((4, 4)), jnp.ones((4, 2)), jnp.zeros((2, 4)), scale=1.0, path="k")
        >>> path = jlora.adapter.save_adapter(tempfile.mkdtemp() + "/adapter", {"k": lw})
        >>> jlora.adapter.load_adapter(path, {"k": jnp.ones((4, 4))})["k"].b.shape
        (2, 4)
    """
    return loaded(path, base_params, *one_save(path, load_tensors))


def loaded(path: str | os.PathLike, base_params: Any, config: dict, tensors: dict[str, np.ndarray]) -> Any:
    """``load_adapter``'s tree from one save's ``config`` and ``tensors`` (``one_save``'s): for a
    caller that reads the config first (``jlora.finetune.load_job``'s metadata), of that same save.

    Example:
        >>> import tempfile, jax.numpy as jnp, jlora
        >>> lw = jlora.LoraWeight(jnp.ones((4, 4)), jnp.ones((4, 2)), jnp.zeros((2, 4)), scale=1.0, path="k")
        >>> path = jlora.adapter.save_adapter(tempfile.mkdtemp() + "/adapter", {"k": lw})
        >>> config, tensors = jlora.adapter.one_save(path, jlora.adapter.load_tensors)
        >>> jlora.adapter.loaded(path, {"k": jnp.ones((4, 4))}, config, tensors)["k"].rank
        2
    """
    check_finite(str(Path(path) / WEIGHTS_FILE), tensors, "nothing is loaded")
    _check_keys(path, config, tensors)
    targets, trainable = config["targets"], config["trainable"]
    prefix, saved = (config.get("metadata") or {}).get("model_prefix"), [*targets, *trainable]
    have = dict(leaves_with_paths(base_params, is_leaf=is_param)) if prefix else {}
    if prefix and any(p not in have for p in saved) and all(
            p.removeprefix(prefix + "/") in have for p in saved if p.startswith(prefix + "/")):
        beside = sorted({p.split("/", 1)[0] for p in saved} - {prefix})
        raise ValueError(f"{path}: saved by jlora finetune, with the model's params under '{prefix}' and "
                         f"{', '.join(beside) or 'nothing'} beside them: load it with "
                         f"jlora.finetune.load_job(path) (or load_classifier), or pass {{'{prefix}': base_params, ...}}")
    by_path = check_base(path, base_params, targets, trainable)
    for p, spec in targets.items():
        if list(by_path[p].shape) != spec["shape"]:
            raise ValueError(
                f"{path}: adapter for another base model: '{p}' has shape {list(by_path[p].shape)} "
                f"in the base, {spec['shape']} in the adapter{replicated_hint(by_path[p].shape, spec['shape'])}"
            )
        try:
            layout = Layout.parse(spec["layout"])
        except ValueError as err:
            raise ValueError(f"{path}: '{p}' in {CONFIG_FILE}: {err}") from None
        for f in ("a", "b"):
            if not jnp.issubdtype(tensors[f"{p}/{f}"].dtype, jnp.floating):
                raise ValueError(f"{path}: tensor '{p}/{f}' is {tensors[f'{p}/{f}'].dtype}; LoRA factors are floating point")
        want_a, want_b = layout.a_shape(spec["shape"], spec["rank"]), layout.b_shape(spec["shape"], spec["rank"])
        if tensors[f"{p}/a"].shape != want_a or tensors[f"{p}/b"].shape != want_b:
            raise ValueError(f"{path}: '{p}': a/b shapes {tensors[f'{p}/a'].shape}, {tensors[f'{p}/b'].shape} "
                             f"do not match rank {spec['rank']} and layout '{layout}' (want {want_a}, {want_b})")
    for p, shape in trainable.items():  # kept in the dtype it was trained in (f32 over a bf16 base), as restore does
        if (list(by_path[p].shape) != list(shape) or list(tensors[p].shape) != list(shape)
                or not jnp.issubdtype(tensors[p].dtype, jnp.floating)):
            raise ValueError(f"{path}: '{p}' is {tensors[p].dtype}{list(tensors[p].shape)} in the adapter, "
                             f"{np.dtype(by_path[p].dtype)}{list(by_path[p].shape)} in the base")
    new = {p: LoraWeight(by_path[p], jnp.asarray(tensors[f"{p}/a"]), jnp.asarray(tensors[f"{p}/b"]), scale=spec["scale"],
                         layout=spec["layout"], path=p, dropout=spec.get("dropout", 0.0)) for p, spec in targets.items()}
    new.update({p: Trainable(jnp.asarray(tensors[p])) for p in trainable})
    new = follow_bases(str(path), new, by_path)  # on a sharded base: sharded alike
    warn_other_base(str(path), {p: spec["base"] for p, spec in targets.items() if "base" in spec}, by_path,
                    stacklevel=_user_stacklevel())
    missing = unadapted_layers(config.get("lora_config"), by_path, set(targets))
    if missing:
        warnings.warn(f"{path}: its config adapts {len(missing)} kernel(s) of this base that the adapter holds no "
                      f"adapter for, left as they are (a deeper base than the one it was trained on?): {missing[:4]}",
                      stacklevel=_user_stacklevel())
    return replace_leaves(base_params, new, is_leaf=is_param)


def unadapted_layers(saved: dict | None, by_path: dict[str, Any], adapted: set[str]) -> list[str]:
    """The kernels of a base that the config adapters were saved with (``saved``, its dict) adapts
    in layers of the modules they have adapters for, and that they hold no adapter for: a base
    deeper than the one they were trained on (all-MiniLM-L12 for -L6). A module the trained model
    lacked (a pooler a job left out) is not named. ``by_path``: the base's leaves by path.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> config = jlora.LoraConfig(rank=2, targets=["q"]).to_dict()
        >>> base = {f"layers_{i}/q/kernel": jnp.ones((4, 4)) for i in range(3)}
        >>> jlora.adapter.unadapted_layers(config, base, {"layers_0/q/kernel", "layers_1/q/kernel"})
        ['layers_2/q/kernel']
    """
    picked = _selects(saved, by_path) if saved else None
    return [] if picked is None else _unadapted(picked[0], adapted)


def _selects(config: LoraConfig | dict, by_path: dict[str, Any]) -> tuple[list[str], list[str]] | None:
    """The paths a config (or its dict) adapts and trains whole over a tree's leaves, as
    ``lora_init`` picks them (all-linear's ``weight`` leaves too, which infer_layout would sort);
    ``None`` for a config the tree does not fit at all."""
    try:
        with warnings.catch_warnings():  # the config's own advice (float16 factors under Adam) is for training
            warnings.simplefilter("ignore")
            config = config if isinstance(config, LoraConfig) else LoraConfig(**config)
            return select(config, [(p, x) for p, x in by_path.items() if not is_node(x)], weights=True)
    except (TypeError, ValueError):
        return None


def _unadapted(would: Iterable[str], adapted: set[str]) -> list[str]:
    """The kernels of ``would`` (a config's picks) that ``adapted`` lacks in layers of modules it adapts."""
    layered = lambda p: re.sub(r"\d+(?![^/])", "*", p)  # layers/11/q -> layers/*/q; linen's layers_11/q -> layers_*/q
    kinds = {layered(p) for p in adapted}
    return sorted(p for p in set(would) - adapted if layered(p) in kinds)  # another layer of an adapted module


def _check_keys(path: str | os.PathLike, config: dict, tensors: Iterable[str]) -> None:
    """Refuse an adapter whose weights file holds other keys than its config names."""
    expected = {f"{p}/{f}" for p in config["targets"] for f in ("a", "b")} | set(config["trainable"])
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise ValueError(f"{path}: adapter weights do not match its config: missing {missing[:5]}, extra {extra[:5]}")


def describe(path: str | os.PathLike) -> str:
    """What an adapter holds: targets, ranks, parameter counts, size on disk.

    Example:
        >>> import tempfile, jax.numpy as jnp, jlora
        >>> lw = jlora.LoraWeight(jnp.ones((4, 4)), jnp.ones((4, 2)), jnp.zeros((2, 4)), scale=1.0, path="k")
        >>> path = jlora.adapter.save_adapter(tempfile.mkdtemp() + "/adapter", {"k": lw})
        >>> print(jlora.adapter.describe(path))  # doctest: +ELLIPSIS
        adapter: ...
        targets: 1 kernels, rank 2
          k  4x4  layout io  r=2  scale=1
        parameters: 16 LoRA + 0 fully trained; ... KiB on disk
    """
    config, shapes = one_save(path, tensor_shapes)
    _check_keys(path, config, shapes)
    lines = [f"adapter: {Path(path)}"]
    meta = config.get("metadata") or {}
    for key in sorted(meta):
        lines.append(f"{key}: {meta[key]}")
    n_lora = sum(math.prod(shapes[f"{p}/{factor}"]) for p in config["targets"] for factor in "ab")
    n_full = sum(math.prod(shapes[p]) for p in config["trainable"])
    ranks = sorted({spec["rank"] for spec in config["targets"].values()})
    lines.append(f"targets: {len(config['targets'])} kernels, rank {', '.join(map(str, ranks)) or '-'}")
    for p, spec in sorted(config["targets"].items()):
        lines.append(f"  {p}  {'x'.join(map(str, spec['shape']))}  layout {spec['layout']}  r={spec['rank']}  "
                     f"scale={spec['scale']:g}")
    for p, shape in sorted(config["trainable"].items()):
        lines.append(f"  {p}  {'x'.join(map(str, shape))}  fully trained")
    lines.append(f"parameters: {n_lora:,} LoRA + {n_full:,} fully trained; {size_on_disk(path)} on disk")
    return "\n".join(lines)
