"""igpt-fast's build hook; everything else about the package is in pyproject.toml.

The one thing pyproject.toml cannot say: igpt_fast.kernels is igpt_fast/kernels/ (the public ops and
their dispatch) plus the Triton modules of the top-level kernels/ folder. That folder has no
__init__.py, so it never shadows another top-level `kernels` package; a built wheel gets its modules
copied into igpt_fast/kernels/ here. Editable installs and source checkouts reach them through
igpt_fast.kernels.__path__ instead.
"""
import glob
import os

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reaches them through __path__
            return
        target = os.path.join(self.build_lib, "igpt_fast", "kernels")
        self.mkpath(target)
        for source in sorted(glob.glob(os.path.join("kernels", "*.py"))):
            self.copy_file(source, os.path.join(target, os.path.basename(source)))


setup(cmdclass={"build_py": BuildPy})
