"""`import chiarformer` registers model_type "chiarformer" with transformers' Auto classes,
without importing transformers itself.

chiarformer.hf needs transformers' model code (about 2.5 s to import), which no `chiar` command
but `export` uses. So importing chiarformer only arranges the registration: at once when
transformers is already imported, otherwise right after the first `import transformers`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings


def _register() -> None:
    try:
        importlib.import_module("chiarformer.hf")
    except Exception as e:  # an unsupported transformers must not break the user's own import of it
        warnings.warn(f"chiarformer: not registered with transformers' Auto classes ({e})", stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Answers only for the top-level `transformers`, once: finds it with the usual finders and
    makes its loader register chiarformer when the module has finished executing."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register
        return spec


def register_with_transformers() -> None:
    if "transformers" in sys.modules:
        _register()
    elif importlib.util.find_spec("transformers") is not None:
        if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _RegisterAfterImport())
