"""Locks of the optimizers, and what fork() does to them.

Each optimizer serialises its own operations (step, load_state_dict, add_param_group,
state_dict) with a re-entrant lock; the C update passes of the whole process are
serialised by _core's step lock. A lock held by another thread when the process forks
would stay held for ever in the child, where that thread does not exist; so before a
fork every live optimizer's lock is taken (waiting for steps in flight: the child then
never starts with an optimizer half-way through a step), and released on both sides.
The order (every optimizer lock, then _core's step lock, whose fork handler was
registered earlier and so runs later) is the order a step takes them in.
"""

import os
import threading
import weakref
from typing import Any

_live: weakref.WeakSet[Any] = weakref.WeakSet()
_held: list[Any] = []


def new_lock(owner):
    """A fresh lock for `owner`, which must keep it as `owner._lock`."""
    _live.add(owner)
    return threading.RLock()


def _before_fork():
    for owner in list(_live):
        lock = getattr(owner, "_lock", None)
        if lock is not None:
            lock.acquire()
            _held.append(lock)


def _after_fork_in_parent():
    while _held:
        _held.pop().release()


def _after_fork_in_child():
    # The forking thread holds them all and is the only thread here: release them, so
    # that every optimizer of the child is usable (a fresh RLock would also do).
    while _held:
        _held.pop().release()


os.register_at_fork(
    before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child
)
