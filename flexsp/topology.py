"""Sequence-parallel topology: every aligned power-of-two process group, built once.

FlexSP re-partitions the devices into SP groups of different sizes at every step. Creating
process groups is a collective over the whole world and must happen in the same order on
every rank, so it cannot be done on the fly per step. Instead we create, once at start-up,
every *aligned* group of every power-of-two degree a plan can use: for N ranks a degree-d
group is ``ranks [k*d, (k+1)*d)`` for block ``k``. Degree 1 needs no communicator (attention is
local) and degree N is the default group itself, so N/2 + N/4 + ... + 2 = N - 2 groups are
created (a 64-rank world: 62, where one per (degree, block) including singletons and a second
world group made 127). A plan then only looks groups up by ``(degree, block)``. Besides, one
gloo group over the world (``host_group``) carries host objects (the step's plan) without
touching the device when the default backend is NCCL.

Aligned blocks of one degree are disjoint, and blocks of different degrees are either nested
or disjoint, so any plan that uses disjoint blocks runs its collectives on disjoint
communicators and cannot deadlock on a shared one.

Usage::

    topo = SPTopology(world_size=8, devices_per_node=4).build()   # collective, all ranks
    g = topo.group(degree=2, block=1)          # ranks {2, 3}
    g = topo.group_of(degree=4, rank=5)        # ranks {4..7}
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from flexsp.errors import UserError, check_power_of_two


def dist_world():
    return dist.group.WORLD


@dataclass
class SPTopology:
    """All aligned power-of-two SP groups of a world of ``world_size`` ranks.

    world_size: number of ranks (a power of two).
    devices_per_node: ranks per node (a power of two); groups of degree <= this stay inside
        one node (see :meth:`is_intra_node`). ``None`` means one node holds everything.
    """

    world_size: int
    devices_per_node: int | None = None
    _groups: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    host_group: object = field(default=None, init=False, repr=False, compare=False)
    """A gloo group over the world for host objects (the default group when it is gloo)."""

    def __post_init__(self) -> None:
        check_power_of_two("world_size", self.world_size)
        if self.devices_per_node is None:
            self.devices_per_node = self.world_size
        check_power_of_two("devices_per_node", self.devices_per_node)
        if self.world_size > self.devices_per_node and self.world_size % self.devices_per_node:
            raise UserError(
                f"world_size={self.world_size} is not a multiple of devices_per_node={self.devices_per_node}"
            )

    # ---- pure layout (no torch.distributed needed) ----
    @property
    def degrees(self) -> list[int]:
        """Every SP degree: 1, 2, 4, ..., world_size."""
        return [1 << i for i in range(self.world_size.bit_length())]

    def num_blocks(self, degree: int) -> int:
        self._check_degree(degree)
        return self.world_size // degree

    def ranks(self, degree: int, block: int) -> list[int]:
        """Global ranks of group ``(degree, block)``: ``[block*degree, (block+1)*degree)``."""
        self._check_degree(degree)
        if not (isinstance(block, int) and 0 <= block < self.world_size // degree):
            raise UserError(
                f"block must be in [0, {self.world_size // degree}) for degree {degree}, got {block!r}"
            )
        return list(range(block * degree, (block + 1) * degree))

    def block_of(self, degree: int, rank: int) -> int:
        self._check_degree(degree)
        if not (isinstance(rank, int) and 0 <= rank < self.world_size):
            raise UserError(f"rank must be in [0, {self.world_size}), got {rank!r}")
        return rank // degree

    def all_blocks(self) -> list[tuple[int, int]]:
        """Every ``(degree, block)`` in creation order (2N-1 entries)."""
        return [(d, b) for d in self.degrees for b in range(self.world_size // d)]

    def is_intra_node(self, degree: int) -> bool:
        self._check_degree(degree)
        return degree <= self.devices_per_node

    def _check_degree(self, degree: int) -> None:
        if degree not in self.degrees:
            raise UserError(f"degree must be one of {self.degrees}, got {degree!r}")

    # ---- process groups ----
    def build(self, backend: str | None = None) -> "SPTopology":
        """Create every group (collective: call on all ranks, same order). Returns self.

        Uses the default process group's backend unless ``backend`` is given.
        """

        if not dist.is_initialized():
            raise RuntimeError(
                "SPTopology.build() needs torch.distributed to be initialised "
                "(see flexsp.distributed.init_distributed)"
            )
        if dist.get_world_size() != self.world_size:
            raise UserError(
                f"SPTopology(world_size={self.world_size}) but the default group "
                f"has {dist.get_world_size()} ranks"
            )
        if self._groups:
            return self
        groups = {}
        for degree, block in self.all_blocks():  # identical order on every rank
            if degree == 1:
                groups[(degree, block)] = None  # local attention: no communicator
            elif degree == self.world_size:
                groups[(degree, block)] = dist.group.WORLD
            else:
                groups[(degree, block)] = dist.new_group(self.ranks(degree, block), backend=backend)
        # gloo (and the dry run's fake backend) already carry host objects without a device
        self.host_group = (
            dist.group.WORLD if dist.get_backend() in ("gloo", "fake") else dist.new_group(backend="gloo")
        )
        self._groups = groups
        return self

    @property
    def num_communicators(self) -> int:
        """Process groups this topology created (not counting the default group)."""
        made = [g for (d, _), g in self._groups.items() if 1 < d < self.world_size]
        return len(made) + (self.host_group is not dist_world())

    @property
    def built(self) -> bool:
        return bool(self._groups)

    def group(self, degree: int, block: int):
        """The ProcessGroup of ``(degree, block)`` (built by :meth:`build`); None for degree 1."""
        self.ranks(degree, block)  # validates
        if not self._groups:
            raise RuntimeError("call SPTopology.build() before looking groups up")
        return self._groups[(degree, block)]

    def group_of(self, degree: int, rank: int):
        """The degree-``degree`` group that contains global ``rank``."""
        return self.group(degree, self.block_of(degree, rank))
