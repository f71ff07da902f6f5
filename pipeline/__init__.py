"""cqlsac.pipeline: the typed config, the declarative `Pipeline` and the `cqlsac` command line.

`Pipeline` is imported on first use (PEP 562), so the command line and config loading start
without torch.
"""

from __future__ import annotations

import importlib

_MODULE_OF = {"Pipeline": "pipeline", "PipelineConfig": "config", "ConfigError": "config"}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'cqlsac.pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(f"cqlsac.pipeline.{_MODULE_OF[name]}"), name)
