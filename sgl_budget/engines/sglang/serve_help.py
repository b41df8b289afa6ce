"""``sglang serve --help`` lists sgl_budget's flags too.

SGLang 0.5.23's ``sglang serve`` prints its help before it loads plugins, so the
``sglang.srt.plugins`` entry point never runs on that path. The package installs a one-line
``.pth`` file (``sgl_budget_sglang_serve.pth``) that, only for a command line ``sglang serve ...
--help``, calls :func:`install`: an import hook that loads SGLang's plugins right after
``sglang.cli.serve`` is imported, so the help it prints includes the flags the plugin adds.
Every other interpreter start pays one list comparison.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

TARGET = "sglang.cli.serve"


def wanted(argv: list[str]) -> bool:
    return (len(argv) >= 2 and os.path.basename(argv[0]) == "sglang" and argv[1] == "serve"
            and any(a in ("-h", "--help") for a in argv[2:]))


class _LoadPluginsAfterImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_load_plugins(module):
            exec_module(module)
            from sglang.srt.plugins import load_plugins

            load_plugins()

        spec.loader.exec_module = exec_then_load_plugins
        return spec


def install(argv: list[str] | None = None) -> bool:
    """Arrange for SGLang's plugins to load in ``sglang serve --help``; True if this command line is that one."""
    if not wanted(sys.argv if argv is None else argv):
        return False
    sys.meta_path.insert(0, _LoadPluginsAfterImport())
    return True
