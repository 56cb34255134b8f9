"""CLI commands on several CPU ranks of one process group, for the "= one process" tests.

torchrun starts an agent plus fresh interpreters for every command, and on 2 CPU cores importing
torch and dynamo (2.5 to 5 s per process) costs more than these tiny runs themselves. So each
multi-rank test fixture makes one launch per world size: ``world`` processes joined through env://
(the variables torchrun sets) run its commands in turn, each command reusing the process group
exactly as it would torchrun's (``distributed.setup`` takes a group it finds); and each process is
forked from a server that imported torch once (``Forked``). test_distributed keeps a real torchrun
launch of the CLI, and fresh interpreters where it measures a rank's memory.

``python rank_runs.py SPEC`` is one rank of a launch (in a fresh interpreter, to debug one by hand).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path


_handed_out: set = set()


def free_port() -> int:
    """A free port for a launch's rendezvous, below the kernel's ephemeral range: a port the OS hands
    out (``bind(("", 0))``) is free only until rank 0 binds it seconds later, and meanwhile another
    launch's gloo connections (client sockets take ephemeral ports) may take it (EADDRINUSE, seen
    with three launches starting together). Each port once per test process."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    candidates = list(range(max(1024, low - 12000), low)) if low > 2048 else []
    random.SystemRandom().shuffle(candidates)
    for port in [*candidates[:200], 0]:  # (0: the OS's choice, when nothing below the range is free)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = s.getsockname()[1]
        _handed_out.add(port)
        return port
    raise RuntimeError("rank_runs.free_port: no free port")


def rank_env(rank: int, world: int, port: int) -> dict:
    """What torchrun gives rank ``rank`` of ``world`` on one node."""
    return dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                PYTHONFAULTHANDLER="1")  # a crash prints every thread's Python stack


# DTensor.full_tensor on gloo (torch 2.13 CPU; an asynchronous functional all-gather) corrupts the
# heap now and then: a rank died of SIGSEGV or "malloc(): unaligned tcache chunk detected" in about
# 1 of 25 launches of test_distributed's worker, in a checkpoint gather (reproduced in pure torch:
# docs/DESIGN.md "Gathering on CPU"). The package's own gathers block on CPU since
# (distributed.full_tensor, all_gather, reduce_scatter); torch's (FSDP2's parameter all-gathers,
# DTensor redistributions) stay asynchronous. So a launch with a process killed by a signal is still
# reported as a warning (faulthandler's stacks: PYTHONFAULTHANDLER in rank_env) and run once more;
# an exit code, a failed command or a wrong result fails at once.
CRASH_RETRY = "a rank process was killed by a signal: running the launch once more (rank_runs.CRASH_RETRY)"
PORT_RETRY = "a launch's rendezvous port was taken before rank 0 listened: running it once more on another"


# Each rank process forks from one server process per test process that imported torch, dynamo, FSDP
# and the package's CLI and trainer once (multiprocessing's "forkserver": it runs nothing, so a fork
# copies a process that only imported them, as a DataLoader's worker is forked) instead of starting an
# interpreter that imports them (2.5 to 5 s of CPU a rank on 2 cores; no module of the package reads
# the environment on import, and each rank replaces it after the fork).
# test_tensor_parallel and test_qat took 135 s instead of 261 s so. A rank is still a process of its
# own, with its own environment (``rank_env``). (The server imports PRELOAD from its own sys.path,
# ignoring an ImportError: test_rank_preload_reaches_every_rank checks they arrive.)
PRELOAD = ["torch", "torch._dynamo", "torch.distributed.fsdp", "torch.distributed.tensor", "apr_kernels.cli",
           "apr_kernels.train.cli", "apr_kernels.train.loop", "apr_kernels.train.distributed"]
_context = None


def _forkserver():
    global _context
    if _context is None:
        import multiprocessing

        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _forked_rank(spec: str, env: dict, err: str) -> None:
    """One rank in a process forked from ``_forkserver``'s: stderr into ``err``, stdout discarded,
    ``env`` as the whole environment (what torchrun's ``env://`` rendezvous reads), Python's stacks
    printed on a crash (faulthandler, as ``PYTHONFAULTHANDLER`` would)."""
    _rank_process(env, err)
    sys.exit(_rank(spec))


def _forked_script(argv: list[str], env: dict, out: str, err: str, cwd: str | None) -> None:
    """``python SCRIPT ARGS...`` (``argv``) in a process forked from ``_forkserver``'s: stdout into
    ``out``, stderr into ``err``, in folder ``cwd`` (None: the server's), the script's folder first on
    ``sys.path``, its exit code the process's (``ForkedScript``)."""
    import runpy

    _rank_process(env, err, out)
    if cwd is not None:
        os.chdir(cwd)
    sys.argv = list(argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
    runpy.run_path(argv[0], run_name="__main__")


def _rank_process(env: dict, err: str, out: str = os.devnull) -> None:
    """A forked rank's process state (``_forked_rank``). ``gc.freeze()`` first: the objects the server
    imported move to the collector's permanent generation, so the rank's full collections
    (``distributed.teardown`` runs two) walk only what the rank made (0.26 to 0.36 s of CPU each in a
    forked process before, on this project's 2-core machine)."""
    import faulthandler
    import gc

    gc.freeze()
    for fd, path in ((2, err), (1, out)):
        flags = os.O_WRONLY | (0 if path == os.devnull else os.O_CREAT | os.O_TRUNC)
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    faulthandler.enable(sys.stderr)
    os.environ.clear()
    os.environ.update(env)
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))  # (OpenMP read the server's environment)


def _preloaded(err: str) -> None:
    """Exit 0 from a forked rank holding PRELOAD's modules and frozen objects (3 otherwise)."""
    import gc

    _rank_process(dict(os.environ), err)
    sys.exit(0 if set(PRELOAD) <= set(sys.modules) and gc.get_freeze_count() > 100_000 else 3)


class Forked:
    """A rank process (``_forked_rank``) behind ``subprocess.Popen``'s ``poll`` / ``returncode`` /
    ``kill`` / ``wait`` (a negative code: killed by that signal). As any multiprocessing child it
    first imports the caller's main module when that is a file (pytest's is a package or ``-c``)."""

    def __init__(self, spec: str, env: dict, err: str):
        self._start(_forked_rank, (spec, env, err), err)

    def _start(self, target, args: tuple, err: str) -> None:
        open(err, "w").close()  # (there for the reports even if the child dies before it opens it)
        self.process = _forkserver().Process(target=target, args=args, daemon=False)
        self.process.start()

    def poll(self):
        return self.process.exitcode

    @property
    def returncode(self):
        return self.process.exitcode

    def kill(self) -> None:
        self.process.kill()

    def wait(self):
        self.process.join()
        return self.process.exitcode


class ForkedScript(Forked):
    """``subprocess.Popen([sys.executable, *argv], env=env, stdout=PIPE, stderr=PIPE, text=True)`` for a
    rank script, forked from the server instead: no interpreter importing torch and the script's
    modules again (the 12 script ranks of test_float8, test_context_parallel, test_sharded_base and
    test_distributed's full_tensor took 136 s of CPU so against 258 s, on this project's 2-core
    machine). ``communicate`` gives its output, kept in ``<folder>/<name>.out`` and ``.err``. Only
    where the server's Triton suits the script: the server imported it with the test process's
    ``TRITON_INTERPRET``."""

    def __init__(self, argv: list, env: dict, folder: Path, name: str, cwd: Path | None = None):
        self.args = [str(a) for a in argv]
        self.out, self.err = Path(folder) / f"{name}.out", Path(folder) / f"{name}.err"
        args = (self.args, env, str(self.out), str(self.err), None if cwd is None else str(cwd))
        self._start(_forked_script, args, str(self.err))

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.kill()
            self.process.join()
            raise subprocess.TimeoutExpired(self.args, timeout)
        return (self.out.read_text() if self.out.exists() else ""), self.err.read_text()


def start_script(argv: list, env: dict, folder: Path, name: str, cwd: Path | None = None):
    """``python SCRIPT ARGS...`` (``argv``) with environment ``env``, behind ``subprocess.Popen``'s
    ``communicate`` / ``returncode`` / ``args`` (text output): a ``ForkedScript`` where the rank server
    suits the script, else a fresh interpreter. The server suits it when its Triton is the one the
    script asks for (it imported Triton with the test process's ``TRITON_INTERPRET``) and there is no
    CUDA (a process forked once CUDA is initialised could not use it: fresh interpreters on a GPU
    machine, where the CPU time they cost is not short)."""
    import torch

    if env.get("TRITON_INTERPRET", "") == os.environ.get("TRITON_INTERPRET", "") and not torch.cuda.is_available():
        return ForkedScript(argv, env, folder, name, cwd)
    return subprocess.Popen([sys.executable, *map(str, argv)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def crashed(procs) -> bool:
    """Whether one of ``procs`` has died of a signal (a negative return code; check before killing
    the others)."""
    return any(p.poll() is not None and p.returncode < 0 for p in procs)


class Launch:
    """``world`` ranks running the CLI commands ``runs`` (name: argv, or ``{"argv": argv, "stdin": text}``
    for one that reads its standard input) in order; see ``outputs``."""

    def __init__(self, runs: dict[str, list[str]], world: int, folder: Path):
        self.folder, self.world, self.names = Path(folder), world, list(runs)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.spec = self.folder / "spec.json"
        self.spec.write_text(json.dumps({"runs": runs, "out": str(self.folder)}))
        self._start()

    def _start(self) -> None:
        port = free_port()
        self.procs = [Forked(str(self.spec), rank_env(r, self.world, port), str(self.folder / f"rank{r}.err"))
                      for r in range(self.world)]

    def outputs(self, timeout: float = 400) -> dict[str, str]:
        """Rank 0's stdout of each command (by name), once every rank ran every command with exit
        code 0. A rank that fails stops the others (as torchrun would) and fails the caller; one
        killed by a signal (a native crash, see ``CRASH_RETRY``), or a launch whose rendezvous port was
        taken (``PORT_RETRY``), is reported and the launch run again once."""
        state = self._wait(timeout)
        retry = CRASH_RETRY if state == "crashed" else PORT_RETRY if state == "failed" and self._port_taken() else None
        if retry is not None:
            warnings.warn(f"{retry}\n{self._report(state)}")  # (in pytest's summary, even on a pass)
            self._start()  # (on a new port)
            self._wait(timeout)
        assert all(p.returncode == 0 for p in self.procs), self._report("failed")
        ranks = [json.loads((self.folder / f"rank{r}.json").read_text()) for r in range(self.world)]
        for r, done in enumerate(ranks):
            assert list(done) == self.names, self._report(f"rank {r} ran {list(done)}")
        return {name: ranks[0][name] for name in self.names}

    def _wait(self, timeout: float) -> str:
        """"ok" (every rank exited with code 0), "failed" or "crashed" (one died of a signal); at the
        first rank that did not exit with 0 the others are stopped."""
        deadline = time.monotonic() + timeout
        state = "ok"
        try:
            while None in (codes := [p.poll() for p in self.procs]):  # (every rank polled)
                if any(c not in (None, 0) for c in codes):
                    break
                assert time.monotonic() < deadline, self._report("timed out")
                time.sleep(0.1)
            if crashed(self.procs):
                state = "crashed"
            elif any(p.returncode != 0 for p in self.procs if p.returncode is not None):
                state = "failed"
        finally:
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        return state

    def _port_taken(self) -> bool:
        """Whether rank 0 could not listen on the rendezvous port (``free_port``'s race)."""
        return any("EADDRINUSE" in (self.folder / f"rank{r}.err").read_text() for r in range(self.world))

    def _report(self, what: str) -> str:
        tails = "\n".join(f"--- rank {r} (exit {p.returncode}):\n{(self.folder / f'rank{r}.err').read_text()[-3000:]}"
                          for r, p in enumerate(self.procs))
        return f"{self.world}-rank launch in {self.folder} {what}\n{tails}"


def launch_by_world(runs: dict[str, tuple[list[str], int]], folder: Path) -> list[Launch]:
    """One launch per world size among ``runs`` (name: (argv, world)), each in a subfolder of ``folder``."""
    return [Launch({name: argv for name, (argv, w) in runs.items() if w == world}, world,
                   Path(folder) / f"world{world}") for world in sorted({world for _, world in runs.values()})]


def outputs(*launches: Launch) -> dict[str, str]:
    """Every launch's ``outputs``, merged."""
    merged = {}
    for launch in launches:
        merged.update(launch.outputs())
    return merged


def cli(argv: list[str], main=None) -> tuple[int, str]:
    """(exit code, stdout) of the CLI (``main``: ``apr_kernels.cli.main``) run in this process."""
    import contextlib
    import io

    if main is None:
        from apr_kernels.cli import main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(argv)
    return code, buf.getvalue()


def against_one_process(runs: dict[str, tuple[list[str], int]], references: dict[str, list[str]],
                        folder: Path) -> tuple[dict[str, str], dict[str, str]]:
    """``runs`` (name: (argv, world)) launched by world size while each name's ``references`` argv
    runs in this process; (the references' stdout, the runs' rank-0 stdout), every exit code 0."""
    launches = launch_by_world(runs, folder)
    one = {}
    for name, argv in references.items():
        code, one[name] = cli(argv)
        assert code == 0, name
    return one, outputs(*launches)


def _rank(spec_path: str) -> int:
    import io

    import torch

    from apr_kernels.train import distributed as D

    spec = json.loads(Path(spec_path).read_text())
    env = D.setup("cpu", timeout_s=60, need_group=True)
    done, record = {}, Path(spec["out"]) / f"rank{env.rank}.json"
    try:
        for name, argv in spec["runs"].items():
            if isinstance(argv, dict):  # ({"argv": [...], "stdin": text}: a command reading its standard input)
                sys.stdin, argv = io.StringIO(argv["stdin"]), argv["argv"]
            # each command as in a fresh process: no compiled code or dynamo settings of the last one
            torch._dynamo.reset()
            config = torch._dynamo.config.save_config()
            start, cpu = time.monotonic(), time.process_time()
            code, stdout = cli(argv)
            print(f"rank_runs: {name} took {time.monotonic() - start:.1f} s, {time.process_time() - cpu:.1f} s of CPU",
                  file=sys.stderr)  # (what a launch costs)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch._dynamo.config.load_config(config)
            if code != 0:
                print(f"{name}: exit code {code}", file=sys.stderr)
                return 1
            done[name] = stdout
            record.write_text(json.dumps(done))
    finally:
        D.teardown(env)
    return 0


if __name__ == "__main__":
    sys.exit(_rank(sys.argv[1]))
