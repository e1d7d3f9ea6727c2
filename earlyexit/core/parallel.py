"""Data parallelism over processes with ``accelerate``, and the devices of a sharded (dispatched) model.

A long job (TruthfulQA MC and open-ended generation, the entropy study's answers, probe features, the
early-exit analysis's tokens, the tuned lens's evaluation) runs its items on every process of an
``accelerate launch`` group — each process takes its *shard*, results are gathered in item order, and only
the main process writes the results file (atomically, through
:meth:`~earlyexit.core.results.ResultFile.save`, which writes on the main process only). A training loop (the
tuned lens) splits each step's data instead and adds the gradients (:func:`average_gradients`, weighted by
each process's items) or other sums (:func:`reduce_sum`). Without a launcher everything here is a no-op: one
process, nothing imported from ``accelerate``, the same code path.

Launch (the process group comes from accelerate's launcher; nothing here starts processes)::

    accelerate launch --num_processes 4 -m earlyexit truthfulqa mc --decoding dola --out mc.json   # 4 GPUs
    accelerate launch --multi_gpu --num_processes 2 -m earlyexit truthfulqa mc ...  # 2 CPU processes (gloo)

On a machine without CUDA the group runs on CPU over gloo (:func:`state` passes ``cpu=True``); accelerate
1.15's ``--cpu`` flag starts ONE process unless ``mpirun`` is configured, so several CPU processes are
launched with ``--multi_gpu`` (a ``torchrun`` launch) — the flag only picks accelerate's launcher.

Sharding (:func:`assignment`): the items are cut into *units* of ``unit`` consecutive items (a batch,
a cache chunk), so that every process runs exactly the batches one process would run — identical
numbers, not just close ones. ``"contiguous"`` (the default) gives process k one run of consecutive
units (the first ``n_units % K`` processes one unit more), like accelerate's ``split_between_processes``;
``"strided"`` deals the units round-robin (unit j to process j mod K), which balances better when the
cost drifts along the list (e.g. items sorted by length) at the price of each process's items not
being consecutive.

>>> assignment(7, 2)                        # contiguous, unit 1
[[0, 1, 2, 3], [4, 5, 6]]
>>> assignment(7, 2, mode="strided")
[[0, 2, 4, 6], [1, 3, 5]]
>>> assignment(7, 2, unit=3)               # whole units of 3: [0, 1, 2], [3, 4, 5], [6]
[[0, 1, 2, 3, 4, 5], [6]]
>>> results, info = map_items(lambda part: [x * x for x in part], [1, 2, 3])   # one process here
>>> results, info.num_processes, info.indices
([1, 4, 9], 1, [[0, 1, 2]])
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")
Sharding = Literal["contiguous", "strided"]
SHARDINGS: tuple[str, ...] = ("contiguous", "strided")
_WORLD_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_ENV = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


def _env_int(names: Sequence[str], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


# --- the process group ------------------------------------------------------------------------------

def launched() -> bool:
    """Whether this process is one of several started by a launcher (``accelerate launch``, torchrun,
    mpirun): read from the environment, nothing imported."""
    return _env_int(_WORLD_ENV, 1) > 1


_STATE: Any = None


def state():
    """accelerate's ``PartialState`` of a launched group (initialising the process group once: gloo on CPU,
    NCCL on CUDA), or ``None`` for a single process."""
    global _STATE
    if _STATE is None and launched():
        from accelerate import PartialState

        cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        _STATE = PartialState(cpu=cpu)
    return _STATE


def num_processes() -> int:
    s = state()
    return int(s.num_processes) if s is not None else 1


def process_index() -> int:
    s = state()
    return int(s.process_index) if s is not None else 0


def is_main_process() -> bool:
    """True on the process that writes results files (rank 0), and in a single process. Cheap: without a
    launcher nothing is initialised."""
    if not launched():
        return True
    return process_index() == 0


def device() -> torch.device:
    """This process's device: its own GPU in a launched GPU group (``cuda:<local rank>``), else CUDA when
    present, else CPU."""
    s = state()
    if s is not None:
        return torch.device(s.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def barrier() -> None:
    s = state()
    if s is not None:
        s.wait_for_everyone()


def gather(obj: T) -> list[T]:
    """Every process's ``obj`` (picklable; keep tensors on CPU), in process order, on every process
    (``accelerate.utils.gather_object``: ``all_gather_object`` over gloo / NCCL)."""
    if state() is None:
        return [obj]
    from accelerate.utils import gather_object

    return list(gather_object([obj]))


def broadcast(obj: T) -> T:
    """The main process's ``obj`` on every process (``accelerate.utils.broadcast_object_list``): for a
    decision every process must share, e.g. which cache chunks still need computing."""
    if state() is None:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj if is_main_process() else None])[0]


def reduce_sum(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor (any shape and floating or integer type) over the group, in place, so that every
    process holds the same total (``all_reduce``; over NCCL a CPU tensor travels through this process's GPU).
    For sums of statistics over sharded data: a least-squares fit's Gram matrices, a training step's KL.
    A no-op in a single process."""
    if state() is None:
        return
    import torch.distributed as dist

    comm = device() if dist.get_backend() == "nccl" else None
    for t in tensors:
        if comm is not None and t.device != comm:
            buf = t.to(comm)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            t.copy_(buf)
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def average_gradients(parameters: Iterable[torch.Tensor], weight: float | None = None) -> None:
    """Average the ``.grad`` of ``parameters`` over the group, in place — for a training loop whose processes
    each see a shard of the data (the tuned lens). A no-op in a single process.

    Each process's gradient is taken as its mean over its own ``weight`` items (rows, tokens); afterwards
    every process holds the mean over all of them, ``Σ_k w_k·g_k / Σ_k w_k`` — one process's full-batch
    gradient up to float rounding, also when the shards are unequal. ``weight=None``: equal weights (the
    plain mean over processes). A process with an empty shard passes ``weight=0`` (its gradients may be
    ``None``); a parameter without a gradient on this process counts as zero here, one without a gradient on
    any process keeps ``None``. Every process must call it, with the same parameters in the same order."""
    params = list(parameters)
    if state() is None:
        return
    w = 1.0 if weight is None else float(weight)
    if w < 0 or not w == w:
        raise ValueError(f"weight must be ≥ 0 (the items behind this process's gradient), got {weight}")
    # one small reduction first: the total weight, and which parameters have a gradient anywhere
    flags = torch.tensor([w] + [float(p.grad is not None) for p in params], dtype=torch.float64)
    reduce_sum([flags])
    total = float(flags[0])
    if total <= 0:
        raise ValueError("average_gradients: every process passed weight 0 (no items anywhere)")
    grads = []
    for p, anywhere in zip(params, flags[1:].tolist()):
        if not anywhere:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        elif weight is not None:
            p.grad.mul_(w)
        grads.append(p.grad)
    reduce_sum(grads)
    for g in grads:
        g.div_(total)


# --- sharding -----------------------------------------------------------------------------------------

def assignment(n: int, size: int | None = None, *, mode: Sharding = "contiguous", unit: int = 1) -> list[list[int]]:
    """Item positions ``0..n-1`` of every process (``size`` processes, default the group's), in whole units of
    ``unit`` consecutive items; see the module docstring for the two modes."""
    size = num_processes() if size is None else int(size)
    if size < 1:
        raise ValueError(f"size must be ≥ 1, got {size}")
    if unit < 1:
        raise ValueError(f"unit must be ≥ 1, got {unit}")
    if mode not in SHARDINGS:
        raise ValueError(f"Unknown sharding {mode!r}; use one of {SHARDINGS}.")
    units = [list(range(s, min(n, s + unit))) for s in range(0, n, unit)]
    if mode == "strided":
        mine = [units[k::size] for k in range(size)]
    else:
        per, extra = divmod(len(units), size)
        mine, s = [], 0
        for k in range(size):
            e = s + per + (k < extra)
            mine.append(units[s:e])
            s = e
    return [[i for u in m for i in u] for m in mine]


def shard_indices(n: int, *, mode: Sharding = "contiguous", unit: int = 1) -> list[int]:
    """This process's item positions (see :func:`assignment`)."""
    return assignment(n, mode=mode, unit=unit)[process_index()]


@dataclass
class ParallelInfo:
    """What a results file records about the processes: how many, how the items were sharded, and which
    items each process handled (``indices[k]``: process k's items, as item ids when the caller gives them,
    else positions)."""

    num_processes: int = 1
    sharding: str = "contiguous"
    unit: int = 1
    indices: list[list[Any]] = field(default_factory=lambda: [[]])

    def as_meta(self) -> dict[str, Any]:
        return {"num_processes": self.num_processes, "sharding": self.sharding, "unit": self.unit,
                "indices": [list(x) for x in self.indices]}

    def extend(self, other: "ParallelInfo") -> None:
        """Add another round's items (e.g. one checkpoint of a resumable run) to each process's list."""
        for k, ids in enumerate(other.indices):
            self.indices[k].extend(ids)


def map_items(fn: Callable[[list[T]], Sequence[R]], items: Sequence[T], *, mode: Sharding = "contiguous",
              unit: int = 1, ids: Sequence[Any] | None = None) -> tuple[list[R], ParallelInfo]:
    """``fn(shard)`` on this process's shard of ``items`` (one result per item, in order), gathered: every
    process gets all results in item order and a :class:`ParallelInfo` (``ids``: what to record per item,
    default its position). ``fn`` is not called on an empty shard (more processes than units)."""
    items = list(items)
    plan = assignment(len(items), mode=mode, unit=unit)
    mine = plan[process_index()]
    out = list(fn([items[i] for i in mine])) if mine else []
    if len(out) != len(mine):
        raise RuntimeError(f"fn returned {len(out)} results for {len(mine)} items")
    parts = gather(out)
    results: list[Any] = [None] * len(items)
    for idx, part in zip(plan, parts):
        for i, r in zip(idx, part):
            results[i] = r
    names = list(range(len(items))) if ids is None else list(ids)
    info = ParallelInfo(len(plan), mode, unit, [[names[i] for i in idx] for idx in plan])
    return results, info


def map_cached(n: int, load: Callable[[int], R | None], compute: Callable[[int], R], *,
               ids: Callable[[int], Sequence[Any]], unit: int, desc: str | None = None,
               progress: bool = False) -> tuple[list[R], dict[str, Any] | None]:
    """Units ``0..n-1`` of a cached, resumable job (e.g. chunks of questions): the ones ``load(j)`` finds
    (read on the main process, shared with the others) and the rest ``compute(j)`` (which writes its own
    cache file), sharded over the processes in whole units (:func:`map_items`, contiguous) and gathered.
    Returns every unit's result in order and, with several processes, the ``parallel`` metadata
    (``indices``: ``ids(j)`` of the units each process computed; ``unit``: items per unit).
    ``desc``: a progress bar over this process's units (main process, more than one unit)."""
    from tqdm.auto import tqdm

    main = is_main_process()
    cached = {j: r for j in range(n) if (r := load(j)) is not None} if main else None
    cached = broadcast(cached)
    todo = [j for j in range(n) if j not in cached]

    def run(js: list[int]) -> list[R]:
        return [compute(j) for j in tqdm(js, desc=desc, disable=not progress or not main or len(js) <= 1)]

    computed, info = map_items(run, todo)
    done = dict(zip(todo, computed))
    meta = None
    if info.num_processes > 1:
        meta = {**info.as_meta(), "unit": unit,
                "indices": [[x for j in js for x in ids(todo[j])] for js in info.indices]}
    return [cached[j] if j in cached else done[j] for j in range(n)], meta


# --- the devices of a sharded model -----------------------------------------------------------------

def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes: the execution device of its accelerate hook (a dispatched or offloaded
    module keeps its weights on ``meta`` / CPU / disk between calls), else its first parameter's device,
    else CPU."""
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is None:
        for h in getattr(hook, "hooks", ()):  # a SequentialHook
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                break
    if dev is not None:
        return torch.device(f"cuda:{dev}") if isinstance(dev, int) else torch.device(dev)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def input_device(model) -> torch.device:
    """Where a model's input ids go: its input embeddings' device (the first shard of a dispatched model)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return module_device(emb if emb is not None else model)


def is_dispatched(model) -> bool:
    """Whether accelerate placed the model with a device map (or offloaded it): hooks move data between
    its parts."""
    return bool(getattr(model, "hf_device_map", None)) or any(hasattr(m, "_hf_hook") for m in model.modules())
