"""The spec's sections for compression and cost: ``compress`` (pruning, distillation, which
variant serves) and ``cost`` (machine kinds and their prices).

Prices in :data:`ILLUSTRATIVE_MACHINES` are placeholders of the right order of magnitude,
chosen so that reports show a cost column out of the box; they are nobody's real prices.
Put your own in the spec's ``cost.machines``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator

from stemma.components.spec.limits import MetricDrop, MetricDropLimit, default_drop
from stemma.components.spec.sections import (
    ArchitectureName,
    Name,
    Section,
    check_model_reference,
)

#: Compression methods; their variants are dense fp32 networks, so they can be quantized in
#: turn (a quantized variant cannot).
COMPRESS_METHODS = ("prune", "distill")

#: How :class:`PruneSpec` ranks hidden units: the L1 or L2 norm of each unit's incoming
#: weights (and bias), scaled by the norm of its outgoing weights.
PRUNE_CRITERIA = ("l1", "l2")
PruneCriterion = Literal["l1", "l2"]

#: Which model batch scoring and the endpoint serve: the version they were pointed at
#: (``parent``), its fastest passing quantized variant (``quantized``, as ``quantize.serve``
#: did), or its cheapest passing variant of any kind (``cheapest``).
SERVE_CHOICES = ("parent", "quantized", "cheapest")
ServeChoice = Literal["parent", "quantized", "cheapest"]

#: Batch sizes every latency probe times.
PROBE_BATCH_SIZES = (1, 64, 4096)

#: Default metric-drop limit of a compressed variant, by the metric's units.
COMPRESS_DROP = {"absolute": 0.01, "percent": 2.0}


CompressMethod = Literal["prune", "distill"]
#: A ``models:/`` reference, its length checked first.
BoundedModelReference = Annotated[str, Field(max_length=512), AfterValidator(check_model_reference)]


class PruneSpec(Section):
    """Structured pruning: whole hidden units removed, leaving a smaller dense network."""

    amount: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description=(
            "Share of the hidden units of every prunable layer to remove (a layer keeps "
            "`round(width * (1 - amount))` units; an amount that leaves a layer no unit is "
            "refused)."
        ),
    )
    criterion: PruneCriterion = Field(
        default="l1",
        description="Which units go: those with the smallest `l1` or `l2` weight norm.",
    )
    steps: int = Field(
        default=1,
        ge=1,
        le=20,
        description="Prune in this many equal steps, each followed by its fine-tune.",
    )
    finetune_epochs: int = Field(
        default=3,
        ge=0,
        le=1000,
        description="Epochs of fine-tuning on the training split after each step (0: none).",
    )


class StudentSpec(Section):
    """The student network of distillation."""

    architecture: ArchitectureName = Field(
        default="mlp",
        description="`mlp`, or `package.module:Class` built as `Class(n_inputs=..., n_outputs=..., **params)`.",
    )
    hidden: list[Annotated[int, Field(gt=0, le=65536)]] | None = Field(
        default=None,
        max_length=16,
        description="Hidden widths of an `mlp` student (default: half the teacher's widths).",
    )
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout of an `mlp` student.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of a custom student's constructor."
    )


class DistillSpec(Section):
    """Distillation: a smaller student trained on the teacher's soft targets."""

    student: StudentSpec = Field(default_factory=StudentSpec, description="The student network.")
    temperature: float = Field(
        default=2.0,
        gt=0.0,
        le=100.0,
        description="Softening of the teacher's class scores (classification only).",
    )
    alpha: float = Field(
        default=0.7,
        ge=0.0,
        le=1.0,
        description="Weight of the teacher's soft targets; `1 - alpha` goes to the true labels.",
    )
    epochs: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="Training epochs of the student (default: train.epochs).",
    )
    production_batches: list[Annotated[str, Field(min_length=1, max_length=1024)]] = Field(
        default_factory=list,
        max_length=1000,
        description=(
            "Unlabelled production batches (files or folders of Parquet/CSV) whose teacher "
            "scores are added to the training rows; each is recorded as an input."
        ),
    )


class CompressSpec(Section):
    """Compression beyond quantization: pruning, distillation, and which variant serves."""

    methods: list[CompressMethod] = Field(
        default_factory=lambda: list[CompressMethod](["prune", "distill"]),
        min_length=1,
        max_length=2,
        description="Variants to build: `prune`, `distill`, or both.",
    )
    prune: PruneSpec = Field(default_factory=PruneSpec, description="Structured pruning.")
    distill: DistillSpec = Field(default_factory=DistillSpec, description="Distillation.")
    then_quantize: list[CompressMethod] = Field(
        default_factory=list,
        max_length=2,
        description=(
            "Compressed variants to quantize in turn with the quantize section's methods "
            "(for example `[distill]`: a student, then int8)."
        ),
    )
    max_metric_drop: MetricDropLimit | None = Field(
        default=None,
        description=(
            "Largest loss of the gate metric against the parent a variant may show: a number "
            "(`0.01`) or a percentage (`2%`). Default: 2% for rmse and mae, 0.01 otherwise."
        ),
    )
    min_speedup: float = Field(
        default=1.0,
        gt=0.0,
        le=1000.0,
        description="Smallest speed-up over the parent's fastest fp32 backend a variant must show.",
    )
    min_cost_reduction: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description=(
            "Smallest share by which a variant's cost per million predictions must undercut "
            "its parent's (`0.3`: at most 0.7x)."
        ),
    )
    model: BoundedModelReference | None = Field(
        default=None,
        description="Version to compress (default: the newest version that passed its gate).",
    )
    serve: ServeChoice = Field(
        default="parent",
        description=(
            "What batch scoring and the endpoint serve for a version: `parent` (the version "
            "itself), `quantized` (its fastest passing quantized variant) or `cheapest` (its "
            "cheapest passing variant of any kind, by cost per million predictions)."
        ),
    )

    @model_validator(mode="after")
    def _quantized_ones_are_built(self) -> CompressSpec:
        missing = [method for method in self.then_quantize if method not in self.methods]
        if missing:
            raise ValueError(
                f"then_quantize names {', '.join(missing)}, which methods does not build"
            )
        return self

    def metric_drop(self, metric: str) -> MetricDrop:
        """``max_metric_drop``, or its default for ``metric``."""
        return self.max_metric_drop or default_drop(metric, **COMPRESS_DROP)


class MachineSpec(Section):
    """A machine kind and what an hour of it costs."""

    price_per_hour: float = Field(
        gt=0.0, le=100_000.0, description="Price of one hour of the machine, in `cost.currency`."
    )
    cpus: int = Field(default=1, ge=1, le=4096, description="CPU cores the price buys.")
    gpu: bool = Field(default=False, description="Whether the machine has a GPU.")
    description: Annotated[str, Field(max_length=200)] = Field(
        default="", description="What the machine is, shown next to its figures."
    )


#: Machine kinds a spec without ``cost.machines`` is priced on. Illustrative only: of the
#: order of an on-demand cloud VM, not anyone's quoted price.
ILLUSTRATIVE_MACHINES: dict[str, MachineSpec] = {
    "cpu-small": MachineSpec(
        price_per_hour=0.10, cpus=2, description="2 vCPUs (illustrative price)"
    ),
    "cpu-large": MachineSpec(
        price_per_hour=0.80, cpus=16, description="16 vCPUs (illustrative price)"
    ),
    "gpu": MachineSpec(
        price_per_hour=2.50,
        cpus=16,
        gpu=True,
        description="one datacenter GPU, 16 vCPUs (illustrative price)",
    ),
}


class CostSpec(Section):
    """What predictions cost: machine kinds with a price, and which one scores and serves.

    A model's cost per million predictions is the CPU-seconds it spends on a million rows,
    as a share of the machine's cores, times the machine's price per hour; on a GPU
    machine, the wall-clock seconds (the GPU is held while it runs).
    """

    currency: Annotated[str, Field(min_length=1, max_length=8)] = Field(
        default="USD", description="Unit of every price and cost."
    )
    machines: dict[Name, MachineSpec] = Field(
        default_factory=lambda: dict(ILLUSTRATIVE_MACHINES),
        min_length=1,
        max_length=64,
        description=(
            "Machine kinds by name. The default kinds' prices are illustrative, not real: "
            "set your own."
        ),
    )
    scoring: Name = Field(default="cpu-small", description="The machine batch scoring runs on.")
    serving: Name = Field(default="cpu-small", description="The machine the endpoint runs on.")

    @model_validator(mode="after")
    def _known_machines(self) -> CostSpec:
        for role in ("scoring", "serving"):
            name = getattr(self, role)
            if name not in self.machines:
                raise ValueError(
                    f"cost.{role} names machine {name!r}, which cost.machines does not define "
                    f"(it has {', '.join(sorted(self.machines))}): add it to cost.machines with "
                    "its price_per_hour and cpus, or name one of those"
                )
        return self

    @property
    def illustrative(self) -> bool:
        """Whether the prices are the illustrative defaults, not the user's own."""
        return self.machines == ILLUSTRATIVE_MACHINES

    def machine(self, role: Literal["scoring", "serving"]) -> MachineSpec:
        """The machine that does ``role``."""
        return self.machines[getattr(self, role)]

    def describe(self, role: Literal["scoring", "serving"], amount: float) -> str:
        """``0.0021 USD per million predictions on cpu-small (illustrative prices)``."""
        shown = " (illustrative prices)" if self.illustrative else ""
        return (
            f"{format_amount(amount)} {self.currency} per million predictions on "
            f"{getattr(self, role)}{shown}"
        )


def format_amount(amount: float) -> str:
    """An amount with two significant digits, without an exponent (``0.000053``, ``1.20``)."""
    if not math.isfinite(amount) or amount == 0:
        return f"{amount:g}"
    decimals = max(2, 1 - math.floor(math.log10(abs(amount))))
    return f"{amount:.{decimals}f}"


def cost_per_million(
    cpu_seconds_per_million: float, wall_seconds_per_million: float, machine: MachineSpec
) -> float:
    """The price of a million predictions on ``machine``.

    A CPU machine is charged for the share of its cores the work keeps busy
    (``cpu_seconds / cpus``); a GPU machine for the wall-clock time it is held.
    """
    seconds = wall_seconds_per_million if machine.gpu else cpu_seconds_per_million / machine.cpus
    return seconds * machine.price_per_hour / 3600.0
