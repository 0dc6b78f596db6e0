"""Streamed units: one template structure (a decoder layer, or the head) and the host masters that fill its slot."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .store import HostStore, StoreGroup, StoreParam, _align


@dataclass(eq=False)
class Binding:
    """One template parameter and the master it is filled from."""

    name: str
    group: StoreGroup
    entry: StoreParam
    offset: int


@dataclass(eq=False)
class ExpertSet:
    """The stacked expert parameters of one expert module of a unit: streamed expert by expert (see ``upload_experts``)."""

    path: str
    num_experts: int
    bindings: list[Binding]
    index_arg: str


@dataclass(eq=False)
class Unit:
    """A streamed unit: one template structure and the masters that fill it."""

    uid: int
    structure: tuple
    source: nn.Module
    bindings: list[Binding]
    numel: int
    groups: list[StoreGroup] = field(default_factory=list)
    experts: list[ExpertSet] = field(default_factory=list)
    """Expert modules whose parameters are not part of the prefetched upload: the experts that tokens are routed to
    are uploaded on demand, just before the experts module runs (expert-sparse streaming)."""

    @property
    def dense_bindings(self) -> list[Binding]:
        """Bindings the prefetched upload covers (all but the expert parameters)."""
        sparse = {id(b) for e in self.experts for b in e.bindings}
        return [b for b in self.bindings if id(b) not in sparse]

    @property
    def version(self) -> tuple[int, ...]:
        return tuple(g.version for g in self.groups)

    @property
    def whole_group(self) -> StoreGroup | None:
        """The group when the unit is exactly one group with the same layout (packing is one cast-copy)."""
        if len(self.groups) == 1 and len(self.bindings) == len(self.groups[0].params):
            if all(b.offset == b.entry.offset for b in self.bindings):
                return self.groups[0]
        return None


def make_unit(uid: int, structure: tuple, source: nn.Module, store: HostStore) -> Unit:
    bindings, offset, groups = [], 0, []
    for pname, p in source.named_parameters(remove_duplicate=False):
        group, entry = store.entry(p)
        bindings.append(Binding(pname, group, entry, offset))
        offset += _align(entry.numel)
        if group not in groups:
            groups.append(group)
    return Unit(uid, structure, source, bindings, offset, groups)


def expert_sets(unit: Unit, modules) -> list[ExpertSet]:
    """The unit's routed-expert modules (``modules``: :func:`~.adapter.find_experts` of its layer) whose stacked
    parameters can be streamed expert by expert; a tied or reshaped parameter keeps its module dense."""
    by_name = {b.name: b for b in unit.bindings}
    sets = []
    for em in modules:
        bindings = [by_name.get(f"{em.path}.{n}") for n in em.params]
        if any(b is None or b.entry.numel % em.num_experts or b.entry.shape[0] != em.num_experts for b in bindings):
            continue
        sets.append(ExpertSet(em.path, em.num_experts, bindings, em.index_arg))
    return sets


def expert_runs(experts: list[int]) -> list[tuple[int, int]]:
    """Sorted expert ids as ``[start, end)`` runs of consecutive ids."""
    runs: list[list[int]] = []
    for e in sorted(experts):
        if runs and runs[-1][1] == e:
            runs[-1][1] = e + 1
        else:
            runs.append([e, e + 1])
    return [(a, z) for a, z in runs]
