"""`python -m launch ...` in a process forked from a server that has already imported torch and the
engine (multiprocessing's forkserver, with launch.cli preloaded): the same argv, exit status, stdout
and stderr as a fresh interpreter, without its ~2.5 s of imports. For the tests that run the command
line dozens of times on bad input, where the imports are nearly all of each run's time.

What differs from `subprocess.run([sys.executable, "-m", "launch", ...])`: the interpreter and the
engine's modules are imported once, with the server's environment (each child then sets its own
environment and working directory before the command parses its flags); an uncaught exception's
traceback is headed by multiprocessing's "Process ..." line. Tests that check how the interpreter
itself starts (the entry point, `--help`, torchrun) keep using real subprocesses."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CTX = multiprocessing.get_context("forkserver")
_CTX.set_forkserver_preload(["launch.cli"])


def _child(argv: list[str], cwd: str, env: dict[str, str], stdin: str, out: str, err: str) -> None:
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path, mode in ((0, stdin, os.O_RDONLY), (1, out, os.O_WRONLY), (2, err, os.O_WRONLY)):
        f = os.open(path, mode)
        os.dup2(f, fd)
        os.close(f)
    sys.stdin = open(0, closefd=False)  # multiprocessing pointed sys.stdin at /dev/null
    from launch.cli import main

    try:
        main(argv)  # SystemExit's code becomes the exit status, as in the interpreter
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def run_cli(*args: object, cwd: Path, env: dict[str, str], stdin: str = "",
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """subprocess.run's result for `python -m launch *args` (text, captured), run forked."""
    argv = [str(a) for a in args]
    with tempfile.TemporaryDirectory(prefix="forked-cli-") as d:
        files = [str(Path(d) / name) for name in ("stdin", "stdout", "stderr")]
        Path(files[0]).write_text(stdin)
        for f in files[1:]:
            Path(f).touch()
        p = _CTX.Process(target=_child, args=(argv, str(cwd), env, *files))
        p.start()
        p.join(timeout)
        if p.exitcode is None:
            p.kill()
            p.join()
            raise subprocess.TimeoutExpired(["python", "-m", "launch", *argv], timeout)
        out, err = (Path(f).read_text(errors="replace") for f in files[1:])
    return subprocess.CompletedProcess(["python", "-m", "launch", *argv], p.exitcode, out, err)
