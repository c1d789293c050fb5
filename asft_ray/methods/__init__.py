"""Pruning methods, one module each; see `registry` for the declaration and how methods compose.

Adding a method is one new module here that calls `register(Method(...))` (plus its tests):
config validation, the CLI, the engine's choice of path and the statistics the runners collect
all follow from the declaration."""

from asft_ray.methods.registry import (
    GRADIENT_STATS,
    INPUT_STATS,
    Method,
    Recipe,
    Refinement,
    method_names,
    methods,
    refinements,
    register,
    register_refinement,
    resolve,
    unregister,
)

__all__ = ["GRADIENT_STATS", "INPUT_STATS", "Method", "Recipe", "Refinement", "method_names", "methods",
           "refinements", "register", "register_refinement", "resolve", "unregister"]
