"""The memory allocator a CPU fine-tuning process runs under.

A training step frees and reallocates gigabytes of activations. glibc's malloc either keeps the
freed blocks (fast, but fragmented: the peak grows past what the planner counts) or, with a
fixed mmap threshold (trainer.return_freed_memory), unmaps them and page-faults them back in
the next step (lean, but slow). mimalloc reuses freed pages within a step and returns idle ones
after a short delay, and gets both. Measured on the default model, LoRA r8 q,v, 4 x 256 tokens,
bfloat16, 5 steps, same machine, back to back (tokens/s, peak RSS):

    glibc, its default              370   2.22 GB
    glibc, mmap threshold 1 MiB     248   1.64 GB   (hanlin's setting under glibc)
    mimalloc 3.4 (LD_PRELOAD)       355   1.77 GB

The allocator is chosen when a process starts (LD_PRELOAD), so `hanlin finetune` re-executes
itself once under mimalloc when the `cmeel-mimalloc` package (in the train extra) is
installed: `--allocator glibc` or HANLIN_ALLOCATOR=glibc keeps glibc. This is the recipe
Intel's PyTorch launcher uses for CPU training (jemalloc/tcmalloc preloaded); mimalloc is the
one of those three that pip installs. An SDK caller of train() keeps whatever its process has.
"""

from __future__ import annotations

import os
import sys

from hanlin.backends.base import ConfigError

CHOICES = ("auto", "mimalloc", "glibc")
ENV = "HANLIN_ALLOCATOR"  # the default for --allocator
_GUARD = "HANLIN_ALLOCATOR_REEXEC"  # set in the re-executed process: never loop


def mimalloc_library() -> str | None:
    """The path of libmimalloc.so from the cmeel-mimalloc distribution, or None."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("cmeel-mimalloc")
    except PackageNotFoundError:
        return None
    for f in dist.files or ():
        if os.path.basename(str(f)) == "libmimalloc.so":
            path = str(dist.locate_file(f))
            if os.path.isfile(path):
                return path
    return None


def active() -> str:
    """"mimalloc" when it is loaded in this process, else "glibc" on Linux, else "system"."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            if "libmimalloc" in f.read():
                return "mimalloc"
    except OSError:
        return "system"
    return "glibc" if sys.platform.startswith("linux") else "system"


def resolve(choice: str | None) -> str:
    """The allocator to run under: `choice` (or $HANLIN_ALLOCATOR, or auto) made concrete."""
    choice = choice or os.environ.get(ENV) or "auto"
    if choice not in CHOICES:
        raise ConfigError(f"allocator {choice!r} is not valid: choose one of {', '.join(CHOICES)}")
    if not sys.platform.startswith("linux"):
        if choice == "mimalloc":
            raise ConfigError("allocator mimalloc is preloaded with LD_PRELOAD, which hanlin only does on Linux")
        return "system"
    lib = mimalloc_library()
    if choice == "mimalloc" and lib is None:
        raise ConfigError("allocator mimalloc: the cmeel-mimalloc package is not installed (pip install cmeel-mimalloc)")
    if choice == "auto":
        return "mimalloc" if lib else "glibc"
    return choice


def child_env(choice: str | None, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a new process that should run under `choice`."""
    env = dict(os.environ if env is None else env)
    want = resolve(choice)
    preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p and "libmimalloc" not in p]
    if want == "mimalloc":
        preload.insert(0, mimalloc_library())
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    else:
        env.pop("LD_PRELOAD", None)
    env[ENV] = "glibc" if want == "system" else want
    return env


def reexec_if_needed(choice: str | None) -> None:
    """Replace this process with the same command under the chosen allocator, when it is not
    the one running (once: the new process does not re-execute again)."""
    want = resolve(choice)
    if want in ("system", active()) or os.environ.get(_GUARD) == "1":
        return
    if want == "glibc" and "libmimalloc" not in os.environ.get("LD_PRELOAD", ""):
        return  # mimalloc was loaded some other way: nothing a re-exec would change
    env = child_env(want)
    env[_GUARD] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
