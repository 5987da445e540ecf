"""fastadam.torch under FSDP2 (torch.distributed.fsdp.fully_shard): DTensor parameters.

One job of 2 processes on 127.0.0.1 (gloo, CPU) runs every scenario below and writes what
it saw; the tests read it. Each scenario trains a model sharded with fully_shard and, beside
it in the same process, the same model unsharded ("the reference": a single-process
fastadam.torch optimizer of the same class and options) fed the full gradients the sharded
step saw (the reduce-scattered shards gathered). fastadam's update is elementwise and
deterministic, so the sharded parameters and state must equal the reference's BIT FOR BIT
after every step, whatever the shards are: uneven (33 rows over 2 ranks: 17 + 16), empty (a
1-row weight: rank 1 holds 0 elements), several dtypes in one optimizer (float32, float64,
bfloat16 with float32 master weights), MixedPrecisionPolicy (bf16 compute, fp32 shards),
CPUOffloadPolicy, SGD with Nesterov momentum (and ema_decay) and Lion with bfloat16
moments. Also:

* max_grad_norm clips by the norm of the WHOLE model's gradient (the ranks' squared norms
  summed over the mesh), the same on both ranks, equal to the full gradient's norm (of the
  unscaled gradients under a loss scale); a rank's own shards have a clearly smaller norm
  (so clipping by it would fail the test); an inf in one rank's shard makes every rank's
  norm inf and the step the single-process one, bit for bit;
* torch.distributed.checkpoint (DCP): get_state_dict -> dcp.save on 2 ranks; a fresh model
  and optimizer load it (set_state_dict) and continue, on the same 2-rank mesh and on a
  1-rank mesh per process (a reshard); both equal the uninterrupted run bit for bit;
* full_optim_state_dict consolidates the state into an ordinary fastadam.torch state_dict
  (full tensors, integer keys) equal to the reference optimizer's own state_dict; it loads
  into fastadam.torch.AdamW and torch.optim.AdamW on the unsharded model, and back into a
  fresh FSDP2 run (load_full_optim_state_dict) that continues bit for bit;
* a parameter's local storage replaced under the same DTensor object (model.to_empty, then
  load_state_dict: FSDP2 re-points every local shard) and a state tensor's local storage
  replaced are picked up (a stale plan would write the old memory);
* refused, changing nothing: an ordinary (full-tensor) state_dict given to load_state_dict
  directly, a state_dict of other formats, a plain gradient for a DTensor parameter;
* state_dtype="8bit" (with a bfloat16 parameter and float32 master weights among them):
  its blocks are 256 elements of the LOCAL shard, so the reference is, on each rank, a
  plain fastadam.torch optimizer over tensors equal to that rank's shards, fed its shards
  of the reduced gradients: parameters, codes and absmax bit for bit (uneven shards with
  partial last blocks, an empty shard, float32 state below 4096 GLOBAL elements); the
  absmax is a DTensor of L entries per rank (L: the largest shard's block count; unused
  entries 0); DCP resumes it on the same mesh bit for bit; a reshard onto a 1-rank mesh
  is refused (by dcp.load's size check, or, given a template of the checkpoint's lengths,
  by load_state_dict) and so is a full state_dict, changing nothing.
The end-to-end result is also compared with single-process training here (bit for bit) and
with torch.optim.AdamW under FSDP2 (within the few-ulp-per-step bound of
tests/test_torch_optim.py).
"""

import json
import textwrap
import time

import pytest
from ranks import launch

torch = pytest.importorskip("torch", reason="torch is not installed: fastadam.torch is not tested")
dist = pytest.importorskip("torch.distributed", reason="torch.distributed is unavailable")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is unavailable", allow_module_level=True)
try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401  (FSDP2, torch >= 2.6)
    from torch.distributed.tensor import DTensor  # noqa: F401
except ImportError as e:  # pragma: no cover - older torch
    pytest.skip(f"FSDP2 is unavailable: {e}", allow_module_level=True)

STEPS = 4  # per phase; the DCP scenario runs 3 phases
LR = 1e-2
MAX_NORM = 0.02  # below every step's gradient norm: every step is clipped
TIMEOUT = 180

WORKER = textwrap.dedent(r'''
    import copy, json, math, sys
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                         set_model_state_dict, set_state_dict)
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor
    import fastadam.torch as ft

    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    steps, lr, max_norm = int(sys.argv[5]), float(sys.argv[6]), float(sys.argv[7])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(8, 16, generator=g), torch.randn(8, 1, generator=g)
    results = {}

    class MLP(nn.Module):
        # a: 33 rows over 2 ranks (17 + 16: uneven); b: 1 row (rank 1 holds 0 elements)
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 33), nn.Linear(33, 1)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    class Mixed(nn.Module):  # float32, float64 and bfloat16 parameters in one optimizer
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 33), nn.Linear(33, 9).double()
            self.c = nn.Linear(9, 1).bfloat16()

        def forward(self, x):
            h = torch.tanh(self.b(torch.tanh(self.a(x)).double()))
            return self.c(h.bfloat16()).float()

    def make(cls):
        torch.manual_seed(0)
        return cls()

    def shard(m, mesh=None, **kw):
        for child in m.children():  # one FSDP group per dtype
            fully_shard(child, mesh=mesh, **kw)
        fully_shard(m, mesh=mesh, **kw)
        return m

    def full(t):  # a full copy (a plain tensor's step count moves on in place)
        return t.full_tensor().detach() if isinstance(t, DTensor) else t.detach().clone()

    INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}

    def bits(t):  # NaN included
        t = full(t)
        return t.view(INT[t.element_size()]) if t.is_floating_point() else t

    def same(xs, ys):
        xs, ys = list(xs), list(ys)
        return len(xs) == len(ys) and all(
            x.dtype == y.dtype and torch.equal(bits(x), bits(y)) for x, y in zip(xs, ys))

    def same_state(opt, ref, ps, qs):
        for p, q in zip(ps, qs):
            s, r = opt.state[p], ref.state[q]
            if list(s) != list(r) or not same(s.values(), r.values()):
                return False
        return True

    def laid_out(opt, ps):
        """every state tensor with the parameter's shape is a DTensor laid out like it"""
        for p in ps:
            for k, v in opt.state[p].items():
                if v.shape == p.shape and not (isinstance(v, DTensor) and v.placements
                                               == p.placements and v.device_mesh == p.device_mesh
                                               and v._local_tensor.shape == p._local_tensor.shape):
                    return False
        return True

    def step(m, opt):
        opt.zero_grad()
        ((m(X) - Y) ** 2).mean().backward()
        opt.step()

    def train(m, opt, plain, ref, n, record, each=None, scale=None):
        """n steps of the sharded m; the unsharded plain model (optimizer ref) is fed the full
        gradients m's step sees; record: bitwise equality of the parameters after each"""
        for _ in range(n):
            opt.zero_grad()
            ((m(X) - Y) ** 2).mean().backward()
            if each:
                each(m)
            for p, q in zip(m.parameters(), plain.parameters()):
                q.grad = p.grad.full_tensor()
            opt.step(grad_scale=scale)
            ref.step(grad_scale=scale)
            record.append(same(m.parameters(), plain.parameters()))

    def scenario(name, cls, make_opt, n=steps, **kw):
        plain = make(cls)
        m = shard(copy.deepcopy(plain), **kw)
        opt, ref = make_opt(m.parameters()), make_opt(plain.parameters())
        eq = []
        train(m, opt, plain, ref, n, eq)
        ps, qs = list(m.parameters()), list(plain.parameters())
        results[name] = dict(
            equal=eq, state=same_state(opt, ref, ps, qs), laid_out=laid_out(opt, ps),
            local=[list(p._local_tensor.shape) for p in ps],
            dtypes=[str(p.dtype) for p in ps],
            state_dtypes=[str(opt.state[p]["exp_avg"].dtype) for p in ps
                          if "exp_avg" in opt.state[p]],
            steps=sorted({float(s["step"]) for s in opt.state.values() if "step" in s}))
        return m, opt, plain, ref

    def adamw(ps, **kw):
        return ft.AdamW(ps, lr=lr, weight_decay=1e-2, amsgrad=True, **kw)

    # ---- AdamW; end-to-end result for the tests; consolidation into a full state_dict
    m, opt, plain, ref = scenario("adamw", MLP, adamw)
    full_sd = ft.full_optim_state_dict(m, opt)  # rank 0 only
    params = [full(p) for p in m.parameters()]
    if rank == 0:
        torch.save(params, f"{out}/adamw_params.pt")
        torch.save(full_sd, f"{out}/adamw_full.pt")
        torch.save(ref.state_dict(), f"{out}/adamw_ref.pt")
    else:
        results["adamw"]["full_on_rank1"] = full_sd is not None

    # torch.optim.AdamW under FSDP2, for the bound
    m = shard(make(MLP))
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=1e-2, amsgrad=True,
                            foreach=False)
    for _ in range(steps):
        step(m, opt)
    params = [full(p) for p in m.parameters()]
    if rank == 0:
        torch.save(params, f"{out}/torch_adamw_params.pt")

    # ---- engine policies, other rules
    scenario("mp", MLP, adamw, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                              reduce_dtype=torch.float32))
    scenario("offload", MLP, adamw, offload_policy=CPUOffloadPolicy(pin_memory=False))
    m, opt, plain, ref = scenario("sgd", MLP, lambda ps: ft.SGD(
        ps, lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-3, ema_decay=0.9))
    avg = opt.averaged_params()
    results["sgd"]["averaged"] = (all(isinstance(a, DTensor) for a in avg)
                                  and same(avg, ref.averaged_params()))
    scenario("lion", MLP, lambda ps: ft.Lion(ps, lr=1e-3, weight_decay=0.1,
                                             state_dtype="bfloat16"))

    # ---- global clipping (with a loss scale of 2: the norm is of the unscaled gradients)
    norms = []

    def record_norms(m):
        grads = [p.grad for p in m.parameters()]
        local = math.sqrt(sum(float((gr._local_tensor.double() ** 2).sum()) for gr in grads))
        whole = float(torch.cat([gr.full_tensor().double().reshape(-1) for gr in grads]).norm())
        norms.append([local / 2, whole / 2])

    def poison(m):  # an inf in rank 0's shard only
        if rank == 0:
            m.a.weight.grad._local_tensor[3, 5] = math.inf

    plain = make(MLP)
    m = shard(copy.deepcopy(plain))
    opt, ref = adamw(m.parameters(), max_grad_norm=max_norm), adamw(plain.parameters(),
                                                                    max_grad_norm=max_norm)
    eq = []
    for _ in range(steps):
        train(m, opt, plain, ref, 1, eq, each=record_norms, scale=2.0)
        norms[-1] += [opt.last_grad_norm, ref.last_grad_norm]
    state = same_state(opt, ref, m.parameters(), plain.parameters())
    train(m, opt, plain, ref, 1, eq, each=poison)   # the ranks agree: inf, nothing moves
    results["clip"] = dict(equal=eq, norms=norms, state=state,
                           inf=[opt.last_grad_norm, ref.last_grad_norm],
                           nan=int(sum(int(torch.isnan(full(p)).sum()) for p in m.parameters())))

    # ---- mixed dtypes with master weights; DCP save, resume, reshard; full state_dict
    mixed = lambda ps: ft.AdamW(ps, lr=lr, weight_decay=1e-2, master_weights=True)
    plain = make(Mixed)
    m = shard(copy.deepcopy(plain))
    opt, ref = mixed(m.parameters()), mixed(plain.parameters())
    eq = []
    train(m, opt, plain, ref, steps, eq)
    msd, osd = get_state_dict(m, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=f"{out}/ckpt")
    train(m, opt, plain, ref, steps, eq)              # the uninterrupted run at 2 steps
    at2 = [full(p) for p in m.parameters()], [full(v) for s in opt.state.values()
                                             for v in s.values()]
    full_sd = ft.full_optim_state_dict(m, opt, rank0_only=False)
    if rank == 0:
        torch.save(full_sd, f"{out}/mixed_full.pt")
        torch.save(ref.state_dict(), f"{out}/mixed_ref.pt")
    plain_at2 = copy.deepcopy(plain.state_dict())
    train(m, opt, plain, ref, steps, eq)              # ... at 3 steps
    at3 = [full(p) for p in m.parameters()], [full(v) for s in opt.state.values()
                                             for v in s.values()]
    ps = list(m.parameters())
    results["mixed"] = dict(
        equal=eq, state=same_state(opt, ref, ps, plain.parameters()),
        laid_out=laid_out(opt, ps), dtypes=[str(p.dtype) for p in ps],
        master=[str(opt.state[p]["master_param"].dtype) if "master_param" in opt.state[p]
                else None for p in ps],
        master_dtensor=all(isinstance(opt.state[p]["master_param"], DTensor)
                           for p in ps if p.dtype == torch.bfloat16))

    def resume(mesh=None, group=None):
        m2 = shard(make(Mixed), mesh=mesh)
        opt2 = mixed(m2.parameters())
        msd, osd = get_state_dict(m2, opt2)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=f"{out}/ckpt", process_group=group)
        set_state_dict(m2, opt2, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        for _ in range(steps):
            step(m2, opt2)
        return (same(at2[0], [full(p) for p in m2.parameters()]),
                same(at2[1], [full(v) for s in opt2.state.values() for v in s.values()]),
                [list(p._local_tensor.shape) for p in m2.parameters()])

    results["dcp_same_mesh"] = resume()
    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    results["dcp_one_rank_mesh"] = resume(DeviceMesh.from_group(groups[rank], "cpu"),
                                          groups[rank])

    m4 = shard(make(Mixed))
    set_model_state_dict(m4, plain_at2, options=StateDictOptions(full_state_dict=True))
    opt4 = mixed(m4.parameters())
    ft.load_full_optim_state_dict(m4, opt4, full_sd)
    for _ in range(steps):
        step(m4, opt4)
    results["full_load_back"] = (
        same(at3[0], [full(p) for p in m4.parameters()]),
        same(at3[1], [full(v) for s in opt4.state.values() for v in s.values()]))

    # ---- replaced local storage
    plain = make(MLP)
    m = shard(copy.deepcopy(plain))
    opt, ref = adamw(m.parameters()), adamw(plain.parameters())
    eq = []
    train(m, opt, plain, ref, steps, eq)
    ps = list(m.parameters())
    before = [p._local_tensor.data_ptr() for p in ps]
    old = [p._local_tensor for p in ps]
    weights = {k: v.clone() for k, v in m.state_dict().items()}
    opt.zero_grad()
    m.to_empty(device="cpu")   # new local storage under the same DTensor objects
    m.load_state_dict(weights)
    same_objects = all(p is q for p, q in zip(ps, m.parameters()))
    after = [p._local_tensor.data_ptr() for p in ps]
    s = opt.state[ps[0]]["exp_avg"]
    moments_before = s._local_tensor.data_ptr()
    s._local_tensor.set_(s._local_tensor.clone())  # a state tensor's local storage, too
    frozen = [t.clone() for t in old]
    train(m, opt, plain, ref, steps, eq)
    results["replaced"] = dict(
        equal=eq, same_objects=same_objects,
        moved=[a != b for a, b in zip(before, after) if a],
        moments_moved=s._local_tensor.data_ptr() != moments_before,
        old_untouched=all(torch.equal(a, b) for a, b in zip(old, frozen)),
        state=same_state(opt, ref, ps, plain.parameters()))

    # ---- refused calls change nothing
    m = shard(make(MLP))
    opt = adamw(m.parameters())
    step(m, opt)
    snapshot = lambda: [bits(p) for p in m.parameters()] + [
        bits(v) for s in opt.state.values() for v in s.values()]
    before = snapshot()
    dist.barrier()  # rank 0 has written adamw_full.pt
    ordinary = torch.load(f"{out}/adamw_full.pt", weights_only=True)
    refused = []
    for attempt in (
            lambda: opt.load_state_dict(ordinary),  # full tensors: not laid out like p
            lambda: ft.load_full_optim_state_dict(m, opt, dict(ordinary, formats=dict(
                ordinary.get("formats", {}), master_weights=True))),
            lambda: opt.step()):
        if len(refused) == 2:  # a plain gradient for a DTensor parameter
            opt.zero_grad()
            ((m(X) - Y) ** 2).mean().backward()
            m.a.weight.grad = torch.zeros(m.a.weight.shape)
        try:
            attempt()
            refused.append(None)
        except Exception as e:
            refused.append([type(e).__name__, str(e)])
    results["refused"] = dict(errors=refused, unchanged=same(before, snapshot()))

    # ---- 8-bit state: blocks of the LOCAL shards. The reference steps each rank's local
    # shards as plain tensors (one fastadam.torch optimizer per rank, same options) fed that
    # rank's shards of the reduced gradients: codes, absmax and parameters bit for bit
    X8 = torch.randn(8, 208, generator=g)

    class Q8(nn.Module):
        # a.weight: 41 x 208 over 2 ranks: 21 + 20 rows, 4368 + 4160 elements, 18 and 17
        # blocks (the last partial): L = 18, rank 1's 18th absmax entry unused. c: bfloat16
        # (master weights), one 4160-element row per rank. d: 1 x 4096, rank 1 holds 0
        # elements (8-bit by the global size: 16 absmax entries, all unused). The rest have
        # fewer than 4096 elements: float32 state.
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(208, 41), nn.Linear(41, 1)
            self.c = nn.Linear(4160, 2, bias=False).bfloat16()
            self.d = nn.Linear(4096, 1, bias=False)

        def forward(self, x):
            wide = x.repeat(1, 20)
            return (self.b(torch.tanh(self.a(x)))
                    + self.c(wide.bfloat16()).float().sum(-1, keepdim=True) * 0.01
                    + self.d(wide[:, :4096]) * 0.01)

    q8 = lambda ps: ft.AdamW(ps, lr=lr, weight_decay=1e-2, state_dtype="8bit",
                             master_weights=True)
    loc = lambda v: v._local_tensor if isinstance(v, DTensor) else v

    def step8(m, opt):
        opt.zero_grad()
        ((m(X8) - Y) ** 2).mean().backward()
        opt.step()

    def snap(m, opt):  # this rank's shards of the parameters and of every state tensor
        return [p._local_tensor.detach().clone() for p in m.parameters()] + [
            loc(v).clone() for p in m.parameters() for v in opt.state[p].values()]

    def q8_state(opt, ref, ps, qs):
        kinds, ok = [], True
        for p, q in zip(ps, qs):
            s, r = opt.state[p], ref.state[q]
            nb = -(-p._local_tensor.numel() // 256)  # the blocks this rank uses
            if "exp_avg_absmax" in s and "exp_avg_absmax" not in r:
                # the empty shard (float32 state as a 0-element tensor): no codes, absmax 0
                kinds.append("empty")
                ok = ok and p._local_tensor.numel() == 0 and loc(s["exp_avg"]).numel() == 0 \
                    and all(not loc(s[k])[:-1].any() and loc(s[k])[-1] < 0
                            for k in ("exp_avg_absmax", "exp_avg_sq_absmax"))
                continue
            kinds.append("8bit" if "exp_avg_absmax" in s else "float32")
            ok = ok and list(s) == list(r) and all(
                same([loc(v)[:nb]], [r[k]]) and not loc(v)[nb:-1].any() and loc(v)[-1] < 0
                if k.endswith("_absmax") else same([loc(v)], [r[k]]) for k, v in s.items())
        return kinds, ok

    m = shard(make(Q8))
    opt = q8(m.parameters())
    ps = list(m.parameters())
    qs = [p._local_tensor.detach().clone().requires_grad_() for p in ps]
    ref = q8(qs)
    eq = []

    def train8(n):
        for _ in range(n):
            opt.zero_grad()
            ((m(X8) - Y) ** 2).mean().backward()
            for p, q in zip(ps, qs):
                q.grad = p.grad._local_tensor.clone()
            opt.step()
            ref.step()
            eq.append(same([p._local_tensor for p in ps], qs))

    train8(steps)
    msd, osd = get_state_dict(m, opt)
    lengths = {(fqn, k): v.shape[0] for fqn, s in osd["state"].items() for k, v in s.items()
               if k.endswith("_absmax")}
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=f"{out}/ckpt8")
    train8(steps)                                     # the uninterrupted run
    kinds, ok = q8_state(opt, ref, ps, qs)
    absmax = opt.state[ps[0]]["exp_avg_sq_absmax"]
    results["q8"] = dict(
        equal=eq, state=ok, kinds=kinds, laid_out=laid_out(opt, ps),
        local=[list(p._local_tensor.shape) for p in ps],
        codes=[str(opt.state[p]["exp_avg"].dtype) for p in ps],
        master=str(opt.state[ps[4]]["master_param"].dtype),
        absmax=[isinstance(absmax, DTensor) and absmax.device_mesh == ps[0].device_mesh,
                list(absmax.shape), list(absmax._local_tensor.shape),
                [str(pl) for pl in absmax.placements]],
        lengths=sorted(set(lengths.values())))
    at = snap(m, opt)

    # full state_dict: refused on every rank (no collective started), nothing changed
    refused = []
    for attempt in (lambda: ft.full_optim_state_dict(m, opt),
                    lambda: ft.load_full_optim_state_dict(m, opt, dict(
                        opt.state_dict(), state={}))):
        try:
            attempt()
            refused.append(None)
        except Exception as e:
            refused.append([type(e).__name__, str(e)])
    results["q8_full"] = dict(errors=refused, unchanged=same(at, snap(m, opt)))

    # DCP: resumed on the same 2-rank mesh, bit for bit the uninterrupted run
    m2 = shard(make(Q8))
    opt2 = q8(m2.parameters())
    msd, osd = get_state_dict(m2, opt2)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=f"{out}/ckpt8")
    set_state_dict(m2, opt2, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    for _ in range(steps):
        step8(m2, opt2)
    results["q8_dcp_same_mesh"] = same(at, snap(m2, opt2))

    # a reshard whose absmax lengths agree (no length check sees it): the layout stamp,
    # here another layout's, refuses it, changing nothing
    sd2 = opt2.state_dict()
    sd2["state"] = {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
                    for i, st in sd2["state"].items()}
    stamps = [float(loc(sd2["state"][0][k])[-1]) for k in ("exp_avg_absmax", "exp_avg_sq_absmax")]
    loc(sd2["state"][0]["exp_avg_absmax"])[-1] = -12345.0
    before = snap(m2, opt2)
    try:
        opt2.load_state_dict(sd2)
        collision = None
    except Exception as e:
        collision = [type(e).__name__, str(e)]
    results["q8_stamp"] = dict(error=collision, unchanged=same(before, snap(m2, opt2)),
                               stamps=stamps)

    # ... and onto a 1-rank mesh per process: refused. dcp.load itself refuses the absmax
    # of another length; loaded into a template of the checkpoint's lengths (a reshard of
    # the absmax as a flat tensor), set_state_dict reaches load_state_dict, which refuses
    one = DeviceMesh.from_group(groups[rank], "cpu")
    m3 = shard(make(Q8), mesh=one)
    opt3 = q8(m3.parameters())
    msd, osd = get_state_dict(m3, opt3)  # the lr-0 step makes the state
    before = snap(m3, opt3)
    reshard = []
    try:
        dcp.load({"optim": osd}, checkpoint_id=f"{out}/ckpt8", process_group=groups[rank])
        reshard.append(None)
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        reshard.append([type(e).__name__, str(e)])
    from torch.distributed.tensor import Shard
    tmpl = {"state": {fqn: {k: DTensor.from_local(torch.zeros(lengths[fqn, k]), one,
                                                  [Shard(0)])
                            if k.endswith("_absmax") else v.clone() for k, v in s.items()}
                      for fqn, s in osd["state"].items()},
            "param_groups": copy.deepcopy(osd["param_groups"])}
    dcp.load({"optim": tmpl}, checkpoint_id=f"{out}/ckpt8", process_group=groups[rank])
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    try:
        set_optimizer_state_dict(m3, opt3, tmpl)
        reshard.append(None)
    except Exception as e:
        reshard.append([type(e).__name__, str(e)])
    results["q8_reshard"] = dict(errors=reshard, unchanged=same(before, snap(m3, opt3)))

    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
''')


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    start = time.monotonic()
    launch(out, WORKER, (STEPS, LR, MAX_NORM), timeout=TIMEOUT, what="FSDP2 job")
    print(f"FSDP2 job: {time.monotonic() - start:.1f} s")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return out, ranks


def _mlp():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(16, 33), torch.nn.Linear(33, 1)
    return torch.nn.Sequential(a, torch.nn.Tanh(), b)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, generator=g), torch.randn(8, 1, generator=g)


def _bitwise(ranks, name):
    for r, res in enumerate(ranks):
        assert res[name]["equal"] and all(res[name]["equal"]), (name, r, res[name]["equal"])
        assert res[name]["state"], (name, r)


def test_adamw_equals_single_process_bit_for_bit(job):
    out, ranks = job
    _bitwise(ranks, "adamw")
    # the shards really are uneven and, on rank 1, empty
    assert ranks[0]["adamw"]["local"] == [[17, 16], [17], [1, 33], [1]]
    assert ranks[1]["adamw"]["local"] == [[16, 16], [16], [0, 33], [0]]
    assert all(r["adamw"]["laid_out"] for r in ranks)  # state: DTensors like the params
    assert all(r["adamw"]["steps"] == [float(STEPS)] for r in ranks)

    # end to end: the same as training the unsharded model in one process
    import fastadam.torch as ft

    x, y = _data()
    net = _mlp()
    opt = ft.AdamW(net.parameters(), lr=LR, weight_decay=1e-2, amsgrad=True)
    for _ in range(STEPS):
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
    sharded = torch.load(out / "adamw_params.pt", weights_only=True)
    for a, b in zip(sharded, net.parameters()):
        assert torch.equal(a, b.detach())

    # and torch.optim.AdamW under FSDP2 within the few-ulp-per-step bound
    theirs = torch.load(out / "torch_adamw_params.pt", weights_only=True)
    eps = torch.finfo(torch.float32).eps
    worst = max(
        float(((a - b).abs() / (STEPS * eps * (b.abs() + LR))).max())
        for a, b in zip(sharded, theirs)
    )
    assert worst <= 4.0, worst
    moved = max(float((a - b.detach()).abs().max()) for a, b in zip(sharded, _mlp().parameters()))
    assert moved > 1e-3


@pytest.mark.parametrize("name", ["mp", "offload", "sgd", "lion"])
def test_policies_and_rules_equal_single_process(job, name):
    _, ranks = job
    _bitwise(ranks, name)
    assert ranks[1][name]["local"][2] == [0, 33]  # an empty shard among them
    assert all(r[name]["laid_out"] for r in ranks)
    if name == "mp":  # fp32 shards (bf16 only for compute)
        assert set(ranks[0][name]["dtypes"]) == {"torch.float32"}
    if name == "sgd":  # with param_ema: DTensors, and their averages too
        assert all(r[name]["averaged"] for r in ranks)
    if name == "lion":  # bfloat16 moments of float32 parameters
        assert ranks[0][name]["state_dtypes"] == ["torch.bfloat16"] * 4


def test_mixed_dtypes_with_master_weights(job):
    _, ranks = job
    _bitwise(ranks, "mixed")
    res = ranks[0]["mixed"]
    assert res["dtypes"] == ["torch.float32"] * 2 + ["torch.float64"] * 2 + ["torch.bfloat16"] * 2
    assert res["master"] == [None] * 4 + ["torch.float32"] * 2
    assert all(r["mixed"]["laid_out"] and r["mixed"]["master_dtensor"] for r in ranks)
    assert len(res["equal"]) == 3 * STEPS


def test_max_grad_norm_clips_by_the_global_norm(job):
    _, ranks = job
    _bitwise(ranks, "clip")
    n0, n1 = ranks[0]["clip"]["norms"], ranks[1]["clip"]["norms"]
    assert len(n0) == STEPS and len(ranks[0]["clip"]["equal"]) == STEPS + 1
    for (local0, whole, ours0, fused), (local1, _, ours1, _) in zip(n0, n1):
        assert ours0 == ours1  # every rank clips by the same norm
        assert ours0 == pytest.approx(whole, rel=1e-12)
        assert ours0 == pytest.approx(fused, rel=1e-12)  # one process's fused norm
        assert ours0 > MAX_NORM  # the step was clipped
        # the shards' own norms are far from it: clipping by one would fail above
        assert max(local0, local1) < 0.95 * whole
        assert local0**2 + local1**2 == pytest.approx(whole**2, rel=1e-12)
    # an inf in one rank's shard: every rank sees the norm inf and, as one process,
    # multiplies the gradients by 0 (the inf element becomes NaN, nothing else does)
    for r in ranks:
        assert r["clip"]["inf"] == [float("inf")] * 2
        assert r["clip"]["nan"] == 1


def test_dcp_resume_and_reshard_bit_for_bit(job):
    _, ranks = job
    for r in ranks:
        params, state, local = r["dcp_same_mesh"]
        assert params and state
        assert local[0] != [33, 16]  # sharded over 2 ranks
        params, state, local = r["dcp_one_rank_mesh"]
        assert params and state
        assert local[0] == [33, 16]  # resharded: one rank holds all


def test_full_state_dict_consolidates_and_loads_back(job):
    out, ranks = job
    import fastadam.torch as ft

    assert ranks[1]["adamw"]["full_on_rank1"] is False  # rank0_only
    for name in ("adamw", "mixed"):
        full = torch.load(out / f"{name}_full.pt", weights_only=True)
        ref = torch.load(out / f"{name}_ref.pt", weights_only=True)
        assert full.keys() == ref.keys()
        assert full["param_groups"] == ref["param_groups"]
        assert list(full["state"]) == list(ref["state"])
        for k, s in ref["state"].items():
            assert list(full["state"][k]) == list(s)
            for key, t in s.items():
                f = full["state"][k][key]
                assert type(f) is torch.Tensor and f.dtype == t.dtype
                assert torch.equal(f, t), (name, k, key)
    assert full["formats"]["master_weights"] is True  # mixed

    # the ordinary state_dict loads into fastadam and torch.optim on the unsharded model
    full = torch.load(out / "adamw_full.pt", weights_only=True)
    for cls in (ft.AdamW, torch.optim.AdamW):
        net = _mlp()
        opt = cls(net.parameters(), lr=LR, weight_decay=1e-2, amsgrad=True)
        opt.load_state_dict(full)
        assert float(opt.state[net[2].bias]["step"]) == STEPS
        assert torch.equal(opt.state[net[0].weight]["exp_avg"], full["state"][0]["exp_avg"])
    for r in ranks:  # and back into FSDP2, which continues bit for bit
        assert r["full_load_back"] == [True, True]


def test_replaced_local_storage_is_picked_up(job):
    _, ranks = job
    _bitwise(ranks, "replaced")
    for r in ranks:
        res = r["replaced"]
        assert res["same_objects"] and res["moved"] and all(res["moved"])
        assert res["moments_moved"] and res["old_untouched"]
        assert len(res["equal"]) == 2 * STEPS


def test_refused_calls_change_nothing(job):
    _, ranks = job
    for r in ranks:
        res = r["refused"]
        (t0, m0), (t1, m1), (t2, m2) = res["errors"]
        assert t0 == "ValueError" and "laid out like it" in m0 and "load_full_optim" in m0
        assert t1 == "ValueError" and "formats" in m1
        assert t2 == "TypeError" and "must be a DTensor with its placements" in m2
        assert res["unchanged"]


def test_8bit_state_bit_for_bit_per_local_shard(job):
    _, ranks = job
    _bitwise(ranks, "q8")
    for r, res in enumerate(ranks):
        res = res["q8"]
        assert len(res["equal"]) == 2 * STEPS
        # a.weight uneven (21 + 20 rows), c bfloat16 with float32 master, d empty on rank 1
        assert res["local"][0] == [[21, 208], [20, 208]][r]
        assert res["local"][5] == [[1, 4096], [0, 4096]][r]
        assert res["kinds"] == [
            "8bit",
            "float32",
            "float32",
            "float32",
            "8bit",
            ["8bit", "empty"][r],
        ]  # 8-bit by the GLOBAL size
        assert res["codes"][0] == res["codes"][4] == "torch.uint8"
        assert res["master"] == "torch.float32"
        assert res["laid_out"]  # codes: DTensors laid out like their parameter
        # absmax of a.weight: L = 18 blocks per rank (rank 0's 4368 elements), 2 * 18 in all
        # (+ 1: the layout stamp)
        assert res["absmax"] == [True, [38], [19], ["S(0)"]]  # Shard(0)
        # every absmax's global length is 2 x (L + 1): d 16 (rank 0's 4096 elements; rank 1
        # uses none of its 16), c 17 (4160 on each rank), a 18
        assert res["lengths"] == [34, 36, 38]


def test_8bit_dcp_resume_on_the_same_mesh_reshard_refused(job):
    _, ranks = job
    for r in ranks:
        assert r["q8_dcp_same_mesh"] is True
        res = r["q8_reshard"]
        (_t0, m0), (t1, m1) = res["errors"]
        assert "Size mismatch" in m0 and "_absmax" in m0  # DCP's own check (other length)
        assert t1 == "ValueError" and "cannot be resharded" in m1
        assert "param group 0, parameter 0" in m1 and "exp_avg_absmax" in m1
        assert res["unchanged"]
        # same lengths, another layout's stamp: refused by the stamp
        res = r["q8_stamp"]
        kind, message = res["error"]
        assert kind == "ValueError" and "layout stamp -12345.0" in message
        assert "cannot be resharded" in message and "exp_avg_absmax" in message
        assert res["unchanged"]
        # both streams carry this layout's stamp: one negative integer, the same on each rank
        assert res["stamps"][0] == res["stamps"][1] < 0 and res["stamps"][0] == int(
            res["stamps"][0]
        )
    assert ranks[0]["q8_stamp"]["stamps"] == ranks[1]["q8_stamp"]["stamps"]


def test_8bit_has_no_full_state_dict(job):
    _, ranks = job
    for r in ranks:
        res = r["q8_full"]
        for name, (kind, message) in zip(
            ("full_optim_state_dict", "load_full_optim_state_dict"), res["errors"]
        ):
            assert kind == "ValueError" and message.startswith(name)
            assert "param group 0, parameter 0" in message and "cannot be resharded" in message
        assert res["unchanged"]
