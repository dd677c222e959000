"""OpenBLAS as vladkit needs it: faiss loaded with a kernel this CPU supports (issue 14),
and an OpenBLAS loaded before vladkit given its thread timeout (issue 30,
:func:`apply_thread_timeout`).

faiss-cpu's wheels bundle their own OpenBLAS (0.3.15 in faiss-cpu 1.15.1). It picks its
kernels from a table of CPU models, and on a model newer than its table (e.g. the Xeon
"model 207" of the development machines) it falls back to "Prescott", the generic SSE3
kernel: a flat search or a k-means is then several times slower than on the AVX-512
kernel the CPU has (issue 14; benchmarks/bench_faiss_blas.py measures it).
OpenBLAS reads ``OPENBLAS_CORETYPE`` once, when the library is loaded, and trusts it
without checking the CPU (a kernel the CPU lacks would crash on its first instruction).

So, before faiss is loaded and only if the user has not set ``OPENBLAS_CORETYPE``:
choose the kernel from the CPU's own flags (``/proc/cpuinfo``; Linux puts a flag there
only when both the CPU and the kernel's saved register state support it), set the
variable, import faiss, and remove the variable again. numpy is imported before the
variable is set and it is gone before anything else loads, so numpy's and scipy's own
OpenBLAS (and any child process) detect their kernels as they always did. The kernels
chosen are those newer OpenBLAS releases fall back to themselves for a CPU missing from
their table (AVX-512 -> SkylakeX; AVX2 + FMA -> Haswell, or Zen on AMD, as OpenBLAS
picks for every AVX2 Zen). Products are the same up to summation order: scores equal
within float32 round-off, the same neighbours. k-means, which takes an argmin at every
step, can end at another, equally good local optimum, as it does between two machines
whose OpenBLAS picks different kernels.
"""

import importlib
import os
import platform
import sys

__all__ = ["apply_thread_timeout", "choose_coretype", "cpu_vendor_and_flags", "faiss_coretype", "load_faiss",
           "loaded_openblas"]

VARIABLE = "OPENBLAS_CORETYPE"

# -march=skylake-avx512, which OpenBLAS's SkylakeX kernels are built for: F, CD, BW, DQ, VL
# (Knights Landing has F and CD only; OpenBLAS gives it the Haswell kernels).
SKYLAKEX_FLAGS = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})
HASWELL_FLAGS = frozenset({"avx", "avx2", "fma"})
AMD_VENDORS = frozenset({"AuthenticAMD", "HygonGenuine"})
X86_64 = frozenset({"x86_64", "amd64"})


def cpu_vendor_and_flags(path="/proc/cpuinfo"):
    """(vendor_id, set of flags) of the first CPU in ``path``; ("", empty set) if unreadable."""
    vendor, flags = "", set()
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if not sep:
                    if vendor or flags:
                        break  # end of the first processor's block
                    continue
                key = key.strip()
                if key == "vendor_id":
                    vendor = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                if vendor and flags:
                    break
    except OSError:
        pass
    return vendor, flags


def choose_coretype(flags, vendor="", machine="x86_64"):
    """The OpenBLAS kernel name for a CPU with these flags, or None to leave OpenBLAS alone.

    Only x86-64 kernels every faiss-cpu OpenBLAS knows are named, and only when every
    instruction-set extension they are compiled for is in ``flags``.
    """
    if str(machine).lower() not in X86_64:
        return None
    flags = set(flags)
    if SKYLAKEX_FLAGS <= flags:
        return "SkylakeX"
    if HASWELL_FLAGS <= flags:
        return "Zen" if vendor in AMD_VENDORS else "Haswell"
    return None


def faiss_coretype(environ=None, modules=None, platform_name=None, machine=None,
                   cpuinfo="/proc/cpuinfo"):
    """The kernel :func:`load_faiss` would set, or None when it leaves things alone.

    None when the user set ``OPENBLAS_CORETYPE`` (any value, even empty: theirs wins),
    when faiss is already loaded (too late), off Linux x86-64, or when the CPU lacks the
    extensions of both kernels (OpenBLAS's own detection is then as good as any).
    """
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    platform_name = sys.platform if platform_name is None else platform_name
    machine = platform.machine() if machine is None else machine
    if VARIABLE in environ or "faiss" in modules or not platform_name.startswith("linux"):
        return None
    if str(machine).lower() not in X86_64:
        return None
    vendor, flags = cpu_vendor_and_flags(cpuinfo)
    return choose_coretype(flags, vendor, machine)


def load_faiss():
    """Import faiss with ``OPENBLAS_CORETYPE`` set to the kernel chosen for this CPU.

    Returns the kernel set, or None if nothing was done (see :func:`faiss_coretype`) or
    faiss is not installed. The variable is removed again whatever happens.
    """
    coretype = faiss_coretype()
    if coretype is None:
        return None
    # numpy first: its own OpenBLAS detects its kernel before the variable exists.
    importlib.import_module("numpy")
    os.environ[VARIABLE] = coretype
    try:
        importlib.import_module("faiss")
    except ImportError:
        return None
    finally:
        os.environ.pop(VARIABLE, None)
    return coretype


# ------------------------------------------------------- OpenBLAS loaded before vladkit


def loaded_openblas(maps="/proc/self/maps"):
    """Paths of the OpenBLAS libraries this process has loaded (Linux; [] elsewhere)."""
    paths = []
    try:
        with open(maps, encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.rstrip("\n").partition("/")[2]
                name = os.path.basename(path)
                if path and "openblas" in name.lower() and ".so" in name and "/" + path not in paths:
                    paths.append("/" + path)
    except OSError:
        return []
    return paths


def apply_thread_timeout(paths=None):
    """Give OpenBLAS libraries loaded before vladkit the ``OPENBLAS_THREAD_TIMEOUT`` in
    the environment now; returns the paths it was applied to.

    OpenBLAS reads the variable once, when it is loaded: imported after numpy, vladkit's
    setting reached neither numpy's nor scipy's OpenBLAS, whose idle workers then spin
    2^28 cycles (~0.1 s) after every product, on the cores vladkit's numba threads need
    next (measured: Fisher vectors and VLAD 1.8x slower in a loop that also calls numpy's
    ``@``). For each library that read no value then (``openblas_thread_timeout()`` is 0)
    and exports the functions: ``openblas_read_env`` reads the environment again and
    ``blas_thread_shutdown_`` stops the workers, which the next multi-threaded call starts
    again with the new timeout (OpenBLAS's own fork handler does the same). Libraries
    built on OpenMP, or without these functions, are left alone.
    """
    import ctypes

    if not os.environ.get("OPENBLAS_THREAD_TIMEOUT"):
        return []
    applied = []
    for path in loaded_openblas() if paths is None else paths:
        try:
            # (RTLD_NOLOAD: a handle on the library already loaded, never a second copy)
            library = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)
            read_env, timeout = library.openblas_read_env, library.openblas_thread_timeout
            shutdown = library.blas_thread_shutdown_
            parallel = getattr(library, "openblas_get_parallel", None)
            if parallel is None:
                parallel = next(getattr(library, f"{p}openblas_get_parallel{s}") for p in ("scipy_", "")
                                for s in ("", "64_", "_64") if hasattr(library, f"{p}openblas_get_parallel{s}"))
        except (OSError, AttributeError, StopIteration):
            continue
        if parallel() != 1 or timeout() != 0:  # 1: pthreads (0 sequential, 2 OpenMP); a value read already
            continue
        read_env()
        shutdown()
        applied.append(path)
    return applied
