"""The update rules ``--optimizer`` measures: for each, fastadam's class and
torch.optim's, the options both get, its memory streams and its NumPy reference
(RULE_SPECS).
"""

from __future__ import annotations

import numpy as np

from .workloads import BETAS, EPS, LR

# ----------------------------------------------------------------------------- rules


class RuleSpec:
    """How one rule is benchmarked: fastadam's class and torch.optim's (same name, same
    options), the options both get (torch 2.13's defaults, except where a default would
    leave the rule without state: SGD runs with momentum=0.9), its memory streams
    (param, grad and the state streams the options need) and its NumPy reference."""

    def __init__(
        self, name, cls, options, streams, *, fused=False, note="", prime_steps=0, torch_cls=None
    ):
        self.name, self.cls, self.options, self.streams = name, cls, dict(options), streams
        self.fused = fused  # torch 2.13 has fused=True for it on the CPU
        self.note = note
        self.prime_steps = prime_steps  # untimed steps before the warm-up (RAdam: rho_t > 5)
        self.torch_cls = cls if torch_cls is None else torch_cls  # "" = not in torch.optim
        self.reference = f"{name}_step"

    @property
    def title(self):
        return self.cls

    def bytes_per_elem(self, dtype):
        """Each stream read once, each but grad written once."""
        return (2 * self.streams - 1) * np.dtype(dtype).itemsize

    def options_text(self):
        return ", ".join(
            f"{k}={tuple(v) if isinstance(v, list) else v}" for k, v in self.options.items()
        )

    def as_json(self):
        return {
            "class": self.cls,
            "options": self.options,
            "streams": self.streams,
            "bytes_per_elem_float32": self.bytes_per_elem("float32"),
            "torch_class": self.torch_cls or None,
            "torch_fused": self.fused,
            "reference": f"fastadam.reference.{self.reference}",
            "note": self.note,
        }


_B = BETAS
RULE_SPECS = {
    s.name: s
    for s in (
        RuleSpec("adam", "Adam", dict(lr=LR, betas=BETAS, eps=EPS), 4, fused=True),
        RuleSpec(
            "sgd",
            "SGD",
            dict(lr=1e-3, momentum=0.9),
            3,
            fused=True,
            note="momentum=0.9 (torch's default 0 keeps no state)",
        ),
        RuleSpec("adagrad", "Adagrad", dict(lr=1e-2, eps=1e-10), 3, fused=True),
        RuleSpec("rmsprop", "RMSprop", dict(lr=1e-2, alpha=0.99, eps=1e-8), 3),
        RuleSpec("adamax", "Adamax", dict(lr=2e-3, betas=_B, eps=1e-8), 4),
        RuleSpec("nadam", "NAdam", dict(lr=2e-3, betas=_B, eps=1e-8, momentum_decay=4e-3), 4),
        RuleSpec(
            "radam",
            "RAdam",
            dict(lr=1e-3, betas=_B, eps=1e-8),
            4,
            prime_steps=6,
            note="6 untimed steps first: from step 6 on (rho_t > 5) the rectified Adam "
            "update runs, the steady state",
        ),
        RuleSpec(
            "lion",
            "Lion",
            dict(lr=1e-4, betas=(0.9, 0.99)),
            3,
            torch_cls="",
            note="not in torch.optim: the torch rows are written here (for-loop in the "
            "style of lucidrains' lion-pytorch, and a foreach version)",
        ),
    )
}
RULE_ORDER = list(RULE_SPECS)
ADAM = RULE_SPECS["adam"]
# the workloads of the targets, for rules other than Adam when --sizes / --models are not given
RULE_SIZES, RULE_MODELS = [10**6, 10**8], ["many_small"]
