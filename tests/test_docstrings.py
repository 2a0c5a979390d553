"""The guide's standard: every public function, class and method of the package has a
docstring (its own, or the one it overrides)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import gpumesh


def _public_members():
    for info in pkgutil.iter_modules(gpumesh.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"gpumesh.{info.name}")
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                yield f"{module.__name__}.{name}", obj
            elif inspect.isclass(obj):
                yield f"{module.__name__}.{name}", obj
                for attr, member in vars(obj).items():
                    if not attr.startswith("_") and (inspect.isfunction(member) or isinstance(member, property)):
                        yield f"{module.__name__}.{name}.{attr}", getattr(obj, attr) if inspect.isfunction(member) \
                            else member


def test_every_public_function_class_and_method_has_a_docstring():
    members = dict(_public_members())
    assert "gpumesh.pipeline.run_mesh" in members and "gpumesh.sharding.ShardingSpec.num_shards" in members
    missing = sorted(name for name, obj in members.items() if not inspect.getdoc(obj))
    assert not missing, missing
