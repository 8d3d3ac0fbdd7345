"""Shared test fixtures. Everything runs offline: HF_HUB_OFFLINE is set for the whole session."""

import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_isolated(code: str, tmp_path, timeout: int = 300) -> str:
    """Run `code` in a fresh interpreter where the `modeling_memllava` package is NOT importable.

    `-I -S` drops the working directory, PYTHONPATH and site processing (so the editable install's path hook is not
    loaded); only the plain site-packages directory is put back, which holds transformers and torch. The snippet
    itself asserts the package cannot be found, so a broken isolation fails the test instead of passing it.
    """
    preamble = textwrap.dedent(
        f"""
        import sys, importlib.util
        sys.path.append({sysconfig.get_paths()["purelib"]!r})
        assert importlib.util.find_spec("modeling_memllava") is None, "package leaked into the isolated interpreter"
        """
    )
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", preamble + textwrap.dedent(code)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"isolated run failed:\nSTDOUT:\n{result.stdout}\nSTDERR:\n{result.stderr[-4000:]}")
    return result.stdout


@pytest.fixture
def isolated_python(tmp_path):
    """`isolated_python(code)` -> stdout of `code` run where only transformers/torch (not this package) import."""
    return lambda code, timeout=300: run_isolated(code, tmp_path, timeout)
