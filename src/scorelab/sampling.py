"""Samplers (work in progress: registry first)."""

from __future__ import annotations

_ALL = frozenset({"vp", "subvp", "ve"})

# method -> the SDE families it is defined for. The one place that decides which sampler fits which SDE.
SAMPLER_FAMILIES: dict[str, frozenset[str]] = {
    "ancestral": _ALL,
    "euler_maruyama": _ALL,
    "reverse_diffusion": _ALL,
    "pc": _ALL,
    "ald": frozenset({"ve"}),
    "ode": _ALL,
    "ddim": _ALL,
    "heun": _ALL,
    "dpm_solver": _ALL,
}
PREDICTORS = ("euler_maruyama", "reverse_diffusion", "ancestral")
CORRECTORS = ("none", "langevin", "ald")


def methods_for(family: str) -> list[str]:
    """The sampling methods defined for an SDE family ("vp", "subvp", "ve")."""
    return [m for m, fams in SAMPLER_FAMILIES.items() if family in fams]


def check_method(method: str, family: str) -> None:
    """Raise ValueError naming the valid methods unless `method` is defined for SDEs of `family`."""
    if method not in SAMPLER_FAMILIES:
        raise ValueError(f"unknown sampling method {method!r}; valid: {', '.join(SAMPLER_FAMILIES)}")
    if family not in SAMPLER_FAMILIES[method]:
        raise ValueError(
            f"sampling method {method!r} is not defined for {family!r} SDEs; valid for {family!r}: "
            f"{', '.join(methods_for(family))}"
        )
