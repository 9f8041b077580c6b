"""The hardware catalogue: accelerators one can rent for inference, with the figures a roofline needs.

Units are SI throughout, never GiB: FLOP/s, bytes/s, bytes, US dollars per GPU-hour. A datasheet
"80 GB" is stored as 80e9 bytes (real devices report a few percent more; the planner's memory
fraction absorbs that and the runtime's own reservations). Link bandwidths are per GPU and per
direction: NVLink 4's "900 GB/s" is 450e9 here, because a collective sends and receives at once.

The shipped catalogue is ``data/hardware.json`` (see docs/planner.md); a user file with the same
shape overrides fields or adds accelerators by name. Figures nobody could check against a
datasheet are listed in ``Accelerator.unverified`` instead of being passed off as facts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from pdserve.planner.catalogue.json_file import EntryFields, load_catalogue

SECTION = "accelerators"
FLOPS_DTYPES = ("bf16", "fp16", "fp32")
# The figures that carry a verified flag in the JSON file.
FIGURES = (
    "peak_flops_per_s",
    "memory_bytes_per_s",
    "memory_bytes",
    "intra_node_bytes_per_s",
    "network_bytes_per_s",
    "gpus_per_node",
)
_DATE = re.compile(r"^\d{4}-\d{2}(-\d{2})?$")


@dataclass(frozen=True)
class GpuHourPrice:
    """What one GPU costs per hour on demand at one provider, and where that figure came from."""

    usd_per_gpu_hour: float
    provider: str
    """Who rents it, e.g. "Lambda"."""
    page: str
    """The provider's pricing page (URL)."""
    date: str
    """When the figure was current: YYYY-MM-DD or YYYY-MM."""
    verified: bool
    """True only if the figure was seen on the provider's own page."""
    note: str = ""
    """Billing model, instance type, where the figure was actually read."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.usd_per_gpu_hour) and self.usd_per_gpu_hour > 0):
            raise ValueError(f"usd_per_gpu_hour must be > 0, got {self.usd_per_gpu_hour!r}")
        if not _DATE.match(self.date):
            raise ValueError(f"price date must be YYYY-MM-DD or YYYY-MM, got {self.date!r}")


@dataclass(frozen=True)
class Accelerator:
    """One accelerator model (per GPU unless a field says per node)."""

    name: str
    vendor: str
    description: str
    flops_dtype: str
    """The dtype peak_flops_per_s is quoted for: bf16, fp16 (no bf16 hardware, e.g. T4) or fp32."""
    peak_flops_per_s: float
    """Peak dense matrix throughput at flops_dtype (datasheet sparsity figures halved)."""
    memory_bytes_per_s: float
    """Peak device-memory bandwidth."""
    memory_bytes: float
    """Device memory."""
    intra_node_link: str
    """What connects GPUs of one node: NVLink, Infinity Fabric, PCIe (with generation)."""
    intra_node_bytes_per_s: float
    """That link's bandwidth per GPU, one direction: what a tensor-parallel all-reduce gets."""
    network_bytes_per_s: float | None
    """Typical network bandwidth of one node (KV transfers between nodes); None if unknown."""
    gpus_per_node: int
    """How many of these a typical rented node holds: the ceiling for tensor parallelism."""
    price: GpuHourPrice | None = None
    sources: tuple[str, ...] = ()
    """Where the spec figures were checked."""
    unverified: frozenset[str] = field(default_factory=frozenset)
    """Names of the FIGURES that could not be checked against a datasheet."""
    notes: str = ""

    def __post_init__(self) -> None:
        if self.flops_dtype not in FLOPS_DTYPES:
            raise ValueError(
                f"{self.name}: flops_dtype must be one of {FLOPS_DTYPES}, got {self.flops_dtype!r}"
            )
        positive = {
            "peak_flops_per_s": self.peak_flops_per_s,
            "memory_bytes_per_s": self.memory_bytes_per_s,
            "memory_bytes": self.memory_bytes,
            "intra_node_bytes_per_s": self.intra_node_bytes_per_s,
        }
        if self.network_bytes_per_s is not None:
            positive["network_bytes_per_s"] = self.network_bytes_per_s
        for key, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{self.name}: {key} must be finite and > 0, got {value!r}")
        if self.gpus_per_node < 1:
            raise ValueError(f"{self.name}: gpus_per_node must be >= 1, got {self.gpus_per_node}")
        unknown = set(self.unverified) - set(FIGURES)
        if unknown:
            raise ValueError(f"{self.name}: unverified names unknown figures {sorted(unknown)}")

    def is_verified(self, figure: str) -> bool:
        if figure not in FIGURES:
            raise KeyError(f"{figure!r} is not one of {FIGURES}")
        return figure not in self.unverified

    @classmethod
    def measured(
        cls,
        name: str,
        *,
        peak_flops_per_s: float,
        memory_bytes_per_s: float,
        memory_bytes: float,
        flops_dtype: str = "fp32",
        description: str = "this machine's CPU, measured",
        price: GpuHourPrice | None = None,
    ) -> Accelerator:
        """An entry for a device whose throughput was measured here (e.g. this machine's CPU).

        Measured figures need no datasheet, so none is unverified. Workers on one host exchange
        KV through memory, so the "intra-node link" is memory itself; a single CPU device is
        one "GPU" per node (no tensor parallelism across it).
        """
        return cls(
            name=name,
            vendor="measured",
            description=description,
            flops_dtype=flops_dtype,
            peak_flops_per_s=peak_flops_per_s,
            memory_bytes_per_s=memory_bytes_per_s,
            memory_bytes=memory_bytes,
            intra_node_link="shared memory",
            intra_node_bytes_per_s=memory_bytes_per_s,
            network_bytes_per_s=None,
            gpus_per_node=1,
            price=price,
            sources=("measured on this machine",),
        )


def load_hardware_catalogue(path: Path | None = None) -> dict[str, Accelerator]:
    """The shipped catalogue, with the entries of the user file at ``path`` merged in by name."""
    return load_catalogue("hardware.json", SECTION, "accelerator", path, _parse_accelerator)


def _parse_accelerator(name: str, fields: EntryFields) -> Accelerator:
    figures: dict[str, float] = {}
    unverified: set[str] = set()
    for key in FIGURES:
        value, verified = fields.figure(key)
        figures[key] = value
        if not verified:
            unverified.add(key)
    if not figures["gpus_per_node"].is_integer():
        raise ValueError(f"{fields.where}: gpus_per_node must be a whole number")
    price_fields = fields.nested("price")
    price = _parse_price(price_fields) if price_fields is not None else None
    vendor, description = fields.text("vendor"), fields.text("description")
    flops_dtype, link = fields.text("flops_dtype"), fields.text("intra_node_link")
    sources, notes = fields.strings("sources"), fields.text("notes", default="")
    try:
        accelerator = Accelerator(
            name=name,
            vendor=vendor,
            description=description,
            flops_dtype=flops_dtype,
            peak_flops_per_s=figures["peak_flops_per_s"],
            memory_bytes_per_s=figures["memory_bytes_per_s"],
            memory_bytes=figures["memory_bytes"],
            intra_node_link=link,
            intra_node_bytes_per_s=figures["intra_node_bytes_per_s"],
            network_bytes_per_s=figures["network_bytes_per_s"],
            gpus_per_node=int(figures["gpus_per_node"]),
            price=price,
            sources=sources,
            unverified=frozenset(unverified),
            notes=notes,
        )
    except ValueError as exc:
        # __post_init__ knows the value, not the file: say where it came from.
        raise ValueError(f"{fields.where}: {exc}") from exc
    fields.finish()
    return accelerator


def _parse_price(fields: EntryFields) -> GpuHourPrice:
    usd, provider, page = fields.number("usd_per_gpu_hour"), fields.text("provider"), fields.text("page")
    date, verified, note = fields.text("date"), fields.flag("verified"), fields.text("note", default="")
    try:
        price = GpuHourPrice(usd, provider, page, date, verified, note)
    except ValueError as exc:
        raise ValueError(f"{fields.where}: {exc}") from exc
    fields.finish()
    return price
