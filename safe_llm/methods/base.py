"""The one interface every pruning method implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from safe_llm.engine import BlockContext


@dataclass
class NoOptions:
    """A method without hyperparameters."""


class PruningMethod:
    """Prunes one transformer block in place.

    Subclasses set ``name`` (the ``--method`` value), ``Options`` (a dataclass whose fields
    become CLI flags and recipe keys; each field's ``metadata["help"]`` is its help text) and
    implement :meth:`prune_block`. ``needs_hessian`` asks the engine for ``2 X^T X / n`` per
    layer. Registration is by the ``@register`` decorator of :mod:`safe_llm.methods`.
    """

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    needs_hessian: ClassVar[bool] = False

    def __init__(self, options: object | None = None):
        self.options = options if options is not None else self.Options()

    def prune_block(self, ctx: BlockContext) -> dict[str, float]:
        """Make every layer in ``ctx.layers`` meet ``ctx.pattern``; return extra metrics."""
        raise NotImplementedError
