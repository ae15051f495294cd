"""Builds the C++ extension ``cnnviz_fast._C`` by running CMake on CMakeLists.txt.

The Triton kernels in ``kernels/`` ship inside the package as ``cnnviz_fast.kernels``
through the symlink ``cnnviz_fast/kernels -> ../kernels`` (setuptools copies its files into
the wheel), so a source checkout, an editable install and a wheel import them alike.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        config = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", str(ROOT), *config], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(
    packages=["cnnviz_fast", "cnnviz_fast.reference", "cnnviz_fast.models", "cnnviz_fast.explain", "cnnviz_fast.kernels",
              "cnnviz_fast.metrics", "cnnviz_fast.synthesis", "cnnviz_fast.compat"],
    package_data={"cnnviz_fast": ["weights/*.pt", "templates/*.html"]},
    ext_modules=[CMakeExtension("cnnviz_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
