"""``signalrl.ops`` by attribute, for the losses.

Importing an op's module (``signalrl.ops.gae``) rebinds the package attribute of the same name to
the module, so ``signalrl.ops.gae`` can be a module rather than the op; this unwraps it.
"""
from __future__ import annotations

import types

from .. import ops as _ops_package


class _Ops:
    def __getattr__(self, name: str):
        obj = getattr(_ops_package, name)
        if isinstance(obj, types.ModuleType):
            obj = getattr(obj, name)
        return obj


ops = _Ops()
