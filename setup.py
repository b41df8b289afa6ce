"""Build hook: install ``sgl_budget_sglang_serve.pth`` at the top of site-packages (see
sgl_budget/engines/sglang/serve_help.py). Everything else is declared in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = Path("sgl_budget", "engines", "sglang", "sgl_budget_sglang_serve.pth")


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        # A regular wheel takes the build directory's top level; an editable wheel (PEP 660) is
        # assembled from the install directory, which setuptools points at the unpacked wheel.
        target = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PTH, Path(target, PTH.name))

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH.name))]


setup(cmdclass={"build_py": BuildPyWithPth})
