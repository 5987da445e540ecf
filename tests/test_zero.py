"""fastadam.torch.Adam as the optimizer_class of torch.distributed.optim.ZeroRedundancyOptimizer.

Two processes on 127.0.0.1 (gloo) train a small MLP with DistributedDataParallel and
ZeroRedundancyOptimizer(optimizer_class=fastadam.torch.Adam): each rank keeps the Adam
state of (and updates) only its shard of the parameters, then broadcasts it. The final
parameters are compared with a single-process fastadam.torch.Adam run on the same data:

* "same batch": both ranks see the full batch. DDP divides each gradient by the world size
  and sums: g/2 + g/2 == g exactly, so the sharded run must equal the single-process run
  bit for bit (torch.equal), with parameters_as_bucket_view False and True (True moves every
  parameter's .data into a flat bucket after the optimizer is built: fastadam must follow).
* "split batch": each rank sees half of the batch. The all-reduced mean of the two
  half-batch gradients is the full-batch gradient up to summation order (about an ulp), and
  that difference is fed back through the model, so the bound is the one of
  tests/test_torch_optim.py: |dp| <= 4 * t * eps * (|p| + lr) after t steps.

Each rank also reports how many parameter elements its local optimizer holds state for:
together they cover the model once (the point of ZeRO).
"""

import json
import textwrap

import pytest
from ranks import launch

torch = pytest.importorskip("torch", reason="torch is not installed: fastadam.torch is not tested")
dist = pytest.importorskip("torch.distributed", reason="torch.distributed is unavailable")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is unavailable", allow_module_level=True)

STEPS = 60
LR = 1e-3
K_TRAJ = 4.0

WORKER = textwrap.dedent(r"""
    import json, sys
    import torch
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP
    import fastadam.torch

    rank, world, port, out, steps, lr = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
                                         sys.argv[4], int(sys.argv[5]), float(sys.argv[6]))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                   torch.nn.Linear(32, 32), torch.nn.GELU(),
                                   torch.nn.Linear(32, 4))

    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)

    def train(split, bucket_view):
        net = DDP(model())
        opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=fastadam.torch.Adam,
                                      parameters_as_bucket_view=bucket_view, lr=lr,
                                      weight_decay=1e-2, amsgrad=True, num_threads=1)
        x, y = (X[rank::world], Y[rank::world]) if split else (X, Y)
        for _ in range(steps):
            opt.zero_grad()
            ((net(x) - y) ** 2).mean().backward()
            opt.step()
        local = opt.optim
        held = sum(s["exp_avg"].numel() for s in local.state.values() if s)
        steps_seen = sorted({float(s["step"]) for s in local.state.values() if s})
        assert type(local).__name__ == "Adam" and type(local).__module__ == "fastadam.torch"
        opt.consolidate_state_dict(to=0)
        if rank == 0:
            sd = opt.state_dict()
            full = sum(s["exp_avg"].numel() for s in sd["state"].values())
        else:
            full = None
        return net.module, held, steps_seen, full

    results = {}
    for name, split, bucket_view in (("same", False, False), ("same_bucket_view", False, True),
                                     ("split", True, False)):
        net, held, steps_seen, full = train(split, bucket_view)
        if rank == 0:
            torch.save([p.detach() for p in net.parameters()], f"{out}/{name}.pt")
        results[name] = dict(held=held, steps=steps_seen, full=full)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
""")


def _single_process(x, y):
    import fastadam.torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(16, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 32),
        torch.nn.GELU(),
        torch.nn.Linear(32, 4),
    )
    opt = fastadam.torch.Adam(net.parameters(), lr=LR, weight_decay=1e-2, amsgrad=True)
    for _ in range(STEPS):
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
    return [p.detach() for p in net.parameters()]


def _launch(tmp_path, world=2):
    launch(tmp_path, WORKER, (STEPS, LR), world, timeout=120, what="ZeroRedundancyOptimizer job")


def test_zero_redundancy_optimizer_with_fastadam(tmp_path):
    _launch(tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)
    single = _single_process(x, y)
    numel = sum(p.numel() for p in single)

    for name in ("same", "same_bucket_view", "split"):
        held = [r[name]["held"] for r in ranks]
        assert sum(held) == numel and all(0 < h < numel for h in held), (name, held)
        assert all(r[name]["steps"] == [float(STEPS)] for r in ranks)
        assert ranks[0][name]["full"] == numel  # consolidated state covers the model

    for name in ("same", "same_bucket_view"):
        sharded = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        for a, b in zip(sharded, single):
            assert torch.equal(a, b), name

    sharded = torch.load(tmp_path / "split.pt", weights_only=True)
    eps = torch.finfo(torch.float32).eps
    worst = max(
        float(((a - b).abs() / (STEPS * eps * (b.abs() + LR))).max())
        for a, b in zip(sharded, single)
    )
    print(
        f"ZeRO, 2 ranks: state elements per rank {[r['split']['held'] for r in ranks]} of "
        f"{numel}; same batch: bitwise equal to one process; split batch: "
        f"max |dp| / (t eps (|p| + lr)) = {worst:.3g} (bound {K_TRAJ})"
    )
    assert worst <= K_TRAJ
    moved = max(float((a - b).abs().max()) for a, b in zip(sharded, _initial()))
    assert moved > 1e-2


def _initial():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(16, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 32),
        torch.nn.GELU(),
        torch.nn.Linear(32, 4),
    )
    return [p.detach() for p in net.parameters()]
