"""Section ``bench`` of ``flexsp-bench`` (``configs/bench/default.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from flexsp.errors import UserError

METHODS = ("flexsp", "static", "best-homogeneous", "deepspeed-ulysses")
WORLDS = ("main", "deepspeed")


@dataclass
class BenchConfig:
    methods: list[str] = field(default_factory=lambda: ["flexsp", "static", "best-homogeneous"])
    """Methods to train every batch with: flexsp | static (every static degree that holds the
    batch's longest document) | best-homogeneous | deepspeed-ulysses (needs DeepSpeed and >= 2 ranks;
    runs in a world of its own, see ``world``)."""
    batches: int = 2
    """Global batches: the first this many the configured sampler deals (data=..., train.global_batch,
    data.sampler.global_batch_tokens)."""
    warmup: int = 1
    """Untimed steps of every (batch, method) before its timed ones."""
    repeats: int = 3
    """Timed steps of every (batch, method); the median is reported, min/max and IQR as spread."""
    capacity_tokens: int = 0
    """Emulated memory budget C, tokens per rank, replacing the cost model's (0: keep it). A CPU's RAM
    would let any degree hold everything; an emulated C makes long documents need SP as on a GPU."""
    out: str = ""
    """Output stem: writes STEM.json, STEM.md and STEM.png ('' = <output_dir>/bench)."""
    note: str = ""
    """A paragraph written under the markdown header (e.g. the machine's load, why this setting)."""
    world: str = "main"
    """main: every method but deepspeed-ulysses | deepspeed: deepspeed-ulysses alone, its rows merged
    into STEM.json of the main world (flexsp-bench runs this second world itself; under plain
    torchrun run the same command again with bench.world=deepspeed)."""
    matmul_size: int = 8192
    """CUDA: n of the n x n bf16 matmuls timed for the peak FLOP/s the utilisation is measured against."""

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            self.methods = [self.methods]
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise UserError(
                f"bench.methods={list(self.methods)}: {bad or 'empty'}; valid methods: {list(METHODS)}"
            )
        self.methods = list(dict.fromkeys(self.methods))
        for name, low in (
            ("batches", 1),
            ("warmup", 0),
            ("repeats", 1),
            ("capacity_tokens", 0),
            ("matmul_size", 1),
        ):
            if getattr(self, name) < low:
                raise UserError(f"bench.{name}={getattr(self, name)} must be >= {low}")
        if self.world not in WORLDS:
            raise UserError(f"bench.world={self.world!r}; valid options: {list(WORLDS)}")
        if self.world == "deepspeed" and "deepspeed-ulysses" not in self.methods:
            raise UserError(
                "bench.world=deepspeed runs the deepspeed-ulysses method alone, but "
                f"bench.methods={self.methods} does not list it"
            )

    def world_methods(self) -> list[str]:
        """The methods this world trains."""
        if self.world == "deepspeed":
            return ["deepspeed-ulysses"]
        return [m for m in self.methods if m != "deepspeed-ulysses"]
