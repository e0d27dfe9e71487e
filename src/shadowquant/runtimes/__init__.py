"""The runtimes every stage calls (runtimes/base.py's `Runtime`): `get_runtime` by profile name,
`runtime_of` from a record that names one. No torch at import time."""

from __future__ import annotations

import math
from collections.abc import Mapping

from shadowquant.runtimes.profiles import IDEAL, get_profile
from shadowquant.runtimes.base import DecisionSources, PointPlan, Runtime
from shadowquant.runtimes.ideal import IdealRuntime
from shadowquant.runtimes.npu import NpuRuntime

__all__ = ["DecisionSources", "PointPlan", "Runtime", "get_runtime", "runtime_of"]


def get_runtime(name: str, family: str | None = None) -> Runtime:
    """The runtime of profile `name` (runtimes.profiles.PROFILES); with `family`, checked that it runs that family."""
    profile = get_profile(name, family)
    return IdealRuntime(profile) if profile.shadow_role == "any" else NpuRuntime(profile)


def runtime_of(record: Mapping, family: str | None = None) -> Runtime:
    """The runtime a record names under "runtime" (a sweep row, selection.json, runtime.json, an export's
    metadata); records written before the runtime profiles existed name none and were the idealized W8A8."""
    name = record.get("runtime")
    if name is None or (isinstance(name, float) and math.isnan(name)) or name == "":
        name = IDEAL
    return get_runtime(str(name), family)
