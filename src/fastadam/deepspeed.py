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

__all__ = ["consolidate_zero_checkpoint"]


def _deepspeed():
    try:
        from deepspeed.checkpoint import constants
        from deepspeed.utils import zero_to_fp32
    except ImportError as e:  # a clear message rather than a bare ModuleNotFoundError
        raise ImportError("fastadam.deepspeed needs DeepSpeed (pip install deepspeed; "
                          "docs/engines.md says how without replacing torch)") from e
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
            v = v[:v.numel() - padding]
            if v.numel() != numel:
                raise ValueError(
                    f"{where}: state[{k!r}] has {v.numel()} elements, its partition {numel}: "
                    f"only elementwise state (Adam's moments, not 8-bit blocks' absmax) can "
                    f"be consolidated")
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
        raise ValueError(f"{folder} holds {len(optims)} optimizer files, written by "
                         f"{world} ranks")
    shapes = models[0].param_shapes  # one {name: shape} per flat group (stage 3: sub-group)

    if stage <= 2:
        if isinstance(optims[0][C.BASE_OPTIMIZER_STATE], list):
            raise NotImplementedError(
                "an elastic ZeRO checkpoint (zero_optimization.elastic_checkpoint) does not "
                "keep the optimizer's param_groups: save with elastic_checkpoint false")
        fp32 = [o[C.SINGLE_PARTITION_OF_FP32_GROUPS] for o in optims]
        inner = [o[C.BASE_OPTIMIZER_STATE] for o in optims]
        flat = []  # flat[r][i]: rank r's state of its partition of group i
        for r, (o, sd) in enumerate(zip(optims, inner)):
            flat.append([_lean(sd["state"].get(g["params"][0], {}), o[C.GROUP_PADDINGS][i],
                               fp32[r][i].numel(), f"rank {r}, group {i}")
                         for i, g in enumerate(sd["param_groups"])])
        groups = [[i] for i in range(len(shapes))]  # param group i <- flat group i
        paddings = optims[0].get(C.PARAM_ALIGNMENT_PADDINGS)

        def merge(flat_groups):
            out = {}
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
                raise ValueError(f"rank {r}: {len(ids)} flat tensors in the optimizer's groups, "
                                 f"{len(fp32[r])} fp32 sub-groups")
            flat.append([_lean(sd["state"].get(i, {}), 0, fp32[r][k].numel(),
                               f"rank {r}, sub-group {k}") for k, i in enumerate(ids)])
        groups, k = [], 0
        for g in inner[0]["param_groups"]:
            groups.append(list(range(k, k + len(g["params"]))))
            k += len(g["params"])

        def merge(flat_groups):
            out = {}
            z._zero3_merge_trainable_params(out, world, flat_groups, models)
            return {n: t.contiguous() for n, t in out.items()}
    else:
        raise ValueError(f"unknown ZeRO stage {stage} in {folder}")

    tensor_keys = [k for k, v in flat[0][0].items() if hasattr(v, "dim") and v.dim() > 0] \
        if flat[0] else []
    # zero_to_fp32 prints its progress (stdout) and draws tqdm bars (stderr)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        params = merge(fp32)
        per_key = {k: merge([[s[k] for s in rank] for rank in flat]) for k in tensor_keys}

    names, state, param_groups = [], {}, []
    for g, flat_ids in zip(inner[0]["param_groups"], groups):
        ids = []
        for k in flat_ids:
            scalars = {key: v for key, v in flat[0][k].items() if key not in per_key}
            for name in shapes[k]:
                i = len(names)
                names.append(name)
                ids.append(i)
                st = {key: v.detach().clone() if torch.is_tensor(v) else v
                      for key, v in scalars.items()}
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
    return {"optimizer": sd, "param_names": names,
            "params": {n: params[n].detach().clone() for n in names}}
