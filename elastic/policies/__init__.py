"""KV-cache policies: one small dataclass per method (one file each), and a registry.

    make_policy("elastic", budget=0.5, importance="debiased")

The budget arithmetic lives in :mod:`elastic.budget`, the rules several policies share in
:mod:`.plans`, the attention scores in :mod:`elastic.scoring`; the cache layer
(:mod:`elastic.cache`) applies the decisions.
"""

from __future__ import annotations

from ..budget import check_budget
from .base import Decode, Policy, Prefill
from .elastic_cache import ElasticPolicy
from .h2o import H2OPolicy
from .h2o_reference import ReferenceH2OPolicy
from .local import LocalPolicy
from .lookm import LOOKMPolicy
from .prefixkv import PrefixKVPolicy
from .snapkv import SnapKVPolicy
from .tova import TOVAPolicy
from .vlcache import VLCachePolicy

POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (Policy, ElasticPolicy, H2OPolicy, LocalPolicy, SnapKVPolicy, TOVAPolicy, PrefixKVPolicy,
                        VLCachePolicy, LOOKMPolicy, ReferenceH2OPolicy)
}
METHODS: tuple[str, ...] = tuple(POLICIES)


def make_policy(method: str, **params) -> Policy:
    """Build the named policy; unknown methods, parameters and option values raise ``ValueError``."""
    if method not in POLICIES:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    cls = POLICIES[method]
    # A parameter of another method (say ``distance`` for h2o) is ignored so that callers
    # can pass one set of controls to every method; a name no method knows is a typo.
    known = set().union(*(p.__dataclass_fields__ for p in POLICIES.values()))
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}; known: {sorted(known)}")
    params = {k: v for k, v in params.items() if k in cls.__dataclass_fields__}
    if method == "full" and params.get("budget", 1.0) != 1.0:
        check_budget(params["budget"])  # still reject nonsense, but full keeps everything
        params = {**params, "budget": 1.0}
    return cls(**params)


__all__ = ["POLICIES", "METHODS", "make_policy", "Policy", "Prefill", "Decode", "ElasticPolicy", "H2OPolicy",
           "LocalPolicy", "SnapKVPolicy", "TOVAPolicy", "PrefixKVPolicy", "VLCachePolicy", "LOOKMPolicy",
           "ReferenceH2OPolicy"]
