"""``python -m fastadam bench``: time one optimizer step on this machine against its peers.

By default the rule is Adam (``--optimizer adam``); ``--optimizer sgd,adagrad,...`` or
``all`` measures the other rules of the family the same way (see RULE_SPECS for the options
each one runs with, and "Other rules" below).

What is measured, for every cell (dtype x thread count x workload):

* fastadam (``fastadam.Adam.step``, the Python call included; with ``--simd all`` one row
  per SIMD path usable here),
* the NumPy reference (``fastadam.reference.adam_step``, the specification),
* a best-effort in-place NumPy Adam (preallocated scratch, ``out=`` ufuncs, 12 passes),
* ``torch.optim.Adam`` for-loop, foreach and fused, when torch can be imported,
* the roofline: ``fastadam._core.traffic_f32``, the Adam memory-access pattern (read param,
  grad, m, v; write param, m, v) with no arithmetic, threaded like the step, over one flat
  buffer of the same size. Its time is the bound a memory-bound step cannot beat;
  "% roof" is roofline time / implementation time.

The implementations of one cell run interleaved: each is warmed up and calibrated (steps per
batch so that a batch lasts ``--batch-time``), then they are timed round-robin, one batch each
per round, the order rotating every round, so that all of them see the same state of the
machine (the memory bandwidth of a shared machine drifts over minutes). A cache-resident
step gets one untimed step before each batch, to re-warm the cache after the others ran.
The value reported is the median over batches of (batch time / steps), with the
interquartile range as the spread. Bandwidth counts 28 bytes per float32 element (56 per
float64 element) and step, whatever an implementation really moves.

Parameters and gradients are allocated by NumPy, as a user passes them (``--aligned``: 64-byte
aligned); torch allocates its own parameters; the roofline's buffers are 64-byte aligned.

Memory: the implementations of a cell are packed into groups whose buffers fit in
``--max-memory``; only one group is allocated at a time, and the roofline is re-measured in
every group (its % is relative to the roofline measured beside it).

Other rules (``--optimizer``): for each of SGD, Adagrad, RMSprop, Adamax, NAdam, RAdam and
Lion the cell holds fastadam's NumPy class (``fastadam.SGD`` ...), ``torch.optim``'s class
for-loop (``foreach=False``), foreach (``foreach=True``) and fused (``fused=True``, where
torch has a CPU kernel for the rule: SGD, Adagrad, Adam), the NumPy reference
(``fastadam.reference.<rule>_step``), and the rule's own roofline: ``traffic_f32`` over as
many streams as the rule touches (param, grad and its state streams), so that a rule with
one state stream is compared with 20 bytes per float32 element, not Adam's 28. Lion is not
in torch.optim: its torch rows are written here (a for-loop in the style of lucidrains'
lion-pytorch, and a foreach version), see _torch_lion_class. Without ``--sizes`` /
``--models`` those rules run the workloads of their targets only (1e6, 1e8 and 1000 x
1000; ``--quick``: Adam's quick set). The Adam rows are what they were without the flag.
"""

# The package: workloads.py (what is stepped), rules.py (the rules of --optimizer), impls.py
# (the implementations compared and the roofline), measure.py (the interleaved timing and the
# loop over cells), machine.py (machine and versions), report.py (table, JSON, plot), cli.py
# (arguments and main), formats.py (--formats). Every name below was fastadam.bench.<name>
# when the benchmark was one module, and stays importable from here.
from . import cli, impls, machine, measure, report, rules, workloads  # noqa: F401
from .cli import (  # noqa: F401
    Settings,
    _parse_list,
    _size,
    build_parser,
    main,
    resolve,
)
from .impls import (  # noqa: F401
    IMPL_ORDER,
    PEERS,
    SLOW_IMPLS,
    TORCH_IMPLS,
    FastAdam,
    NumpyInplace,
    Reference,
    Roofline,
    TorchForeach,
    TorchForloop,
    TorchFused,
    _Impl,
    _import_torch,
    _step_scalars,
    _Torch,
    _torch_lion_class,
)
from .machine import (  # noqa: F401
    _mem_available,
    _read,
    machine_info,
    versions,
)
from .measure import (  # noqa: F401
    CpuMonitor,
    Progress,
    _base,
    _label_of,
    _paired,
    _plan_groups,
    _quartiles,
    _record,
    _timing_settings,
    measure_interleaved,
    run,
)
from .report import (  # noqa: F401
    _ISA_ORDER,
    _TORCH_KEYS,
    BUSY,
    ROOF_TARGET,
    SCHEMA,
    SPEED_TARGET,
    TARGET_FAST,
    TARGET_ROOF,
    _fmt_sci,
    _fmt_time,
    _json_default,
    _row_order,
    _rule_of,
    _scaling,
    _table,
    check_matplotlib,
    format_summary,
    format_table,
    rule_summary,
    write_plot,
)
from .rules import (  # noqa: F401
    _B,
    ADAM,
    RULE_MODELS,
    RULE_ORDER,
    RULE_SIZES,
    RULE_SPECS,
    RuleSpec,
)
from .workloads import (  # noqa: F401
    BETAS,
    BYTES_PER_ELEM,
    EPS,
    LR,
    MODELS,
    Workload,
    _aligned,
    _array,
    _Filler,
    _fmt_count,
    gpt2_small_shapes,
    many_small_shapes,
    resnet50_shapes,
)
