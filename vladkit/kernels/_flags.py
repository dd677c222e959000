"""Compilation flags shared by the kernel modules.

Every numba kernel is compiled with ``cache=True`` (a new process does not recompile) and
``nogil=True`` (vladkit's thread pools run them on all cores at once); the loops whose
floating-point work may be reordered with ``fastmath=_FAST`` too.
"""

# Let LLVM vectorise reductions and fuse multiply-adds; not "nnan"/"ninf": GMM scores hold
# -inf for skipped components, and those must compare correctly.
_FAST = {"reassoc", "contract", "nsz", "arcp"}
