"""The report of one pruning run: a typed object, written as ``report.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from safe_llm.core.reports import BlockReport, PruneReport


@dataclass
class RunReport:
    """What a run did and measured.

    ``pattern`` is ``"unstructured"`` or ``"N:M"``; ``sparsity`` the target over all pruned
    weights; ``block_sparsity`` each block's target (``sparsity_profile``: uniform, owl or
    explicit; ``owl_outlier_ratios`` with owl); ``evaluation`` ``{"dense": {source: result},
    "pruned": {...}}`` (see :func:`safe_llm.evaluation.evaluate.source_perplexity`); ``zeroshot``
    the same for ``--eval-tasks`` (see :func:`safe_llm.evaluation.zeroshot.evaluate_tasks`); ``blocks`` the
    engine's per-block reports; times in seconds, memory in bytes.
    """

    model: str
    command: str | None
    method: str
    pattern: str
    sparsity: float
    sparsity_profile: str = "uniform"
    block_sparsity: list[float] = field(default_factory=list)
    owl_outlier_ratios: list[float] | None = None
    data_parallel_ranks: int = 1
    device: str = ""
    dtype: str = ""
    precision: dict = field(default_factory=dict)  # bf16 support and what the run computed in
    calibration: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    zeroshot: dict = field(default_factory=dict)  # --eval-tasks: {"dense": ..., "pruned": ...}
    recovery: dict | None = None  # what --recover did (data, steps, tokens, losses)
    finished: str = ""
    blocks: list[BlockReport] = field(default_factory=list)
    seconds: float = 0.0
    peak_memory_bytes: int = 0
    overall_sparsity: float = 0.0
    resumed_from_block: int = 0
    all_block_weights_sparsity: float = float("nan")  # every block weight of 2+ dimensions
    unpruned_block_weights: dict = field(default_factory=dict)  # left dense: {name: params}
    layer_errors: bool = False  # whether the blocks report each layer's error
    stage_peak_memory_bytes: dict = field(default_factory=dict)  # per stage of the run
    total_seconds: float = 0.0
    stages: dict = field(default_factory=dict)  # what each other stage returned, by name

    def add_prune(self, pruned: PruneReport) -> None:
        """Record the prune stage's walk over the blocks (its fields are the report's)."""
        for f in fields(pruned):
            setattr(self, f.name, getattr(pruned, f.name))

    @classmethod
    def from_dict(cls, document: dict) -> RunReport:
        """The report of a ``report.json`` document (keys this version does not know, from an
        older or newer writer, are dropped)."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in document.items() if k in names}
        values["blocks"] = [BlockReport(**b) for b in document.get("blocks", [])]
        values.setdefault("owl_outlier_ratios", None)
        return cls(**values)

    def to_dict(self) -> dict:
        """The ``report.json`` document (``owl_outlier_ratios`` only with OWL, ``recovery``
        only after a recovery, ``stages`` and ``zeroshot`` only when something was recorded)."""
        document = asdict(self)
        for optional in ("owl_outlier_ratios", "recovery"):
            if document[optional] is None:
                del document[optional]
        for optional in ("stages", "zeroshot"):
            if not document[optional]:
                del document[optional]
        return document

    def __getitem__(self, key: str):
        """``report["method"]``: a key of the ``report.json`` document (the same names and
        values as the file, including the optional ones)."""
        return self.to_dict()[key]
