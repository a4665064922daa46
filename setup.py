"""Build script: a pure-Python package plus, where a CUDA toolchain and a CUDA build of torch are
present, the extension ``crosslmm_ops._C`` built by CMake (CMakeLists.txt; one build path for pip
and for CMake users).

Environment switches:
  CROSSLMM_FORCE_BUILD=1       a missing toolchain is an error instead of a pure-Python install
  CROSSLMM_SKIP_CUDA_BUILD=1   never build the extension
  CROSSLMM_CUDA_ARCHS="80;90a" GPU targets (default: sm_80 and sm_90a)
  MAX_JOBS=N                   parallel compile jobs; NVCC_THREADS=N threads inside each nvcc
  CUDA_HOME                    the CUDA toolkit (else /usr/local/cuda, else the nvcc on PATH)

The extension needs torch in the build environment, so build it with
``pip install --no-build-isolation .``; plain ``pip install .`` (isolated, no torch) installs the
pure-Python package, whose ops run on the Triton and torch back ends. A package built without the
extension declares no extension module, so its wheel is tagged ``py3-none-any``; one with it is
tagged for the Python and platform it was compiled for. The sdist carries ``csrc/`` and
``CMakeLists.txt`` (MANIFEST.in), so both kinds of wheel can be built from it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (ROOT / "crosslmm_ops" / "__init__.py").read_text(), re.M
).group(1)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def find_cuda_home() -> Path | None:
    """The CUDA toolkit: CUDA_HOME / CUDA_PATH, then /usr/local/cuda, then the nvcc on PATH.

    An nvcc found on PATH may be a wrapper script outside the toolkit (``exec .../bin/nvcc "$@"``),
    so the toolkit is only accepted where ``bin/nvcc`` and ``include/cuda_runtime.h`` sit together.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
        # Ask nvcc where it lives: a wrapper script still runs the real compiler.
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=60
            ).stderr
            m = re.search(r"^#\$ TOP=(\S+)", out, re.M)
            if m:
                candidates.append(m.group(1))
        except (OSError, subprocess.SubprocessError):
            pass
    for c in candidates:
        if (
            c
            and (Path(c) / "bin" / "nvcc").exists()
            and (Path(c) / "include" / "cuda_runtime.h").exists()
        ):
            return Path(c).resolve()
    return None


def build_plan() -> tuple[bool, str]:
    """Whether to build the extension, and why (printed during the build)."""
    if _flag("CROSSLMM_SKIP_CUDA_BUILD"):
        return False, "CROSSLMM_SKIP_CUDA_BUILD is set"
    try:
        import torch
    except ImportError:
        return False, (
            "torch is not importable in the build environment "
            "(build with pip install --no-build-isolation .)"
        )
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if find_cuda_home() is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if shutil.which("cmake") is None:
        return False, "cmake is not installed (pip install cmake)"
    return True, f"torch {torch.__version__} (CUDA {torch.version.cuda})"


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Runs CMakeLists.txt to produce crosslmm_ops._C."""

    def run(self):
        build, why = build_plan()
        if not build:
            raise RuntimeError(
                f"CROSSLMM_FORCE_BUILD=1 but the CUDA extension cannot be built: {why}"
            )
        print(f"crosslmm-ops: building the CUDA extension with {why}", file=sys.stderr)
        super().run()

    def build_extension(self, ext: Extension):
        import torch

        cuda_home = find_cuda_home()
        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        # An editable install imports _C from the source tree, so CMake writes it there: a later
        # `cmake --build build/cmake-<tag>` then updates the module Python loads. (setuptools'
        # own path is a temporary folder that it copies from, and which is gone after the
        # install; a rebuild into it would leave the imported module stale.)
        editable = getattr(self, "editable_mode", False)
        out_dir = ROOT / "crosslmm_ops" if editable else ext_path.parent
        # A persistent build folder (ignored by git), so a reinstall recompiles only what changed;
        # setuptools' build_temp is a fresh folder for every editable install. `rm -rf build` forces
        # a clean build.
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("CROSSLMM_CUDA_ARCHS", "80;90a").replace(",", ";").replace(" ", ";")
        archs = ";".join(a.replace(".", "") for a in archs.split(";") if a)
        configure = [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_CUDA_COMPILER={cuda_home / 'bin' / 'nvcc'}",
            f"-DCUDAToolkit_ROOT={cuda_home}",
            f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}",
            f"-DCROSSLMM_CUDA_ARCHS={archs}",
            f"-DCROSSLMM_OUTPUT_DIR={out_dir}",
            f"-DCROSSLMM_VERSION={VERSION}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            configure.append("-GNinja")
        jobs = os.environ.get("MAX_JOBS") or str(max(1, (os.cpu_count() or 1)))
        env = dict(os.environ, CUDA_HOME=str(cuda_home))
        subprocess.run(configure, check=True, env=env)
        subprocess.run(
            ["cmake", "--build", str(build_dir), "--parallel", jobs], check=True, env=env
        )
        if out_dir != ext_path.parent:  # where setuptools copies the module from
            ext_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(out_dir / ext_path.name, ext_path)


def ext_modules() -> list[Extension]:
    """The extension when it will be built, else none: setuptools tags a wheel for one Python
    and platform whenever ext_modules is non-empty, even if build_ext then builds nothing."""
    build, why = build_plan()
    if build or _flag("CROSSLMM_FORCE_BUILD"):
        # Forced but impossible: CMakeBuild.run says why when a build needs it (an sdist does not).
        return [CMakeExtension("crosslmm_ops._C")]
    print(f"crosslmm-ops: no CUDA extension in this build: {why}", file=sys.stderr)
    return []


# Guarded so that tests can load this file's functions without running a build (pip and
# setuptools' build backend execute it as __main__).
if __name__ == "__main__":
    setup(
        version=VERSION,
        ext_modules=ext_modules(),
        cmdclass={"build_ext": CMakeBuild},
    )
