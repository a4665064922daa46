"""The package around the ops: the CLI, the examples, back-end selection."""

import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import crosslmm_ops
from crosslmm_ops import _backend, cli

ROOT = Path(__file__).resolve().parents[1]


def test_info_prints_versions_and_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"crosslmm-ops   {crosslmm_ops.__version__}" in out
    assert f"torch          {torch.__version__}" in out
    assert "token_pool" in out and "auto ->" in out
    assert ("extension      built" in out) == (_backend.extension() is not None)


def test_pool_command_runs(capsys):
    assert (
        cli.main(
            ["pool", "--frames", "2", "--device", "cpu", "--dtype", "float32", "--repeat", "1"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "avg 9x9 stride 9" in out and "(1, 2, 9, 1152)" in out


def test_demo_command_runs(capsys):
    """The README's main job on small settings: both models run end to end, CrossLMM feeds the LLM
    9 tokens per frame against the baseline's 196, and its DCALs ran cross_attention."""
    assert cli.main(["demo", "--frames", "2", "--new-tokens", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "visual tokens into the LLM" in out
    assert "392 (196/frame)" in out and "18 (9/frame)" in out
    assert "95.4%" in out
    assert "cross_attention: torch" in out


def test_pool_example_script_runs():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "pool_example.py"),
            "--frames",
            "2",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "CrossLMM, 9 tokens/frame" in proc.stdout and "81x fewer" in proc.stdout


def test_unknown_backend_is_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.requested_backend("tpu")


def test_unavailable_backend_is_clear_runtime_error():
    ok, why = _backend.cuda_runnable(torch.device("cpu"))
    assert not ok and "CUDA tensors" in why
    with pytest.raises(RuntimeError, match="token_pool: backend='cuda' cannot run this call"):
        _backend.resolve("token_pool", "cuda", torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# Packaging (CI also builds the sdist, checks its contents and installs a wheel built from it
# into a clean environment: .ci/run)
# ----------------------------------------------------------------------------------------------


def _sdist_files() -> set[str]:
    """The files MANIFEST.in adds to an sdist, from this checkout (setuptools' own template
    parser; the package modules, setup.py and pyproject.toml are added by setuptools itself)."""
    from setuptools.command.egg_info import FileList

    files = FileList()
    skip = {".git", ".venv", "venv"}
    files.allfiles = sorted(
        p.relative_to(ROOT).as_posix()
        for p in ROOT.rglob("*")
        if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
    )
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            files.process_template_line(line)
    return set(files.files)


def test_sdist_carries_what_the_extension_build_needs():
    files = _sdist_files()
    sources = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "csrc").rglob("*")
        if p.is_file() and p.suffix in (".cu", ".cuh", ".cpp", ".h", ".hpp")
    }
    assert "csrc/bindings.cpp" in sources
    assert sources <= files, sorted(sources - files)
    assert "CMakeLists.txt" in files
    built = [f for f in files if f.endswith((".so", ".o", ".pyc")) or f.startswith("build/")]
    assert not built, built


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_build_requirements_and_licence_metadata():
    data = _pyproject()
    requires = data["build-system"]["requires"]
    # setuptools builds wheels itself (bdist_wheel moved into it); the wheel package is not needed.
    assert not any(r.split("<")[0].split(">")[0].split("=")[0].strip() == "wheel" for r in requires)
    assert "setuptools>=77" in requires  # PEP 639: SPDX licence expression and license-files
    project = data["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]


def _setup_module() -> dict:
    """setup.py's functions, without running setup()."""
    return runpy.run_path(str(ROOT / "setup.py"), run_name="crosslmm_setup")


def test_a_package_without_the_extension_declares_no_extension_module(monkeypatch):
    """setuptools tags a wheel for one Python and platform whenever ext_modules is non-empty; a
    pure-Python build must therefore declare none, to get py3-none-any."""
    monkeypatch.delenv("CROSSLMM_FORCE_BUILD", raising=False)
    monkeypatch.setenv("CROSSLMM_SKIP_CUDA_BUILD", "1")
    setup = _setup_module()
    assert setup["ext_modules"]() == []
    monkeypatch.delenv("CROSSLMM_SKIP_CUDA_BUILD")
    module = setup["ext_modules"].__globals__  # run_path returns a copy of the module's globals
    module["build_plan"] = lambda: (True, "a toolchain")
    assert [e.name for e in setup["ext_modules"]()] == ["crosslmm_ops._C"]
    # Not possible here: none declared (a pure-Python wheel).
    module["build_plan"] = lambda: (False, "no CUDA toolkit found")
    assert setup["ext_modules"]() == []
    # Forced but impossible: declared, so that build_ext runs and says why it cannot build.
    monkeypatch.setenv("CROSSLMM_FORCE_BUILD", "1")
    assert [e.name for e in setup["ext_modules"]()] == ["crosslmm_ops._C"]


@pytest.mark.parametrize("editable", [True, False])
def test_the_extension_is_built_where_python_will_import_it(tmp_path, editable):
    """An editable install imports _C from the source package, so CMake must write it there: a
    later incremental `cmake --build` of the persistent build folder then updates the imported
    module. (setuptools' own target is a temporary folder it copies from; a rebuild into that
    folder would leave the import on the old build.) A regular install builds into setuptools'
    folder."""
    from setuptools import Distribution

    setup = _setup_module()
    # The names build_extension looks up (run_path returns a copy of the module's globals).
    module = setup["CMakeBuild"].build_extension.__globals__
    module["ROOT"] = tmp_path / "src"  # never the real package: a stray _C there is imported
    module["find_cuda_home"] = lambda: tmp_path / "cuda"
    commands = []

    def run(cmd, check, env):  # CMake stands in: it writes _C where it was configured to
        commands.append(cmd)
        if cmd[:2] == ["cmake", "--build"]:
            flag = "-DCROSSLMM_OUTPUT_DIR="
            (out,) = [Path(a[len(flag) :]) for a in commands[0] if a.startswith(flag)]
            out.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(b"built")

    module["subprocess"] = type("FakeSubprocess", (), {"run": staticmethod(run)})
    ext = setup["CMakeExtension"]("crosslmm_ops._C")
    command = setup["CMakeBuild"](Distribution({"name": "crosslmm-ops", "ext_modules": [ext]}))
    command.initialize_options()
    command.build_lib = str(tmp_path / "build_lib")
    command.finalize_options()
    command.editable_mode = editable
    target = Path(command.get_ext_fullpath(ext.name))
    name = target.name
    command.build_extension(ext)

    expected = tmp_path / "src" / "crosslmm_ops" if editable else target.parent.resolve()
    assert f"-DCROSSLMM_OUTPUT_DIR={expected}" in commands[0]
    assert (expected / name).read_bytes() == b"built"
    assert target.read_bytes() == b"built"  # where setuptools copies from, in both cases


# ----------------------------------------------------------------------------------------------
# When the scripts compile the extension (scripts/setup_env.sh)
# ----------------------------------------------------------------------------------------------


def _setup_plan(script: str, tmp_path, *, gpus: int | None, **env) -> str:
    """The build decision ``scripts/<script>`` makes (CROSSLMM_SETUP_PLAN_ONLY stops it there),
    with a stand-in nvidia-smi that lists ``gpus`` GPUs (None: the machine's own)."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "CROSSLMM_BUILD_EXTENSION",
            "CROSSLMM_BUILD_DEFAULT",
            "CROSSLMM_SKIP_CUDA_BUILD",
            "CROSSLMM_FORCE_BUILD",
        )
    }
    if gpus is not None:
        fake = tmp_path / "bin"
        fake.mkdir(exist_ok=True)
        lines = "".join(f"echo 'GPU {i}: Stand-in GPU (UUID: GPU-{i})'\n" for i in range(gpus))
        none = "echo 'No devices were found'\nexit 6\n"  # what nvidia-smi -L says without one
        (fake / "nvidia-smi").write_text("#!/bin/sh\n" + (lines or none))
        (fake / "nvidia-smi").chmod(0o755)
        clean["PATH"] = f"{fake}{os.pathsep}{clean.get('PATH', '')}"
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / script)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, "CROSSLMM_SETUP_PLAN_ONLY": "1", **env},
    )
    assert proc.returncode == 0, proc.stderr
    line = [x for x in proc.stdout.splitlines() if x.startswith("== CUDA extension:")]
    assert len(line) == 1, proc.stdout
    return line[0]


def _toolkit() -> bool:
    return (
        bool(shutil.which("nvcc"))
        or Path("/usr/local/cuda/bin/nvcc").exists()
        or bool(
            os.environ.get("CUDA_HOME") and Path(os.environ["CUDA_HOME"], "bin", "nvcc").exists()
        )
    )


def test_main_job_skips_the_compile_without_a_gpu(tmp_path):
    plan = _setup_plan("run.sh", tmp_path, gpus=0)
    assert plan.startswith("== CUDA extension: not compiled (no GPU found;"), plan
    assert "CROSSLMM_BUILD_EXTENSION=gpu" in plan


def test_main_job_compiles_where_a_gpu_is_present_or_when_asked(tmp_path):
    plan = _setup_plan("run.sh", tmp_path, gpus=1)
    if _toolkit():
        assert plan.startswith("== CUDA extension: compiled (a GPU and a CUDA toolkit"), plan
    else:
        assert "not compiled (a GPU but no CUDA toolkit found" in plan
    plan = _setup_plan("run.sh", tmp_path, gpus=0, CROSSLMM_BUILD_EXTENSION="1")
    assert plan.startswith("== CUDA extension: compiled (asked for;"), plan


def test_test_command_compiles_wherever_a_toolkit_is_found(tmp_path):
    plan = _setup_plan("test.sh", tmp_path, gpus=0)
    if _toolkit():
        assert plan.startswith("== CUDA extension: compiled (a CUDA toolkit is present;"), plan
    else:
        assert plan.startswith("== CUDA extension: not compiled (no CUDA toolkit found;"), plan
