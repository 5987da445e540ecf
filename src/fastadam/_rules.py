"""What each update rule declares to the Python layer (plain Python, no torch).

A rule is a name and its number in the C core (csrc/fastadam.h's fa_rule), its
hyperparameters with torch 2.13's defaults and checks, the state streams its options
need (in the order of csrc/rules/<rule>.h), which of them can be negative (the 8-bit
format's signed or unsigned map), how a state stream starts, whether torch keeps
a ``step`` in its state, and its per-parameter scalar (NAdam's ``mu_product``). The
optimizer classes (optim.py, torch.py) and the plan are the same for every rule.

Every check raises TypeError (wrong kind) or ValueError (out of range) naming the
argument. ``torch_check`` raises torch.optim's own exception types and messages for the
checks torch makes (so code written against torch.optim sees the same errors); ``check``
then applies fastadam's stricter ones (finite values, flags that are bools) and returns
the normalised options.
"""

from __future__ import annotations

import math
from typing import Any

from . import _core
from ._options import EPS_MODES, _flag, _real, check_eps_mode

__all__ = ["RULES", "Rule"]

# torch's names for hyperparameters in its messages ("Invalid <x> value: ...")
_TORCH_LABEL = {"lr": "learning rate", "eps": "epsilon"}


def _torch_nonneg(name, value):
    if not 0.0 <= value:
        label = _TORCH_LABEL.get(name)
        raise ValueError(
            f"Invalid {label}: {value}"
            if name == "lr"
            else f"Invalid {label or name} value: {value}"
        )


def _nonneg(name, value):
    """A finite real number >= 0."""
    value = _real(name, value)
    if not (value >= 0.0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


def _betas(value, closed=False):
    try:
        b1, b2 = value
    except (TypeError, ValueError):
        raise TypeError(f"betas must be a pair (beta1, beta2), got {value!r}") from None
    out = []
    for i, b in enumerate((b1, b2)):
        b = _real(f"betas[{i}]", b)
        if not (0.0 <= b <= 1.0 if closed else 0.0 <= b < 1.0):
            raise ValueError(
                f"betas[{i}] (beta{i + 1}) must be in [0, 1{']' if closed else ')'}, got {b}"
            )
        out.append(b)
    return tuple(out)


class Rule:
    """One update rule. Subclasses set the class attributes and may override the hooks."""

    name: str = ""  # fa_rule_name
    title: str = ""  # for docs and errors
    hyper: tuple[str, ...] = ()  # group keys in the C core's hyperparameter order
    defaults: dict[str, Any] = {}  # every group option with torch 2.13's default (lr first)
    state: tuple[str, ...] = ()  # the state streams, in the C core's order
    signed: tuple[bool, ...] = ()  # per state stream: can it be negative? (8-bit: signed map)
    step: bool = True  # torch keeps state['step']
    scalar: tuple[str, float] | None = None  # (key, initial value) of a per-parameter scalar
    nonneg: tuple[str, ...] = ("lr", "eps", "weight_decay")  # torch checks >= 0 (its order)
    flags: tuple[str, ...] = ("maximize",)

    @property
    def index(self):
        return _core.RULE_NAMES.index(self.name)

    # ---------------------------------------------------------------- options
    def torch_check(self, g):
        """torch.optim's checks, in torch's order, with its exception messages (torch
        checks the betas right after eps: Adam, Adamax, NAdam, RAdam)."""
        betas = "betas" in g
        for k in self.nonneg:
            if k in g:
                _torch_nonneg(k, g[k])
            if k == "eps" and betas:
                self._torch_betas(g["betas"])
                betas = False
        if betas:
            self._torch_betas(g["betas"])

    @staticmethod
    def _torch_betas(b):
        try:
            b0, b1 = b
        except (TypeError, ValueError):
            raise TypeError(f"betas must be a pair (beta1, beta2), got {b!r}") from None
        if not 0.0 <= b0 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {b0}")
        if not 0.0 <= b1 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {b1}")

    def check(self, g):
        """The group's options, checked and normalised: a dict of floats and bools."""
        out = {}
        for k in self.defaults:
            v = g[k]
            if k == "betas":
                out[k] = _betas(v)
            elif k in self.flags:
                out[k] = _flag(k, v)
            elif k == "eps_mode":
                out[k] = check_eps_mode(v)
            else:
                out[k] = _nonneg(k, v)
        return out

    def c_hyper(self, o):
        """The C core's hyperparameters (fa_options.hyper) from checked options."""
        vals = []
        for k in self.hyper:
            if k in ("beta1", "beta2"):
                vals.append(o["betas"][k == "beta2"])
            else:
                vals.append(float(o[k]))
        return tuple(vals)

    def needs(self, o):
        """The state streams these (checked) options need."""
        return self.state

    def initial(self, key, o):
        """The value a new state stream starts at."""
        return 0.0


class Adam(Rule):
    name, title = "adam", "Adam"
    hyper = (
        "beta1",
        "beta2",
        "eps",
        "decoupled_weight_decay",
        "amsgrad",
        "bias_correction",
        "eps_mode",
        "eps_root",
    )
    defaults = dict(
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        amsgrad=False,
        maximize=False,
        decoupled_weight_decay=False,
        bias_correction=True,
        eps_mode="paper",
        eps_root=0.0,
    )
    state = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    signed = (True, False, False)
    flags = ("maximize", "amsgrad", "decoupled_weight_decay", "bias_correction")

    def needs(self, o):
        return self.state if o["amsgrad"] else self.state[:2]


class SGD(Rule):
    name, title = "sgd", "SGD"
    hyper = ("momentum", "dampening", "nesterov")
    defaults = dict(
        lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False
    )
    state = ("momentum_buffer",)
    signed = (True,)
    step = False
    nonneg = ("lr", "momentum", "weight_decay")
    flags = ("maximize", "nesterov")

    def torch_check(self, g):
        super().torch_check(g)
        if g["nesterov"] and (g["momentum"] <= 0 or g["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def check(self, g):
        d = _real("dampening", g["dampening"])
        if not math.isfinite(d):
            raise ValueError(f"dampening must be a finite number, got {d}")
        o = super().check(dict(g, dampening=0.0))
        o["dampening"] = d
        if o["nesterov"] and (o["momentum"] <= 0 or d != 0):
            raise ValueError(
                "nesterov=True needs momentum > 0 and dampening == 0, got "
                f"momentum={o['momentum']}, dampening={d}"
            )
        return o

    def needs(self, o):
        return self.state if o["momentum"] != 0.0 else ()


class Adagrad(Rule):
    name, title = "adagrad", "Adagrad"
    hyper = ("lr_decay", "eps")
    defaults = dict(
        lr=1e-2,
        lr_decay=0.0,
        weight_decay=0.0,
        initial_accumulator_value=0.0,
        eps=1e-10,
        maximize=False,
    )
    state = ("sum",)
    signed = (False,)
    nonneg = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")

    def initial(self, key, o):
        return o["initial_accumulator_value"]


class RMSprop(Rule):
    name, title = "rmsprop", "RMSprop"
    hyper = ("alpha", "eps", "momentum", "centered")
    defaults = dict(
        lr=1e-2,
        alpha=0.99,
        eps=1e-8,
        weight_decay=0.0,
        momentum=0.0,
        centered=False,
        maximize=False,
    )
    state = ("square_avg", "momentum_buffer", "grad_avg")
    signed = (False, True, True)
    nonneg = ("lr", "eps", "momentum", "weight_decay", "alpha")
    flags = ("maximize", "centered")

    def needs(self, o):
        return (
            ("square_avg",)
            + (("momentum_buffer",) if o["momentum"] > 0 else ())
            + (("grad_avg",) if o["centered"] else ())
        )


class Adamax(Rule):
    name, title = "adamax", "Adamax"
    hyper = ("beta1", "beta2", "eps")
    defaults = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False)
    state = ("exp_avg", "exp_inf")
    signed = (True, False)


class NAdam(Rule):
    name, title = "nadam", "NAdam"
    hyper = ("beta1", "beta2", "eps", "momentum_decay", "decoupled_weight_decay")
    defaults = dict(
        lr=2e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        momentum_decay=4e-3,
        decoupled_weight_decay=False,
        maximize=False,
    )
    state = ("exp_avg", "exp_avg_sq")
    signed = (True, False)
    scalar = ("mu_product", 1.0)
    nonneg = ("lr", "eps", "weight_decay", "momentum_decay")
    flags = ("maximize", "decoupled_weight_decay")


class RAdam(Rule):
    name, title = "radam", "RAdam"
    hyper = ("beta1", "beta2", "eps", "decoupled_weight_decay")
    defaults = dict(
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        decoupled_weight_decay=False,
        maximize=False,
    )
    state = ("exp_avg", "exp_avg_sq")
    signed = (True, False)
    flags = ("maximize", "decoupled_weight_decay")


class Lion(Rule):
    name, title = "lion", "Lion"
    hyper = ("beta1", "beta2")
    defaults = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False)
    state = ("exp_avg",)
    signed = (True,)
    step = False
    nonneg = ("lr", "weight_decay")

    def torch_check(self, g):  # not in torch: the same checks, Lion's closed beta range
        for k in self.nonneg:
            _torch_nonneg(k, g[k])
        b = g["betas"]
        for i in (0, 1):
            if not 0.0 <= b[i] <= 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b[i]}")

    def check(self, g):
        o = super().check(dict(g, betas=(0.0, 0.0)))
        o["betas"] = _betas(g["betas"], closed=True)
        return o


RULES = {
    r.name: r for r in (Adam(), SGD(), Adagrad(), RMSprop(), Adamax(), NAdam(), RAdam(), Lion())
}
assert set(RULES) == set(_core.RULE_NAMES)
assert all(len(r.signed) == len(r.state) for r in RULES.values())
assert EPS_MODES == {"paper": 0, "hat": 1}
