"""Alias of :mod:`stratopt_ds.integrations.deepspeed` (the same module object), so that
``stratopt_ds.deepspeed.initialize`` reads like the ``deepspeed.initialize`` it replaces."""
import sys

from .integrations import deepspeed as _module

sys.modules[__name__] = _module
