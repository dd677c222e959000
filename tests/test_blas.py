"""The OpenBLAS kernel vladkit loads faiss with (vladkit/_util/blas.py, issue 14).

The decision tests need neither faiss nor this CPU: they feed flags and environments in.
The subprocess tests check the real thing where faiss is installed and this CPU supports
a better kernel than OpenBLAS's generic one.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vladkit._util import blas as _blas
from vladkit._util.blas import choose_coretype, cpu_vendor_and_flags, faiss_coretype

AVX512 = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl"
AVX2 = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma"


def _cpuinfo(tmp_path, flags, vendor="GenuineIntel"):
    path = tmp_path / "cpuinfo"
    block = f"processor\t: {{}}\nvendor_id\t: {vendor}\nflags\t\t: {flags}\n\n"
    path.write_text(block.format(0) + block.format(1).replace(flags, "sse sse2"))
    return str(path)


def _decide(tmp_path, flags, vendor="GenuineIntel", environ=None, modules=None,
            platform_name="linux", machine="x86_64"):
    return faiss_coretype(environ={} if environ is None else environ,
                          modules={} if modules is None else modules,
                          platform_name=platform_name, machine=machine,
                          cpuinfo=_cpuinfo(tmp_path, flags, vendor))


# ------------------------------------------------------------------------ the decision


@pytest.mark.parametrize("flags, vendor, expected", [
    (AVX512, "GenuineIntel", "SkylakeX"),
    (AVX512 + " avx512_bf16 amx_tile", "GenuineIntel", "SkylakeX"),
    (AVX512, "AuthenticAMD", "SkylakeX"),  # Zen 4/5: what newer OpenBLAS picks too
    (AVX2, "GenuineIntel", "Haswell"),
    (AVX2, "AuthenticAMD", "Zen"),
    (AVX2, "HygonGenuine", "Zen"),
    # Knights Landing: AVX-512 F/CD without BW/DQ/VL, not enough for SkylakeX kernels.
    (AVX2 + " avx512f avx512cd avx512er avx512pf", "GenuineIntel", "Haswell"),
    (AVX512.replace(" avx512bw", ""), "GenuineIntel", "Haswell"),
    ("fpu sse sse2 ssse3 sse4_1 sse4_2 avx", "GenuineIntel", None),  # Sandy Bridge
    ("fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2", "GenuineIntel", None),  # no FMA
    ("fpu sse sse2 pni", "GenuineIntel", None),
    ("", "", None),
])
def test_kernel_from_flags(flags, vendor, expected):
    assert choose_coretype(set(flags.split()), vendor) == expected


def test_only_x86_64_kernels_are_named():
    assert choose_coretype(set(AVX512.split()), "GenuineIntel", machine="AMD64") == "SkylakeX"
    assert choose_coretype(set(AVX512.split()), "GenuineIntel", machine="aarch64") is None


def test_the_decision_reads_the_first_cpu(tmp_path):
    assert _decide(tmp_path, AVX512) == "SkylakeX"
    assert _decide(tmp_path, AVX2, vendor="AuthenticAMD") == "Zen"
    assert _decide(tmp_path, "fpu sse sse2 pni") is None


@pytest.mark.parametrize("value", ["Prescott", "Haswell", "", "nonsense"])
def test_the_users_setting_wins(tmp_path, value):
    assert _decide(tmp_path, AVX512, environ={"OPENBLAS_CORETYPE": value}) is None


def test_nothing_once_faiss_is_loaded(tmp_path):
    assert _decide(tmp_path, AVX512, modules={"faiss": object()}) is None


def test_nothing_off_linux_x86_64(tmp_path):
    assert _decide(tmp_path, AVX512, platform_name="darwin") is None
    assert _decide(tmp_path, AVX512, platform_name="win32") is None
    assert _decide(tmp_path, AVX512, machine="aarch64") is None


def test_unreadable_cpuinfo_means_nothing(tmp_path):
    assert cpu_vendor_and_flags(str(tmp_path / "missing")) == ("", set())
    assert faiss_coretype(environ={}, modules={}, platform_name="linux", machine="x86_64",
                          cpuinfo=str(tmp_path / "missing")) is None


def test_cpuinfo_parsing(tmp_path):
    vendor, flags = cpu_vendor_and_flags(_cpuinfo(tmp_path, AVX2, "AuthenticAMD"))
    assert vendor == "AuthenticAMD" and flags == set(AVX2.split())


def _fake_imports(monkeypatch, coretype, faiss_error=None):
    """Make load_faiss decide ``coretype`` and replace its import of faiss (which, once
    done, cannot be undone in this process) by one that records OPENBLAS_CORETYPE as the
    library would read it, or raises ``faiss_error``. Returns the recorded values."""
    seen = []
    real_import = _blas.importlib.import_module

    def import_module(name, *args):
        if name != "faiss":
            return real_import(name, *args)
        seen.append(os.environ.get("OPENBLAS_CORETYPE"))
        if faiss_error is not None:
            raise faiss_error
        return object()

    monkeypatch.setattr(_blas, "faiss_coretype", lambda: coretype)
    monkeypatch.setattr(_blas.importlib, "import_module", import_module)
    return seen


def test_load_faiss_sets_the_kernel_for_the_import_only(monkeypatch):
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    seen = _fake_imports(monkeypatch, "SkylakeX")
    assert _blas.load_faiss() == "SkylakeX"
    assert seen == ["SkylakeX"]  # what faiss's OpenBLAS reads when it loads
    assert "OPENBLAS_CORETYPE" not in os.environ  # and gone again


def test_load_faiss_removes_the_variable_when_faiss_is_missing(monkeypatch):
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    seen = _fake_imports(monkeypatch, "Haswell", faiss_error=ImportError("no faiss"))
    assert _blas.load_faiss() is None
    assert seen == ["Haswell"] and "OPENBLAS_CORETYPE" not in os.environ


def test_load_faiss_removes_the_variable_when_the_import_fails(monkeypatch):
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    _fake_imports(monkeypatch, "Zen", faiss_error=RuntimeError("broken library"))
    with pytest.raises(RuntimeError, match="broken library"):
        _blas.load_faiss()
    assert "OPENBLAS_CORETYPE" not in os.environ


def test_load_faiss_leaves_the_environment_as_it_was(monkeypatch):
    """The real decision and import, whatever faiss's state in this process (imported by
    an earlier test or not; installed or not): the variable is not left behind, and a
    user's value is neither changed nor removed."""
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    expected = faiss_coretype()  # None when faiss is already imported, or on other CPUs
    assert _blas.load_faiss() in (expected, None)  # None also when faiss is not installed
    assert "OPENBLAS_CORETYPE" not in os.environ
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Prescott")
    assert _blas.load_faiss() is None  # the user's setting wins
    assert os.environ["OPENBLAS_CORETYPE"] == "Prescott"


# ---------------------------------------------------------------- with faiss, in a subprocess

_EXPECTED = faiss_coretype(modules={}, environ={})


def _run(code, **env_changes):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    env.update(env_changes)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


_KERNELS = """
import json, os, sys
{first}
from threadpoolctl import threadpool_info
arch = {{}}
for info in threadpool_info():
    if info["internal_api"] == "openblas":
        key = "faiss" if "faiss" in info["filepath"] else "numpy" if "numpy" in info["filepath"] else None
        if key:
            arch[key] = info.get("architecture")
print(json.dumps({{"arch": arch, "variable": os.environ.get("OPENBLAS_CORETYPE")}}))
"""


def _needs_a_better_kernel():
    pytest.importorskip("faiss")
    pytest.importorskip("threadpoolctl")
    if _EXPECTED is None:
        pytest.skip("no kernel chosen here (not Linux x86-64, or no AVX2/AVX-512)")


def test_faiss_gets_the_kernel_the_cpu_supports():
    _needs_a_better_kernel()
    plain = _run(_KERNELS.format(first="import numpy, faiss"))
    if "faiss" not in plain["arch"]:
        pytest.skip("this faiss does not load an OpenBLAS that threadpoolctl reports")
    result = _run(_KERNELS.format(first="import vladkit.retrieval.index"))
    assert result["arch"]["faiss"].lower() == _EXPECTED.lower()
    assert result["arch"]["faiss"] != "Prescott"
    assert result["variable"] is None  # removed again: children and later libraries unaffected
    # numpy's own OpenBLAS detects its kernel exactly as without vladkit.
    assert result["arch"].get("numpy") == plain["arch"].get("numpy")


def test_faiss_keeps_the_users_kernel():
    _needs_a_better_kernel()
    result = _run(_KERNELS.format(first="import vladkit.retrieval.index"), OPENBLAS_CORETYPE="Prescott")
    if "faiss" not in result["arch"]:
        pytest.skip("this faiss does not load an OpenBLAS that threadpoolctl reports")
    assert result["arch"]["faiss"] == "Prescott"
    assert result["variable"] == "Prescott"


_SEARCH = """
import json, numpy as np
{first}
import faiss
rng = np.random.default_rng(0)
xb = rng.standard_normal((5000, 64), dtype=np.float32)
xq = rng.standard_normal((300, 64), dtype=np.float32)
index = faiss.IndexFlatIP(64)
index.add(xb)
D, I = index.search(xq, 10)
print(json.dumps({{"D": D.tolist(), "I": I.tolist()}}))
"""


def test_search_results_do_not_depend_on_the_kernel():
    """The chosen kernel and the generic one give the same neighbours, scores within
    float32 round-off (BLAS search: 300 queries >= faiss's threshold of 20)."""
    _needs_a_better_kernel()
    generic = _run(_SEARCH.format(first=""), OPENBLAS_CORETYPE="Prescott")
    chosen = _run(_SEARCH.format(first="import vladkit.retrieval.index"))
    assert generic["I"] == chosen["I"]
    D0, D1 = np.array(generic["D"]), np.array(chosen["D"])
    np.testing.assert_allclose(D1, D0, rtol=1e-5, atol=1e-5 * np.abs(D0).max())
