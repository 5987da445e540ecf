"""DeepSpeed ZeRO checkpoints as ordinary optimizer state_dicts.

A ZeRO checkpoint (``engine.save_checkpoint``) keeps the client optimizer's state as each
rank's flat partitions: one flat tensor per param group (stages 1 and 2) or per sub-group
(stage 3), padded for alignment. :func:`consolidate_zero_checkpoint` puts them back together
per parameter, with DeepSpeed's own layout code (``deepspeed.utils.zero_to_fp32``, the code
that recovers the fp32 weights), into the state_dict a single-process
``fastadam.torch.AdamW`` (or ``torch.optim.AdamW``) over the model's parameters would have.

DeepSpeed is imported when a function here is called, never by ``import fastadam``. Tested
with DeepSpeed 0.19.8 (it uses helpers of ``zero_to_fp32`` whose names start with an
underscore); docs/engines.md has the recipe.
"""

import contextlib
import io
import os
from typing import Any

__all__ = ["consolidate_zero_checkpoint", "load_zero_state"]


def _deepspeed():
    try:
        from deepspeed.checkpoint import constants
        from deepspeed.utils import zero_to_fp32
    except ImportError as e:  # a clear message rather than a bare ModuleNotFoundError
        raise ImportError(
            "fastadam.deepspeed needs DeepSpeed (pip install deepspeed; "
            "docs/engines.md says how without replacing torch)"
        ) from e
    return zero_to_fp32, constants


def _checkpoint_folder(checkpoint_dir, tag):
    """The folder of one checkpoint: `tag` under `checkpoint_dir`, or the one its 'latest'
    file names (as engine.load_checkpoint and zero_to_fp32 read it)."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    if tag is None:
        latest = os.path.join(checkpoint_dir, "latest")
        if not os.path.isfile(latest):
            raise FileNotFoundError(f"no 'latest' file in {checkpoint_dir}: pass tag=")
        with open(latest) as f:
            tag = f.read().strip()
    folder = os.path.join(checkpoint_dir, str(tag))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no checkpoint folder {folder}")
    return folder


def _lean(state, padding, numel, where):
    """A flat partition's state without its trailing `padding`: every tensor of more than
    0 dimensions is elementwise with the partition (`numel` elements once unpadded); 0-dim
    tensors and numbers (the step count) are kept as they are."""
    out = {}
    for k, v in state.items():
        if hasattr(v, "dim") and v.dim() > 0:
            v = v.reshape(-1)
            v = v[: v.numel() - padding]
            if v.numel() != numel:
                raise ValueError(
                    f"{where}: state[{k!r}] has {v.numel()} elements, its partition {numel}: "
                    f"only elementwise state (Adam's moments, not 8-bit blocks' absmax) can "
                    f"be consolidated"
                )
        out[k] = v
    return out


def _load(files):
    import torch

    return [torch.load(f, map_location="cpu", weights_only=False) for f in files]


def consolidate_zero_checkpoint(checkpoint_dir, tag=None, *, master_weights=False):
    """The Adam state of a ZeRO checkpoint (stage 1, 2 or 3, any world size, with or without
    offload) as one process's optimizer state_dict over the model's trainable parameters.

    Args:
        checkpoint_dir: the folder given to ``engine.save_checkpoint``.
        tag: the checkpoint's tag (None: the one its ``latest`` file names).
        master_weights: also give each parameter's fp32 master as ``master_param`` and set
            ``formats`` for a ``fastadam.torch`` optimizer with ``master_weights=True`` over
            16-bit parameters (the bf16/fp16 run carries on bit for bit); False: the
            state_dict of an optimizer over fp32 parameters.

    Returns a dict:
        ``optimizer``: ``{"state": {i: {...}}, "param_groups": [...]}`` (plus ``formats``
        where fastadam needs them): parameter ``i`` is ``param_names[i]``; each group holds
        the hyperparameters the client optimizer saved; each parameter's state is the saved
        state of its partition (``step``, ``exp_avg``, ``exp_avg_sq``, ...), full size, in
        the dtype it was kept in. With fastadam's default formats this is exactly the layout
        of ``torch.optim.AdamW``'s state_dict, so it loads into either.
        ``param_names``: the parameters' names in the module's ``state_dict``, in the order
        of the optimizer's groups (build the optimizer over the parameters in this order).
        ``params``: name -> the fp32 master weight (``zero_to_fp32``'s values).
    """
    import torch

    z, C = _deepspeed()
    folder = _checkpoint_folder(checkpoint_dir, tag)
    models = z.parse_model_states(z.get_model_state_files(folder))
    optims = [sd[C.OPTIMIZER_STATE_DICT] for sd in _load(z.get_optim_files(folder))]
    stage = int(optims[0][C.ZERO_STAGE])
    world = optims[0][C.PARTITION_COUNT]
    world = max(world) if isinstance(world, (list, tuple)) else int(world)
    if world != len(optims):
        raise ValueError(f"{folder} holds {len(optims)} optimizer files, written by {world} ranks")
    shapes = models[0].param_shapes  # one {name: shape} per flat group (stage 3: sub-group)

    if stage <= 2:
        if isinstance(optims[0][C.BASE_OPTIMIZER_STATE], list):
            raise NotImplementedError(
                "an elastic ZeRO checkpoint (zero_optimization.elastic_checkpoint) does not "
                "keep the optimizer's param_groups: save with elastic_checkpoint false"
            )
        fp32 = [o[C.SINGLE_PARTITION_OF_FP32_GROUPS] for o in optims]
        inner = [o[C.BASE_OPTIMIZER_STATE] for o in optims]
        flat = []  # flat[r][i]: rank r's state of its partition of group i
        for r, (o, sd) in enumerate(zip(optims, inner)):
            flat.append(
                [
                    _lean(
                        sd["state"].get(g["params"][0], {}),
                        o[C.GROUP_PADDINGS][i],
                        fp32[r][i].numel(),
                        f"rank {r}, group {i}",
                    )
                    for i, g in enumerate(sd["param_groups"])
                ]
            )
        groups = [[i] for i in range(len(shapes))]  # param group i <- flat group i
        paddings = optims[0].get(C.PARAM_ALIGNMENT_PADDINGS)

        def merge(flat_groups):
            out: dict[str, Any] = {}
            z._zero2_merge_trainable_params(out, world, flat_groups, models, paddings)
            return out
    elif stage == 3:
        fp32 = [o[C.FP32_FLAT_GROUPS] for o in optims]
        inner = [o[C.OPTIMIZER_STATE_DICT] for o in optims]
        flat = []  # flat[r][k]: rank r's state of sub-group k
        for r, sd in enumerate(inner):
            # the state_dict numbers the sub-groups' flat tensors group by group, in
            # sub-group order (DeepSpeed's _set_fp32_optimizer_param_groups)
            ids = [i for g in sd["param_groups"] for i in g["params"]]
            if len(ids) != len(fp32[r]):
                raise ValueError(
                    f"rank {r}: {len(ids)} flat tensors in the optimizer's groups, "
                    f"{len(fp32[r])} fp32 sub-groups"
                )
            flat.append(
                [
                    _lean(sd["state"].get(i, {}), 0, fp32[r][k].numel(), f"rank {r}, sub-group {k}")
                    for k, i in enumerate(ids)
                ]
            )
        groups, k = [], 0
        for g in inner[0]["param_groups"]:
            groups.append(list(range(k, k + len(g["params"]))))
            k += len(g["params"])

        def merge(flat_groups):
            out: dict[str, Any] = {}
            z._zero3_merge_trainable_params(out, world, flat_groups, models)
            return {n: t.contiguous() for n, t in out.items()}
    else:
        raise ValueError(f"unknown ZeRO stage {stage} in {folder}")

    tensor_keys = (
        [k for k, v in flat[0][0].items() if hasattr(v, "dim") and v.dim() > 0] if flat[0] else []
    )
    # zero_to_fp32 prints its progress (stdout) and draws tqdm bars (stderr)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        params = merge(fp32)
        per_key = {k: merge([[s[k] for s in rank] for rank in flat]) for k in tensor_keys}

    names: list[Any] = []
    state: dict[Any, Any] = {}
    param_groups: list[Any] = []
    for g, flat_ids in zip(inner[0]["param_groups"], groups):
        ids = []
        for k in flat_ids:
            scalars = {key: v for key, v in flat[0][k].items() if key not in per_key}
            for name in shapes[k]:
                i = len(names)
                names.append(name)
                ids.append(i)
                st = {
                    key: v.detach().clone() if torch.is_tensor(v) else v
                    for key, v in scalars.items()
                }
                for key, merged in per_key.items():
                    st[key] = merged[name].detach().clone()
                if master_weights:
                    st["master_param"] = params[name].detach().clone()
                if st:
                    state[i] = st
        param_groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ids})
    sd = {"state": state, "param_groups": param_groups}
    formats = inner[0].get("formats")
    if master_weights:
        from ._formats import Formats

        formats = dict(formats or Formats().as_dict(), master_weights=True)
    if formats is not None:
        sd["formats"] = formats
    return {
        "optimizer": sd,
        "param_names": names,
        "params": {n: params[n].detach().clone() for n in names},
    }


def load_zero_state(engine, consolidated):
    """Load a consolidated state (the dict :func:`consolidate_zero_checkpoint` returns:
    ``optimizer``, ``param_names`` and ``params``) into a ZeRO engine (stage 1, 2 or 3, any
    world size): every rank calls it, after ``deepspeed.initialize`` and before the next
    step. It sets each parameter's fp32 master and its part of every partition's optimizer
    state, and the param groups' options; the model's 16-bit parameters are not touched
    (load ``params`` into the model before ``deepspeed.initialize``: its nearest rounding is
    what ZeRO's copy of the masters gives). Options and state keys are the saved ones;
    the state the engine's optimizer already has is overwritten in place."""
    import torch
    from deepspeed.utils import (
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
        safe_set_local_fp32_param,
        safe_set_local_optimizer_state,
    )

    zero = engine.optimizer
    inner = zero.optimizer
    sd, names = consolidated["optimizer"], consolidated["param_names"]
    index = {n: i for i, n in enumerate(names)}
    module = dict(engine.module.named_parameters())
    missing = [n for n in names if n not in module]
    if missing:
        raise ValueError(f"parameters {missing} of the state are not the engine's module's")
    stage3 = hasattr(zero, "fp32_partitioned_groups_flat")
    if stage3:
        flats, members = zero.fp32_partitioned_groups_flat, zero.fp16_groups
    else:
        flats, members = zero.single_partition_of_fp32_groups, zero.bit16_groups
    by_id = {id(p): n for n, p in module.items()}

    # every flat partition gets the state keys of its parameters (as its optimizer would
    # make them, zero where no parameter lies: the padding), and their step count
    created = False
    for flat, group in zip(flats, members):
        ps = [by_id[id(p)] for p in group if id(p) in by_id]
        if not ps:
            continue
        saved = sd["state"].get(index[ps[0]], {})
        st = inner.state[flat]
        for k, v in saved.items():
            if k == "master_param":
                continue  # ZeRO's masters are the partitions themselves
            if torch.is_tensor(v) and v.dim() > 0:
                t = st.get(k)
                if not (torch.is_tensor(t) and t.dtype == v.dtype and t.shape == flat.shape):
                    st[k] = torch.zeros(flat.shape, dtype=v.dtype, device=flat.device)
                    created = True
            else:
                st[k] = v.detach().clone() if torch.is_tensor(v) else v
    if created and not stage3:
        # stages 1 and 2 map each parameter's fragment of the state once, after the first
        # step: map the new tensors
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    for g, saved in zip(inner.param_groups, sd["param_groups"]):
        g.update({k: v for k, v in saved.items() if k != "params"})
    for n in names:  # stages 1 and 2 gather: every rank, the same order
        p, saved = module[n], sd["state"].get(index[n], {})
        values = {
            k: v
            for k, v in saved.items()
            if k != "master_param" and torch.is_tensor(v) and v.dim() > 0
        }
        master = consolidated["params"][n].to(torch.float32)
        if stage3:
            # DeepSpeed 0.19.8's set_full_hp_param slices the unpadded value (an error on
            # the last rank of a parameter that does not split evenly): each rank sets its
            # own padded slice
            safe_set_local_fp32_param(p, _local_slice(p, master))
            for k, v in values.items():
                safe_set_local_optimizer_state(p, _local_slice(p, v), k)
        else:
            safe_set_full_fp32_param(p, master)
            for k, v in values.items():
                safe_set_full_optimizer_state(p, v, k)


def _local_slice(p, value):
    """This rank's part of a stage-3 parameter's full value `value`: ZeRO-3 pads each
    parameter to a multiple of its partition group's size and gives rank r the r-th
    slice of p.ds_tensor.numel() elements."""
    import torch
    import torch.distributed as dist

    n = p.ds_tensor.numel()
    group = getattr(p, "ds_process_group", None)
    rank, size = dist.get_rank(group=group), dist.get_world_size(group=group)
    flat = value.reshape(-1)
    if flat.numel() < n * size:
        flat = torch.cat([flat, flat.new_zeros(n * size - flat.numel())])
    return flat[rank * n : (rank + 1) * n]
