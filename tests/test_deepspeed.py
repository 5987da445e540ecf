"""fastadam.torch.AdamW as the client optimizer of DeepSpeed ZeRO-Offload (stages 1, 2, 3).

Each job is two processes on 127.0.0.1 (gloo, DeepSpeed's CPU accelerator), one job per ZeRO
stage, started here with a timeout and killed as a process group on failure. A job trains a
small MLP (an odd number of elements, so ZeRO pads its partitions) for STEPS steps with
``offload_optimizer: {device: cpu}``, in float32 and in bfloat16 (fp32 masters), each rank
on its own half of the batch, and:

* with fastadam.torch.AdamW and with torch.optim.AdamW as the client optimizer, saving a
  checkpoint after SAVE_AT steps and training on (the uninterrupted runs);
* resumes each checkpoint in a fresh engine (fastadam from fastadam's, fastadam from torch's,
  torch from fastadam's, fastadam from fastadam's consolidated state_dict) and trains to
  STEPS.

Checked here:

* fastadam under ZeRO is bit for bit a single-process fastadam.torch.AdamW fed the same
  averaged gradient ((g0 + g1) / 2 of the two ranks' half-batch gradients, the sum ZeRO's
  reduction computes, exactly, for two ranks) -- in bfloat16 with master_weights=True, which
  is what ZeRO does (fp32 masters, the bf16 parameter their nearest rounding);
* fastadam and torch's AdamW as clients agree within the bound of tests/test_torch_optim.py
  (float32) or the bf16 rounding of the forward pass (bfloat16);
* a fastadam resume is bit-identical to the uninterrupted run; after a resume across
  optimizers the local Adam state is bit for bit the one the other optimizer saved, the
  step count goes on, and the trajectory stays within the bound of the other client's;
* fastadam.deepspeed.consolidate_zero_checkpoint turns each checkpoint's Adam state into an
  ordinary state_dict equal to DeepSpeed's own gathered state (safe_get_full_optimizer_state)
  that loads into a single-process fastadam.torch.AdamW (which then continues bit for bit
  the ZeRO run) and into torch.optim.AdamW; fastadam.deepspeed.load_zero_state puts it back
  into a fresh engine, which continues bit for bit the uninterrupted run.

DeepSpeed's gradient clipping (default 1.0) is off, so that one process can replay the run.
"""

import copy
import importlib.util
import textwrap

import pytest
from ranks import launch

torch = pytest.importorskip("torch", reason="torch is not installed: fastadam.torch is not tested")
# found, not imported: only the ranks and the consolidation test import DeepSpeed (seconds)
if importlib.util.find_spec("deepspeed") is None:
    pytest.skip(
        "DeepSpeed is not installed (pip install --no-deps deepspeed==0.19.8 and its "
        "dependencies, as .ci/run does): the ZeRO tests are skipped",
        allow_module_level=True,
    )
dist = pytest.importorskip("torch.distributed", reason="torch.distributed is unavailable")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is unavailable", allow_module_level=True)

import fastadam.torch as ft  # noqa: E402

STEPS = 6
SAVE_AT = 3
LR = 1e-2
WD = 1e-2
BATCH = 4  # per rank
TIMEOUT = 180  # s per two-process job
KEYS = ("exp_avg", "exp_avg_sq")

COMMON = textwrap.dedent(r'''
    import torch

    STEPS, SAVE_AT, LR, WD, BATCH = {STEPS}, {SAVE_AT}, {LR}, {WD}, {BATCH}

    def make_model(dtype, width=33):
        torch.manual_seed(0)
        # 16*33 + 33 + 33*4 + 4 = 697 elements: odd, so ZeRO pads the partitions; width 520:
        # 10924, partitions of more than 4096 (fastadam's 8-bit state is for those)
        net = torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.Tanh(),
                                  torch.nn.Linear(width, 4))
        return net.to(dtype)

    # other rules and storage formats as client (float32 model): name -> (class, options,
    # model width)
    RULES = {{
        "SGD-nesterov": ("SGD", dict(momentum=0.9, nesterov=True, weight_decay=WD), 33),
        "Adagrad": ("Adagrad", dict(weight_decay=WD), 33),
        "Lion": ("Lion", dict(weight_decay=WD), 33),
        "AdamW-amsgrad": ("AdamW", dict(weight_decay=WD, amsgrad=True), 33),
        "AdamW-bf16-state": ("AdamW", dict(weight_decay=WD, state_dtype="bfloat16"), 33),
        "AdamW-8bit": ("AdamW", dict(weight_decay=WD, state_dtype="8bit"), 520),
    }}

    def batch(step, rank, dtype):
        """Rank `rank`'s half of the batch of step `step` (0-based): the same on a resume."""
        g = torch.Generator().manual_seed(1000 * step + rank)
        return (torch.randn(BATCH, 16, generator=g).to(dtype),
                torch.randn(BATCH, 4, generator=g).to(dtype))

    def loss_of(net, x, y):
        return ((net(x) - y) ** 2).mean()
''').format(STEPS=STEPS, SAVE_AT=SAVE_AT, LR=LR, WD=WD, BATCH=BATCH)

WORKER = COMMON + textwrap.dedent(r'''
    import os, sys, logging
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401 - loaded, then patched through sys.modules
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    import fastadam.torch as ft
    from fastadam.deepspeed import consolidate_zero_checkpoint, load_zero_state

    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (about a minute of
    # g++ the first time) that only inference_all_reduce uses; training's collectives are
    # torch.distributed's (gloo here) either way.
    # (deepspeed.comm.torch as an attribute is torch itself: the module is in sys.modules)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.utils.logger.setLevel(logging.WARNING)
    torch.set_num_threads(1)
    stage, out = int(sys.argv[5]), sys.argv[4]  # argv: rank, world, port, out, stage
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()

    def config(bf16):
        cfg = {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
               "steps_per_print": 10**9,
               # DeepSpeed clips the global gradient norm to 1.0 unless told otherwise;
               # off, so that one process can replay the run exactly
               "gradient_clipping": 0.0,
               "zero_optimization": {"stage": stage, "offload_optimizer": {"device": "cpu"}},
               # ZeRO-Offload refuses a client optimizer that is not DeepSpeedCPUAdam ...
               "zero_force_ds_cpu_optimizer": False,
               # ... and ZeRO one whose type is not on its list
               "zero_allow_untested_optimizer": True}
        if bf16:
            cfg["bf16"] = {"enabled": True}
        return cfg

    def engine(client, dtype, weights=None):
        if client in RULES:
            name, kw, width = RULES[client]
            cls = getattr(ft, name)
        else:
            cls = ft.AdamW if client == "fastadam" else torch.optim.AdamW
            kw, width = dict(weight_decay=WD), 33
        net = make_model(torch.float32, width)
        if weights is not None:
            net.load_state_dict(weights)
        opt = cls(net.parameters(), lr=LR, **kw)
        eng, zero_opt, _, _ = deepspeed.initialize(model=net, optimizer=opt,
                                                    config=config(dtype == torch.bfloat16))
        assert type(zero_opt.optimizer) is cls, type(zero_opt.optimizer)
        if cls is ft.Adagrad:
            # Adagrad made its state for the module's parameters in its constructor (as
            # torch's does), then ZeRO gave it flat partitions: state_dict() (so
            # save_checkpoint) leaves that orphaned state out instead of failing
            inner = zero_opt.optimizer
            live = {id(p) for g in inner.param_groups for p in g["params"]}
            assert any(id(p) not in live for p in inner.state)
            assert all(isinstance(k, int) for k in inner.state_dict()["state"])
        return eng, zero_opt

    def local_state(zero_opt):
        """This rank's Adam state (its flat partitions), in the order of its groups."""
        inner = zero_opt.optimizer
        return [{k: v.clone() for k, v in inner.state[p].items()}
                for p in getattr(zero_opt, "fp32_partitioned_groups_flat",
                                 None) or zero_opt.single_partition_of_fp32_groups]

    def full(eng):
        """Every parameter's fp32 master, Adam state and low-precision value, gathered."""
        ps = list(eng.module.parameters())
        res = {"master": [safe_get_full_fp32_param(p).clone() for p in ps]}
        for k in ("exp_avg", "exp_avg_sq"):
            res[k] = [safe_get_full_optimizer_state(p, k).clone() for p in ps]
        if stage == 3:
            with deepspeed.zero.GatheredParameters(ps):
                res["param"] = [p.detach().clone() for p in ps]
        else:
            res["param"] = [p.detach().clone() for p in ps]
        return res

    def train(eng, start, stop, dtype):
        for step in range(start, stop):
            x, y = batch(step, rank, dtype)
            eng.backward(loss_of(eng, x, y))
            eng.step()

    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[1]
        for client in ("fastadam", "torch"):
            eng, zero_opt = engine(client, dtype)
            train(eng, 0, SAVE_AT, dtype)
            eng.save_checkpoint(f"{out}/ckpt_{name}_{client}", tag="t")
            results[name, client, "saved_local"] = local_state(zero_opt)
            results[name, client, "saved"] = full(eng)
            train(eng, SAVE_AT, STEPS, dtype)
            results[name, client, "final"] = full(eng)
            results[name, client, "steps"] = sorted(
                {float(s["step"]) for s in zero_opt.optimizer.state.values()})
        dist.barrier()
        for client, source in (("fastadam", "fastadam"), ("fastadam", "torch"),
                               ("torch", "fastadam"), ("fastadam", "consolidated")):
            if source == "consolidated":
                # the ordinary state_dict of the fastadam checkpoint, loaded back into ZeRO
                c = consolidate_zero_checkpoint(f"{out}/ckpt_{name}_fastadam", tag="t")
                eng, zero_opt = engine(client, dtype, c["params"])
                load_zero_state(eng, c)
            else:
                eng, zero_opt = engine(client, dtype)
                eng.load_checkpoint(f"{out}/ckpt_{name}_{source}", tag="t")
            results[name, client, source, "loaded_local"] = local_state(zero_opt)
            train(eng, SAVE_AT, STEPS, dtype)
            results[name, client, source, "final"] = full(eng)
            results[name, client, source, "steps"] = sorted(
                {float(s["step"]) for s in zero_opt.optimizer.state.values()})
    # float32: trained, checkpointed, resumed; stage 1 updates the partitions as stage 2
    # does (one flat tensor per group, the same code), stage 3 swaps them into the groups
    for client in (RULES if stage > 1 else ()):
        eng, zero_opt = engine(client, torch.float32)
        train(eng, 0, SAVE_AT, torch.float32)
        eng.save_checkpoint(f"{out}/ckpt_{client}", tag="t")
        train(eng, SAVE_AT, STEPS, torch.float32)
        results[client, "final"] = [safe_get_full_fp32_param(p).clone()
                                    for p in eng.module.parameters()]
        results[client, "state"] = sorted({(k, str(v.dtype)) for st in
                                           zero_opt.optimizer.state.values()
                                           for k, v in st.items()})
        eng, zero_opt = engine(client, torch.float32)
        eng.load_checkpoint(f"{out}/ckpt_{client}", tag="t")
        train(eng, SAVE_AT, STEPS, torch.float32)
        results[client, "resumed"] = [safe_get_full_fp32_param(p).clone()
                                      for p in eng.module.parameters()]
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.barrier()
''')


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda s: f"stage{s}")
def job(request, tmp_path_factory):
    """Run the job of one ZeRO stage; its two ranks' results and its checkpoint folder."""
    out = tmp_path_factory.mktemp(f"zero{request.param}")
    launch(
        out,
        WORKER,
        (request.param,),
        timeout=TIMEOUT,
        env={"DS_ACCELERATOR": "cpu"},
        what=f"DeepSpeed ZeRO-{request.param} job",
    )
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return request.param, out, ranks


def _ns():
    ns = {}
    exec(COMMON, ns)
    return ns


def _single_process(
    dtype, start=0, stop=STEPS, opt_state=None, params=None, cls=ft.AdamW, kw=None, width=33
):
    """One process, the same model and data, the two ranks' gradients averaged as ZeRO's
    reduction does ((g0 + g1) / 2 in the gradients' dtype): the fp32 parameters (masters
    for bf16), the parameters and the optimizer at `stop`. Starts at `start` from the fp32
    values `params` (bf16: their nearest rounding, as ZeRO's copy of its masters) and the
    state_dict `opt_state` when given."""
    ns = _ns()
    net = ns["make_model"](dtype, width)
    ps = list(net.parameters())
    if params is not None:
        with torch.no_grad():
            for p, v in zip(ps, params):
                p.copy_(v)
    # ZeRO keeps fp32 masters of bf16 parameters: fastadam's master weights do the same
    kw = dict(weight_decay=WD) if kw is None else dict(kw)
    if dtype == torch.bfloat16:
        kw["master_weights"] = True
    opt = cls(ps, lr=LR, **kw)
    if opt_state is not None:
        # torch's load_state_dict keeps the given tensors (no copy) and the step updates them
        opt.load_state_dict(copy.deepcopy(opt_state))
    for step in range(start, stop):
        grads = []
        for rank in range(2):
            net.zero_grad()
            ns["loss_of"](net, *ns["batch"](step, rank, dtype)).backward()
            grads.append([p.grad.clone() for p in ps])
        for p, g0, g1 in zip(ps, *grads):
            p.grad = (g0 + g1) / 2
        opt.step()
    fp32 = [opt.state[p]["master_param"] if dtype == torch.bfloat16 else p for p in ps]
    return [t.detach().clone() for t in fp32], [p.detach() for p in ps], opt


def _worst(a, b, t, eps):
    """max over elements of |a - b| / (t eps (|b| + lr)): the bound's ratio."""
    return max(float(((x - y).abs() / (t * eps * (y.abs() + LR))).max()) for x, y in zip(a, b))


def _equal(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


EPS32 = torch.finfo(torch.float32).eps
K_TRAJ = 4.0  # tests/test_torch_optim.py's bound on |dp| / (t eps (|p| + lr)), float32


def test_zero_offload_fastadam_is_single_process_fastadam(job):
    stage, _, ranks = job
    r = ranks[0]
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        master, param, _ = _single_process(dtype)
        got = r[name, "fastadam", "final"]
        assert r[name, "fastadam", "steps"] == [float(STEPS)]
        assert _equal(got["master"], master), (stage, name)
        assert _equal(got["param"], param), (stage, name)
        # the ZeRO partitions cover the model once: each rank holds a part
        held = [
            sum(s["exp_avg"].numel() for s in rk[name, "fastadam", "saved_local"]) for rk in ranks
        ]
        numel = sum(p.numel() for p in master)
        assert all(0 < h < numel for h in held) and sum(held) >= numel, held


def test_zero_offload_fastadam_matches_torch_adamw(job):
    stage, _, ranks = job
    r = ranks[0]
    worst = {}
    for name in ("float32", "bfloat16"):
        fa, to = r[name, "fastadam", "final"], r[name, "torch", "final"]
        assert r[name, "torch", "steps"] == [float(STEPS)]
        worst[name] = _worst(fa["master"], to["master"], STEPS, EPS32)
    print(
        f"ZeRO-{stage} offload, fastadam vs torch AdamW after {STEPS} steps: max |dp| / "
        f"(t eps32 (|p| + lr)) = {worst['float32']:.3g} float32, {worst['bfloat16']:.3g} "
        f"bfloat16 masters"
    )
    assert worst["float32"] <= K_TRAJ
    # bf16: the forward pass sees the masters rounded to bf16; a master an ulp apart may
    # round to the other neighbour, so the runs may drift by bf16's rounding, not float32's
    eps16 = torch.finfo(torch.bfloat16).eps
    assert (
        _worst(
            r["bfloat16", "fastadam", "final"]["master"],
            r["bfloat16", "torch", "final"]["master"],
            STEPS,
            eps16,
        )
        <= K_TRAJ
    )


def test_zero_offload_checkpoint_resume(job):
    stage, _, ranks = job
    for name in ("float32", "bfloat16"):
        for rk in ranks:
            # fastadam from its own checkpoint, and from its consolidated state_dict loaded
            # back into a fresh engine (load_zero_state): the uninterrupted run, bit for bit
            for source in ("fastadam", "consolidated"):
                for k in ("master", "param"):
                    assert _equal(
                        rk[name, "fastadam", source, "final"][k], rk[name, "fastadam", "final"][k]
                    ), (stage, name, source, k)
                assert rk[name, "fastadam", source, "steps"] == [float(STEPS)]
            # the state load_zero_state put in each rank's partitions is what was saved
            for s, loc in zip(
                rk[name, "fastadam", "saved_local"],
                rk[name, "fastadam", "consolidated", "loaded_local"],
            ):
                assert set(s) == set(loc)
                assert all(torch.equal(s[k], loc[k]) for k in s), (stage, name)
            for client, source in (
                ("fastadam", "fastadam"),
                ("fastadam", "torch"),
                ("torch", "fastadam"),
            ):
                saved = rk[name, source, "saved_local"]
                loaded = rk[name, client, source, "loaded_local"]
                assert len(saved) == len(loaded)
                for s, loc in zip(saved, loaded):
                    # this rank's partition of the other optimizer's state, bit for bit
                    assert set(s) == set(loc), (s.keys(), loc.keys())
                    for k in s:
                        assert torch.equal(s[k], loc[k]), (stage, name, client, source, k)
                assert rk[name, client, source, "steps"] == [float(STEPS)]
        r = ranks[0]
        eps = EPS32 if name == "float32" else torch.finfo(torch.bfloat16).eps
        for client, source in (("fastadam", "torch"), ("torch", "fastadam")):
            # the resumed run goes on as the client's own uninterrupted run would
            got = r[name, client, source, "final"]["master"]
            assert _worst(got, r[name, client, "final"]["master"], STEPS, eps) <= K_TRAJ
            assert _worst(got, r[name, source, "final"]["master"], STEPS, eps) <= K_TRAJ


def test_consolidate_zero_checkpoint(job):
    from fastadam.deepspeed import consolidate_zero_checkpoint

    stage, out, ranks = job
    r = ranks[0]
    ns = _ns()
    names = [n for n, _ in ns["make_model"](torch.float32).named_parameters()]
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        for source in ("fastadam", "torch"):
            c = consolidate_zero_checkpoint(out / f"ckpt_{name}_{source}", tag="t")
            sd, saved = c["optimizer"], r[name, source, "saved"]
            assert c["param_names"] == names
            assert [g["params"] for g in sd["param_groups"]] == [list(range(len(names)))]
            assert sd["param_groups"][0]["lr"] == LR
            assert sd["param_groups"][0]["weight_decay"] == WD
            for i, n in enumerate(names):
                st = sd["state"][i]
                assert set(st) == {"step", *KEYS}
                assert float(st["step"]) == SAVE_AT
                for k in KEYS:
                    # DeepSpeed's own gathered state of the live engine, bit for bit
                    assert torch.equal(st[k], saved[k][i]), (stage, name, source, n, k)
                assert torch.equal(c["params"][n], saved["master"][i])
        # loaded back into one process, fastadam carries on the ZeRO run bit for bit (bf16:
        # with fastadam's master weights, given ZeRO's fp32 masters as master_param)
        bf16 = dtype == torch.bfloat16
        c = consolidate_zero_checkpoint(out / f"ckpt_{name}_fastadam", tag="t", master_weights=bf16)
        params = [c["params"][n] for n in names]
        master, param, _ = _single_process(dtype, SAVE_AT, STEPS, c["optimizer"], params)
        assert _equal(master, r[name, "fastadam", "final"]["master"]), (stage, name)
        assert _equal(param, r[name, "fastadam", "final"]["param"]), (stage, name)
        if not bf16:
            # the same state_dict is torch.optim.AdamW's: it loads, and goes on as the ZeRO
            # run with fastadam within the float32 bound
            tmaster, _, topt = _single_process(
                dtype, SAVE_AT, STEPS, c["optimizer"], params, cls=torch.optim.AdamW
            )
            assert _worst(tmaster, r[name, "fastadam", "final"]["master"], STEPS, EPS32) <= K_TRAJ
            assert {float(s["step"]) for s in topt.state.values()} == {float(STEPS)}


def test_zero_offload_other_rules_and_formats(job):
    """The other fastadam rules and storage formats as ZeRO-Offload clients (float32): bit for
    bit a single process where the update is elementwise (every rule; bfloat16 state with
    nearest rounding), and a checkpoint resume bit for bit the uninterrupted run (8-bit
    state too, whose blocks of 256 elements run over ZeRO's flat partition: no
    single-process twin)."""
    stage, _, ranks = job
    if stage == 1:
        pytest.skip("stage 1 steps its optimizer as stage 2 does: the rules run at 2 and 3")
    rules = _ns()["RULES"]
    for client, (name, kw, width) in rules.items():
        for rk in ranks:
            assert _equal(rk[client, "resumed"], rk[client, "final"]), (stage, client)
        state = dict(ranks[0][client, "state"])
        if kw.get("state_dtype") == "8bit":
            assert state["exp_avg"] == "torch.uint8" and "exp_avg_absmax" in state, state
            continue
        if kw.get("state_dtype") == "bfloat16":
            assert state["exp_avg"] == "torch.bfloat16", state
        master, _, _ = _single_process(torch.float32, cls=getattr(ft, name), kw=kw, width=width)
        assert _equal(ranks[0][client, "final"], master), (stage, client)
