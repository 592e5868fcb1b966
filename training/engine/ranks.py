"""The processes of one training run: which one this is, and the few collectives a stage needs, through accelerate.

A plain `python -m training.engine.<stage>` is one process, and every method here is then the identity
(no accelerate object is made, the stage runs exactly as it always did). Under
`accelerate launch --multi_gpu --num_processes N` each process trains on its share of every global
batch, accelerate's DDP wrapper averages the gradients, and rank 0 alone reports progress and writes
checkpoints. With `fsdp` each process holds a shard of every weight and of the optimizer's state instead
(FSDP2, torch's `fully_shard`, one unit per transformer block: accelerate runs its FSDP plugin on GPUs only,
this runs on gloo too), cut from rank 0's weights (the others may build theirs empty: `loads_empty`). A
sharded run's resumable checkpoint is torch Distributed Checkpoint shards, each
process writing its own slice of the weights and the optimizer's state, nothing gathered (as torchtitan);
its final save gathers the full weights to rank 0 alone, in CPU memory, for save_pretrained. The global
batch, the order of the data and the seeds are those of a one-process run, and Distributed Checkpoint
reshards on load, so a checkpoint resumes under any number of processes, sharded or not. DeepSpeed is
refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from accelerate import Accelerator
from accelerate.utils import gather_object
from peft.utils import get_peft_model_state_dict
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from training.engine.checkpoints import SHARDS_DIR, holds_shards, save_checkpoint
from training.engine.common import EngineError, ProgressFn, TrainedModel, is_lora
from training.engine.stop import StopWithoutSaving

_RUN, _STOP, _STOP_WITHOUT_SAVING = 0, 1, 2


class RankStopped(EngineError):
    """Raised on every other process when rank 0's progress callback stopped the run (a cancel)."""


def launched_processes() -> int:
    """How many processes `accelerate launch` (or torchrun) started for this run; 1 otherwise."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class Ranks:
    """This process's place among the run's processes (accelerate's Accelerator when there are several)."""

    def __init__(self, device: torch.device | None = None, fsdp: bool = False):
        self.world = launched_processes()
        self.fsdp = fsdp and self.world > 1  # one process holds everything: nothing to shard
        self.rank = 0
        self.device = device or torch.device("cpu")
        self.accelerator = None
        if self.world > 1:
            self.accelerator = Accelerator(cpu=self.device.type == "cpu")
            kind = self.accelerator.distributed_type.value
            if kind not in ("MULTI_GPU", "MULTI_CPU"):
                raise EngineError(f"pairloop trains on several processes with DDP or its own FSDP2 (--fsdp), not "
                                  f"{kind}: launch with `accelerate launch --multi_gpu --num_processes N`")
            self.rank = self.accelerator.process_index
            self.device = self.accelerator.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def check_divides(self, name: str, value: int) -> None:
        """Refuse a global batch setting that does not split evenly over the processes."""
        if value % self.world:
            raise EngineError(f"{name} {value} does not split over {self.world} processes: use a multiple "
                              f"of {self.world}")

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This process's contiguous share of a global batch (all of it with one process)."""
        if self.world == 1:
            return list(items)
        size = -(-len(items) // self.world)
        return list(items[self.rank * size:(self.rank + 1) * size])

    def prepare(self, *objects):
        """Models and their optimizer wrapped for DDP, or sharded in place under FSDP (the optimizer then steps the
        shards, its state sharded alike); unchanged with one process."""
        if self.accelerator is None:
            return objects if len(objects) > 1 else objects[0]
        if not self.fsdp:
            return self.accelerator.prepare(*objects)
        modules = [o for o in objects if isinstance(o, torch.nn.Module)]
        before = [{id(p): name for name, p in m.named_parameters()} for m in modules]
        for module in modules:
            self._shard_from_rank0(module)
        after = {}
        for names, module in zip(before, modules):
            now = dict(module.named_parameters())
            after.update({key: now[name] for key, name in names.items()})
        for optimizer in (o for o in objects if isinstance(o, torch.optim.Optimizer)):
            _onto_shards(optimizer, after)
        return objects if len(objects) > 1 else objects[0]

    def loads_empty(self, resumed: bool) -> bool:
        """Whether this process builds its model without weights (common.load_causal_lm's `empty`): under FSDP
        every process but rank 0 on a fresh start, so one process, not each, holds a whole copy before sharding
        (accelerate's cpu_ram_efficient_loading); a resumed run's optimizer state is loaded onto the weights
        before they are sharded, so there every process loads them."""
        return self.fsdp and not self.main and not resumed

    def _shard_from_rank0(self, module: torch.nn.Module) -> None:
        """shard_model, each process's shards then cut from rank 0's whole weights, broadcast one tensor at a time;
        a process that built `module` empty (on the meta device) gets its memory for the shards only."""
        whole = module.state_dict() if self.main else {}  # references to rank 0's weights, no copy
        buffers = {name: b.clone() for name, b in module.named_buffers() if not b.is_meta}
        empty = any(p.is_meta for p in module.parameters())
        shard_model(module)
        if empty:  # allocates the local shards (and every buffer, refilled below: they are not all in a state dict)
            module.to_empty(device=self.device)
            for name, value in module.named_buffers():
                if name in buffers:
                    value.copy_(buffers[name])
        set_model_state_dict(module, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        if self.accelerator is None:
            return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        if self.fsdp:  # the norm of sharded gradients is a DTensor: every process takes the whole
            return full(torch.nn.utils.clip_grad_norm_(parameters, max_norm))
        return self.accelerator.clip_grad_norm_(parameters, max_norm)

    @contextmanager
    def unsharded(self, model):
        """Under FSDP, `model`'s whole weights for the block inside: gathered once on entry and kept through every
        forward there, with FSDP2's forward hooks taken off meanwhile (generation's per-token forwards gather
        nothing and run as an unsharded model's), freed on exit; nothing otherwise. Forwards without gradients
        only: a backward inside would not reach the shards."""
        units = [m for m in model.modules() if isinstance(m, FSDPModule)] if self.fsdp else []
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        hooks = [_without_forward_hooks(unit) for unit in units]
        try:
            yield model
        finally:
            for unit, restore in zip(units, hooks):
                restore()
                unit.reshard()
                unit.set_reshard_after_forward(unit is not model, recurse=False)  # fully_shard's defaults

    def trained_model(self, model, tokenizer, merged: bool = True) -> TrainedModel:
        """What the final save writes of a trained model (common.TrainedModel); under FSDP with its full weights, and
        for a LoRA model its merged ones, gathered to rank 0 alone: every process calls this, rank 0 saves it."""
        if not self.fsdp:
            return TrainedModel(model, tokenizer, merged)
        weights = self.model_state(model)
        if not is_lora(model):
            return TrainedModel(model, tokenizer, merged, state_dict=weights)
        # The adapter (and a reward model's score head) of the whole model, not of this process's slice, cut
        # before the merge: peft finds no adapter in a merged model.
        adapter = get_peft_model_state_dict(model, state_dict=weights) if self.main else {}
        folded = self.model_state(model.merge_and_unload()) if merged else None
        return TrainedModel(model, tokenizer, merged, state_dict=adapter, merged_state_dict=folded)

    def saveable(self, module):
        """A module with save_pretrained(path, state_dict=...) (PPO's value head) as the final save writes it; under
        FSDP its full weights gathered to rank 0: every process calls this, rank 0 saves it."""
        if not self.fsdp:
            return module
        weights = self.model_state(module)
        return SimpleNamespace(save_pretrained=lambda path: module.save_pretrained(path, state_dict=weights))

    def model_state(self, model) -> dict[str, torch.Tensor] | None:
        """Under FSDP the full weights of a sharded model, gathered into rank 0's CPU memory (every process must call
        it; the others get an empty dict); None otherwise, where save_pretrained reads the model itself."""
        if not self.fsdp:
            return None
        weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        # Tied weights (embeddings and LM head) stay one tensor, which save_pretrained writes once.
        first = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            first.setdefault(id(param), name)
            if name in weights and first[id(param)] in weights:
                weights[name] = weights[first[id(param)]]
        return weights

    def save_resumable(self, out_dir, *, model, tokenizer, optimizer, trainer_state: dict[str, Any],
                       modules: dict[str, torch.nn.Module] | None = None, **meta) -> None:
        """The resumable checkpoint at `out_dir` (checkpoints.save_checkpoint's `meta`), written by every process
        together. With one process or DDP, rank 0 writes save_pretrained weights and the optimizer's state_dict; under
        FSDP each process writes its own shards of both through Distributed Checkpoint, nothing gathered. `modules`
        (a name for each) are trained beside the model by the same optimizer (PPO's value head)."""
        modules = modules or {}
        if not self.fsdp:
            if self.main:
                save_checkpoint(out_dir, pretrained={"": TrainedModel(model, tokenizer, merged=False), **modules},
                                trainer_state={**trainer_state, "optimizer": _plain(optimizer).state_dict()}, **meta)
            return self.wait()
        shards = _resumable_state(model, modules, optimizer)
        if self.main:
            save_checkpoint(out_dir, pretrained={}, trainer_state=trainer_state,
                            shards=lambda path: self._write_shards(shards, path), **meta)
        else:
            self._write_shards(shards, None)
        self.wait()

    def _write_shards(self, shards: dict[str, Any], path) -> None:
        """dcp.save on every process into rank 0's `path` (its checkpoint's temp dir, sent to the others)."""
        where = [None if path is None else str(path)]
        torch.distributed.broadcast_object_list(where, src=0)
        dcp.save(shards, checkpoint_id=where[0])

    def load_resumable(self, source, *, model, optimizer, modules: dict[str, torch.nn.Module] | None = None) -> None:
        """Set a checkpoint's Distributed Checkpoint shards (checkpoints.holds_shards) into `model`, `modules` and
        `optimizer` after prepare: each process reads the slices its own shards need, whatever the number of
        processes that wrote them (with one process, the whole). Nothing for a checkpoint of save_pretrained weights,
        which the stage loaded before sharding."""
        if not holds_shards(source):
            return
        state = _resumable_state(model, modules or {}, optimizer)
        dcp.load(state, checkpoint_id=str(Path(source) / SHARDS_DIR))
        set_state_dict(_together(model, modules or {}), _plain(optimizer), model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))  # frozen: not in shards

    def local_batches(self, items: Sequence[Any], batch_size: int):
        """This process's share of `items` in batches, each with whether it is real: under FSDP every forward is a
        collective, so a process with fewer batches runs on the first item's batch as filler (real False)."""
        mine = self.shard(items)
        most = min(len(items), -(-len(items) // self.world)) if self.fsdp else len(mine)  # rank 0's share
        for start in range(0, most, batch_size):
            batch = list(mine[start:start + batch_size])
            yield (batch, True) if batch else (list(items[:1]), False)

    def sum(self, value: torch.Tensor | float) -> torch.Tensor:
        """The sum over all processes of a tensor (or number) every process holds."""
        if self.world == 1:
            return torch.as_tensor(value)
        value = torch.as_tensor(value, device=self.device).to(torch.float64)
        return self.accelerator.reduce(value, reduction="sum")

    def mean(self, value: torch.Tensor | float) -> float:
        """The mean over processes of a number each holds (a per-process metric)."""
        return float(self.sum(float(value))) / self.world

    def gather(self, value: torch.Tensor) -> torch.Tensor:
        """Rows of every process concatenated in rank order (the rows of a one-process batch)."""
        if self.world == 1:
            return value

        rows = gather_object([value.detach().cpu()])
        return torch.cat(rows).to(value.device)

    def whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ppo.masked_whiten over the real tokens of every process's rows (the global batch's mean and variance)."""
        n = self.sum(mask.sum())
        mean = self.sum((x * mask).sum()) / n.clamp(min=1)
        var = self.sum((((x - mean) ** 2) * mask).sum()) / (n - 1).clamp(min=1)  # unbiased, as TRL
        whitened = (x - mean) * torch.rsqrt(var + 1e-8)
        return whitened.to(x.dtype) * mask

    def report(self, on_progress: ProgressFn, event: dict[str, Any]) -> None:
        """on_progress(event) on rank 0; when it raises there (a cancel), every process raises at this step."""
        error: BaseException | None = None
        if self.main:
            try:
                on_progress(event)
            except BaseException as exc:  # noqa: BLE001 - re-raised below on every process
                error = exc
        if self.world > 1:
            code = _RUN if error is None else _STOP_WITHOUT_SAVING if isinstance(error, StopWithoutSaving) else _STOP
            code = int(self.accelerator.reduce(torch.tensor(code, device=self.device), reduction="sum"))
            if code and error is None:
                error = (StopWithoutSaving if code >= _STOP_WITHOUT_SAVING else RankStopped)(
                    "rank 0 stopped the run")
        if error is not None:
            raise error

    def wait(self) -> None:
        """Every process reaches this line before any goes on (after rank 0 wrote a checkpoint)."""
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()


def end_processes() -> None:
    """Every process of a launched run waits for the others, then leaves the process group (torch's advice): a rank
    that exits with it open can abort in gloo's threads while another still writes the final save."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def full(value):
    """A DTensor's whole tensor (an all-gather: every process calls it); anything else as it is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def _plain(optimizer):
    """The torch optimizer inside accelerate's wrapper (DDP's), or the one given."""
    return getattr(optimizer, "optimizer", optimizer)


def _together(model, modules: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """The model and the modules trained beside it as one module, whose parameters the optimizer steps."""
    return torch.nn.ModuleDict({"model": model, **modules})


def _resumable_state(model, modules: dict[str, torch.nn.Module], optimizer) -> dict[str, Any]:
    """What a sharded resumable checkpoint holds: the trained weights (a LoRA base's frozen ones come from the run's
    start) and the optimizer's state, keyed by parameter name, each process's own slices (DTensors under FSDP)."""
    weights, moments = get_state_dict(_together(model, modules), _plain(optimizer),
                                      options=StateDictOptions(ignore_frozen_params=True))
    return {"model": weights, "optimizer": moments}


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2 in place: each transformer block (the model's `_no_split_modules`, as accelerate's auto-wrap policy
    picks them) its own unit, gathered for its forward and freed after, and the rest in the root's unit."""
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        blocks |= set(getattr(module, "_no_split_modules", None) or [])
    for module in list(model.modules())[1:]:
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)


def _without_forward_hooks(unit: FSDPModule):
    """Take FSDP2's forward hooks off an unsharded unit (its module then holds plain whole tensors, and a forward
    runs as an unsharded model's would: no per-unit bookkeeping at every generated token); returns what puts
    them back as fully_shard registered them. FSDP2 offers no public switch for this: its state's hook handles."""
    state = unit._get_fsdp_state()
    state._pre_forward_hook_handle.remove()
    state._post_forward_hook_handle.remove()

    def restore() -> None:
        state._pre_forward_hook_handle = unit.register_forward_pre_hook(state._pre_forward, prepend=True,
                                                                        with_kwargs=True)
        state._post_forward_hook_handle = unit.register_forward_hook(state._post_forward, prepend=False)
    return restore


def _onto_shards(optimizer: torch.optim.Optimizer, sharded: dict[int, torch.nn.Parameter]) -> None:
    """Point an optimizer built on a model's parameters at the shards that replaced them (keyed by the old ones'
    ids), its state (a resumed run's full moments) cut alike."""
    state = {}
    for group in optimizer.param_groups:
        params = []
        for old in group["params"]:
            new = sharded[id(old)]
            params.append(new)
            if old in optimizer.state:
                state[new] = {name: distribute_tensor(value.to(new.dtype), new.device_mesh, new.placements)
                              if torch.is_tensor(value) and value.shape == old.shape and value.dim() else value
                              for name, value in optimizer.state[old].items()}
        group["params"] = params
    optimizer.state.clear()
    optimizer.state.update(state)
