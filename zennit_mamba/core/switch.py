'''Whether the rules of a registration act on a call: the one state that every decision made in the forward pass
reads (a canonized forward or the module's own, a rule's hook or none, the explained model's ends or none).'''
import threading
from contextlib import contextmanager
from typing import Iterator, Optional


class RuleSwitch:
    '''On or off for the calls of a registered composite.

    A registered composite's rules act on every call, in every thread (Zennit's context), unless

    * :py:meth:`zennit.core.Composite.inactive` switched them off (:py:attr:`active`), where the model computes its
      own forward, and so its plain gradient, as if nothing were registered;
    * the registration is held for one thread (:py:meth:`held_by_this_thread`, as Captum's front ends do): then they
      act only on that thread's calls inside :py:meth:`acting`, so that other methods, the user's own gradients and
      other threads see the unmodified model.

    Decisions are made in the forward pass: a gradient is always that of the graph its forward built.

    Examples
    --------
    >>> switch = RuleSwitch()
    >>> switch.on()
    True
    >>> with switch.held_by_this_thread():
    ...     outside = switch.on()
    ...     with switch.acting():
    ...         inside = switch.on()
    >>> outside, inside, switch.on()
    (False, True, True)
    '''

    def __init__(self):
        #: False inside Zennit's ``Composite.inactive()``
        self.active = True
        self._holder: Optional[int] = None
        self._local = threading.local()

    def on(self) -> bool:
        '''Whether the rules act on a call made now, in this thread.'''
        decided = getattr(self._local, 'decided', None)
        if decided is not None:
            return decided
        if not self.active:
            return False
        holder = self._holder
        return holder is None or (holder == threading.get_ident() and getattr(self._local, 'depth', 0) > 0)

    @contextmanager
    def deciding(self, on: bool) -> Iterator['RuleSwitch']:
        '''Inside, this thread's calls see the switch ``on`` (or off): a forward pass recomputed in the backward pass,
        which may run in autograd's own thread, decides as the forward pass it repeats did.'''
        previous, self._local.decided = getattr(self._local, 'decided', None), on
        try:
            yield self
        finally:
            self._local.decided = previous

    @contextmanager
    def held_by_this_thread(self) -> Iterator['RuleSwitch']:
        '''Inside, the rules act only on this thread's calls inside :py:meth:`acting`.'''
        previous, self._holder = self._holder, threading.get_ident()
        try:
            yield self
        finally:
            self._holder = previous

    @contextmanager
    def acting(self) -> Iterator['RuleSwitch']:
        '''Inside, the rules act on this thread's calls (where :py:meth:`held_by_this_thread` holds them).'''
        self._local.depth = getattr(self._local, 'depth', 0) + 1
        try:
            yield self
        finally:
            self._local.depth -= 1


def acts(switch: Optional[RuleSwitch]) -> bool:
    '''Whether a rule with ``switch`` acts now: always where it has none (a rule registered on its own).'''
    return switch is None or switch.on()
