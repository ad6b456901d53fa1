"""Axis layouts of adapted kernels: which axes of ``w`` are batch, input and output.

A layout gives each axis of a kernel ``w`` a role and a position within its role group:

- ``b`` batch axes (stacked layers, experts): present in ``w``, ``a`` and ``b``;
- ``i`` input axes (contracted with the activation): present in ``w`` and ``a``;
- ``o`` output axes: present in ``w`` and ``b``.

``a`` has shape ``batch + input + (r,)`` and ``b`` has shape ``batch + (r,) + output``, each group
in its own order (``k``), so ``ΔW = scale · a @ b`` is one batched matmul. Declared layouts are
strings with one letter per axis of ``w``: ``"io"`` (Flax Dense), ``"oi"`` (GPT-2's Conv1D),
``"ioo"`` (DenseGeneral to heads), ``"iio"`` (DenseGeneral from heads), ``"bio"`` (``nn.scan``
stacked Dense), ``"iiio"`` (2-D conv window ``HWIO``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Sequence

ROLES = ("b", "i", "o")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Per-axis ``(role, k)`` of a kernel; ``k`` orders the axes of one role inside ``a``/``b``.

    Example:
        >>> import jlora
        >>> jlora.Layout.parse("iio").group("i"), jlora.Layout("iio") == jlora.Layout.parse("iio")
        ((0, 1), True)
    """

    axes: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        """``Layout("iio")``: the letters parsed, as ``Layout.parse`` does (a ``Layout`` taken as
        it is); pairs as a tuple of tuples (hashable)."""
        axes = self.axes
        if isinstance(axes, (str, Layout)):
            axes = Layout.parse(axes).axes
        else:
            pairs = tuple(axes) if isinstance(axes, (tuple, list)) else None
            if pairs is None or not all(isinstance(p, (tuple, list)) and len(p) == 2 and p[0] in ROLES
                                        and isinstance(p[1], numbers.Integral) for p in pairs):
                raise ValueError(f"Layout takes the letters of its axes ('io', 'bio') or (role, k) pairs "
                                 f"((('i', 0), ('o', 0))); got {axes!r}")
            axes = tuple((role, int(k)) for role, k in pairs)
        object.__setattr__(self, "axes", axes)

    @classmethod
    def parse(cls, spec: "str | Layout") -> "Layout":
        """Layout from a string of ``b``/``i``/``o`` letters, one per axis, in order of appearance.

        Example:
            >>> import jlora
            >>> str(jlora.Layout.parse("oi"))
            'oi'
        """
        if isinstance(spec, Layout):
            return spec
        if isinstance(spec, (tuple, list)):  # (role, k) pairs
            return cls(spec)
        if not isinstance(spec, str):
            raise ValueError(f"layout {spec!r}: use a string of one letter per kernel axis, e.g. 'io', 'oi', 'iio', 'bio'")
        letters = spec.replace(",", "").replace(" ", "")
        bad = sorted(set(letters) - set(ROLES))
        if bad:
            raise ValueError(
                f"layout {spec!r}: use one letter per kernel axis from 'b' (batch), 'i' (input), "
                f"'o' (output), e.g. 'io', 'oi', 'iio', 'bio'; got {bad or spec!r}"
            )
        counts = {role: 0 for role in ROLES}
        axes = []
        for role in letters:
            axes.append((role, counts[role]))
            counts[role] += 1
        layout = cls(tuple(axes))
        layout.check()
        return layout

    @classmethod
    def default(cls, ndim: int) -> "Layout | None":
        """The layout assumed without declaration or inference: ``(in, out)`` for 2-D kernels.

        Example:
            >>> import jlora
            >>> str(jlora.Layout.default(2)), jlora.Layout.default(3)
            ('io', None)
        """
        return cls.parse("io") if ndim == 2 else None

    def check(self) -> None:
        """Raise ``ValueError`` unless the layout has input and output axes, each role's ``k`` in order.

        Example:
            >>> import jlora
            >>> jlora.Layout((("i", 0), ("o", 0))).check()
        """
        for role in ("i", "o"):
            if not self.group(role):
                raise ValueError(f"layout '{self}' has no '{role}' axis: a kernel needs input and output axes")
        for role in ROLES:
            ks = sorted(k for r, k in self.axes if r == role)
            if ks != list(range(len(ks))):
                raise ValueError(f"layout {self.axes}: positions of role '{role}' are not 0..n-1")

    @property
    def ndim(self) -> int:
        """The number of axes of ``w``."""
        return len(self.axes)

    def group(self, role: str) -> tuple[int, ...]:
        """Axes of ``w`` with ``role``, ordered as they are stored in ``a``/``b``.

        Example:
            >>> import jlora
            >>> jlora.Layout.parse("ioo").group("o")
            (1, 2)
        """
        return self._groups[role]

    @functools.cached_property
    def _groups(self) -> dict[str, tuple[int, ...]]:  # asked for at every call of a wrapped function
        return {role: tuple(ax for _, ax in sorted((k, ax) for ax, (r, k) in enumerate(self.axes) if r == role))
                for role in ROLES}

    def group_shape(self, shape: Sequence[int], role: str) -> tuple[int, ...]:
        """The sizes of a kernel of ``shape`` along the axes of one role.

        Example:
            >>> import jlora
            >>> jlora.Layout.parse("iio").group_shape((4, 8, 32), "i")
            (4, 8)
        """
        return tuple(shape[ax] for ax in self.group(role))

    def a_shape(self, shape: Sequence[int], rank: int) -> tuple[int, ...]:
        """The shape of ``a`` for a kernel of ``shape``: ``batch + input + (rank,)``.

        Example:
            >>> import jlora
            >>> jlora.Layout.parse("bio").a_shape((6, 16, 32), 4)
            (6, 16, 4)
        """
        return self.group_shape(shape, "b") + self.group_shape(shape, "i") + (rank,)

    def b_shape(self, shape: Sequence[int], rank: int) -> tuple[int, ...]:
        """The shape of ``b`` for a kernel of ``shape``: ``batch + (rank,) + output``.

        Example:
            >>> import jlora
            >>> jlora.Layout.parse("bio").b_shape((6, 16, 32), 4)
            (6, 4, 32)
        """
        return self.group_shape(shape, "b") + (rank,) + self.group_shape(shape, "o")

    def fan_in(self, shape: Sequence[int]) -> int:
        """The number of inputs of one kernel of the stack (the product of the input axes).

        Example:
            >>> import jlora
            >>> jlora.Layout.parse("iio").fan_in((4, 8, 32))
            32
        """
        return math.prod(self.group_shape(shape, "i"))

    def fan_out(self, shape: Sequence[int]) -> int:
        """The number of outputs of one kernel of the stack (the product of the output axes).

        Example:
            >>> import jlora
            >>> jlora.Layout.parse("ioo").fan_out((32, 4, 8))
            32
        """
        return math.prod(self.group_shape(shape, "o"))

    def factor_axes(self) -> tuple[dict[int, int], dict[int, int]]:
        """Where each axis of ``w`` sits in ``a`` and in ``b`` (absent where it is not there).

        Example:
            >>> import jlora
            >>> jlora.Layout.parse("bio").factor_axes()
            ({0: 0, 1: 1}, {0: 0, 2: 2})
        """
        nb = len(self.group("b"))
        in_a: dict[int, int] = {}
        in_b: dict[int, int] = {}
        for ax, (role, k) in enumerate(self.axes):
            if role == "b":
                in_a[ax], in_b[ax] = k, k
            elif role == "i":
                in_a[ax] = nb + k
            else:
                in_b[ax] = nb + 1 + k
        return in_a, in_b

    def w_shape(self, a_shape: Sequence[int], b_shape: Sequence[int]) -> tuple[int, ...]:
        """The shape of ``w`` that factors of these shapes belong to (inverse of ``a_shape``/``b_shape``).

        Example:
            >>> import jlora
            >>> jlora.Layout.parse("bio").w_shape((6, 16, 4), (6, 4, 32))
            (6, 16, 32)
        """
        in_a, in_b = self.factor_axes()
        return tuple(int(a_shape[in_a[ax]]) if ax in in_a else int(b_shape[in_b[ax]]) for ax in range(self.ndim))

    def canonical_to_w(self) -> tuple[int, ...]:
        """Permutation taking ``batch + input + output`` (the order of ``a @ b``) to ``w``'s axes.

        Example:
            >>> import jlora
            >>> jlora.Layout.parse("oi").canonical_to_w()  # a @ b is (in, out); w is (out, in)
            (1, 0)
        """
        offsets = {"b": 0, "i": len(self.group("b")), "o": len(self.group("b")) + len(self.group("i"))}
        return tuple(offsets[role] + k for role, k in self.axes)

    def permute(self, perm: Sequence[int]) -> "Layout":
        """Layout of ``transpose(w, perm)``.

        Example:
            >>> import jlora
            >>> str(jlora.Layout.parse("bio").permute((0, 2, 1)))
            'boi'
        """
        return Layout(tuple(self.axes[p] for p in perm))

    def batched(self, k: int) -> "Layout | None":
        """This layout with ``k`` leading batch axes added (a stack of ``k``-deep copies), or, for a
        negative ``k``, its first ``-k`` axes removed (a layer of the stack); ``None`` where those
        are not its leading batch axes.

        Example:
            >>> import jlora
            >>> parse = jlora.Layout.parse
            >>> str(parse("io").batched(1)), str(parse("bio").batched(-1)), parse("ibo").batched(-1)
            ('bio', 'io', None)
        """
        if k >= 0:
            return Layout(tuple(("b", j) for j in range(k)) + tuple((r, j + k if r == "b" else j) for r, j in self.axes))
        if any(self.axes[j] != ("b", j) for j in range(-k)):
            return None
        return Layout(tuple((r, j + k if r == "b" else j) for r, j in self.axes[-k:]))

    def __str__(self) -> str:
        return "".join(role for role, _ in self.axes)

    def __repr__(self) -> str:
        """``Layout('bio')``, or the axes where their order within a role is not the letters' own."""
        counts = {role: 0 for role in "bio"}
        in_order = True
        for role, k in self.axes:  # the k of each role counting up, as parse numbers them
            in_order = in_order and k == counts.get(role)
            counts[role] = counts.get(role, 0) + 1
        return f"Layout({str(self)!r})" if in_order else f"Layout(axes={self.axes!r})"


def reshape_groups(old: Sequence[int], new: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Split a row-major reshape into minimal groups of axes with equal products.

    Returns ``[(old_axes, new_axes), ...]`` or ``None`` when a size-1 or size-0 axis makes the
    grouping ambiguous.

    Example:
        >>> from jlora.layout import reshape_groups
        >>> reshape_groups((4, 2, 3), (8, 3))
        [([0, 1], [0]), ([2], [1])]
    """
    if any(d <= 1 for d in old) or any(d <= 1 for d in new) or math.prod(old) != math.prod(new):
        return None
    groups, i, j = [], 0, 0
    while i < len(old):
        olds, news, po, pn = [i], [j], old[i], new[j]
        while po != pn:
            if po < pn:
                i += 1
                olds.append(i)
                po *= old[i]
            else:
                j += 1
                news.append(j)
                pn *= new[j]
        groups.append((olds, news))
        i, j = i + 1, j + 1
    return groups
