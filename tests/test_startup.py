"""Start-up of the analysis process (app/__main__.py): MONAI imports every optional package it finds; the packages
this app never uses are kept out, so that an image holding them (transformers, pandas, ...) does not slow each study.
numpy's huge-page advice is off there unless the environment asks for it, and malloc keeps freed memory for reuse."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


# Code that loads app/__main__.py as module `main` in a child interpreter (importlib.util imported)
LOAD_APP_MAIN = "\n".join([
    f"spec = importlib.util.spec_from_file_location('app_main', {str(REPO / 'app' / '__main__.py')!r})",
    "main = importlib.util.module_from_spec(spec); spec.loader.exec_module(main)",
])


def _app_main():
    spec = importlib.util.spec_from_file_location("app_main", REPO / "app" / "__main__.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_blocker_refuses_only_unused_packages():
    main = _app_main()
    blocker = main.UnusedPackageBlocker()
    for name in ("transformers", "pandas.core", "skimage", "nibabel", "scipy.signal", "scipy.signal.windows",
                 "scipy.optimize", "scipy.sparse.linalg", "matplotlib.pyplot"):
        with pytest.raises(ModuleNotFoundError):
            blocker.find_spec(name)
    for name in ("numpy", "torch", "pydicom", "highdicom", "matplotlib", "matplotlib.figure", "scipy", "scipy.ndimage",
                 "scipy.spatial", "scipy.sparse", "scipy.signals", "cupy", "monai.inferers"):
        assert blocker.find_spec(name) is None


@pytest.mark.parametrize("blocked", [False, True])
def test_graph_import_skips_unused_packages_that_are_installed(tmp_path, blocked):
    """A package MONAI imports optionally (`einops`, a stand-in that records its import) is imported by the app's
    graph module without the blocker and not with it; the graph module imports either way."""
    package = tmp_path / "site" / "einops"
    package.mkdir(parents=True)
    marker = tmp_path / "imported"
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    code = "\n".join([
        "import importlib.util, sys",
        f"sys.path[:0] = [{str(tmp_path / 'site')!r}, {str(REPO / 'app')!r}, {str(REPO)!r}]",
        LOAD_APP_MAIN,
        "sys.meta_path.insert(0, main.UnusedPackageBlocker())" if blocked else "",
        "from app import LungLesionApp",
    ])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert marker.exists() != blocked


@pytest.mark.parametrize(("setting", "expected"), [(None, "False"), ("1", "True")])
def test_analysis_process_turns_numpy_huge_page_advice_off(tmp_path, setting, expected):
    """The analysis process (here with -h, which imports the app and stops) runs with numpy's madvise(MADV_HUGEPAGE)
    off, unless NUMPY_MADVISE_HUGEPAGE says otherwise."""
    code = "\n".join([
        "import importlib.util, pathlib, sys",
        f"sys.path[:0] = [{str(REPO / 'app')!r}, {str(REPO)!r}]",
        LOAD_APP_MAIN,
        "sys.argv = ['app', '-h']",
        f"assert main.analyse(pathlib.Path({str(tmp_path)!r})) == 0",
        "import numpy; print('huge pages', numpy._core.multiarray._get_madvise_hugepage())",
    ])
    env = {key: value for key, value in os.environ.items() if key != "NUMPY_MADVISE_HUGEPAGE"}
    if setting is not None:
        env["NUMPY_MADVISE_HUGEPAGE"] = setting
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"huge pages {expected}" in result.stdout


@pytest.mark.parametrize("keep", [False, True])
def test_freed_memory_is_reused_without_page_faults(keep):
    """An array larger than glibc's largest mmap threshold (32 MB) and than a thread's own heap (64 MB), freed and
    allocated again on a thread other than the main one (as the operators run on the scheduler's threads): by default
    its pages are faulted in anew each time; after operators.volume.keep_freed_memory() (as in the analysis process)
    they are reused."""
    code = "\n".join([
        "import resource, sys",
        f"sys.path.insert(0, {str(REPO)!r})",
        "from operators.volume import keep_freed_memory",
        "keep_freed_memory()" if keep else "",
        "import numpy, threading",
        "def allocate_twice():",
        "    numpy.ones(20 * 2**20, numpy.float32).sum()",  # 80 MB (a thread heap holds at most 64), freed at once
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt",
        "    numpy.ones(20 * 2**20, numpy.float32).sum()",
        "    print('faults', resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)",
        "thread = threading.Thread(target=allocate_twice); thread.start(); thread.join()",  # as the operators run
    ])
    env = {**os.environ, "NUMPY_MADVISE_HUGEPAGE": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    faults = int(result.stdout.split()[-1])
    assert faults < 1000 if keep else faults > 10000  # 20480 pages of 4 KiB
