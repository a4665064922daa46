"""A harness for the kernel tests whose kernels could hang or crash the interpreter (the Hopper
attention tests): :class:`ChildSmoke`."""

from __future__ import annotations

import os
import subprocess
import sys


class ChildSmoke:
    """A test file's smoke run (``python FILE --smoke``) in a child process, once per session:
    a kernel that hangs or crashes then fails one test instead of taking pytest down. ``error()``
    is ``None`` when the child exited 0 and printed ``ok_line``, else why not (exit status and the
    tails of its output; a hang is cut after ``timeout`` s); ``log`` is the child's stdout."""

    def __init__(self, path: str, ok_line: str, *, tail: int = 8000, timeout: float = 300):
        self.path, self.ok_line, self.tail, self.timeout = path, ok_line, tail, timeout
        self.log = ""
        self._ran = False
        self._error: str | None = None

    def error(self) -> str | None:
        if not self._ran:
            self._ran = True
            env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1")
            try:
                proc = subprocess.run(
                    [sys.executable, self.path, "--smoke"],
                    capture_output=True,
                    text=True,
                    timeout=self.timeout,
                    env=env,
                )
                ok = proc.returncode == 0 and self.ok_line in proc.stdout
                self._error = (
                    None
                    if ok
                    else (
                        f"exit {proc.returncode}\n"
                        f"{proc.stdout[-self.tail :]}\n{proc.stderr[-6000:]}"
                    )
                )
                self.log = proc.stdout
            except subprocess.TimeoutExpired as exc:
                out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
                self._error = f"timed out after {self.timeout:.0f} s (a hang?)\n{out[-self.tail :]}"
        return self._error
