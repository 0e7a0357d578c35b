"""The gathered decode attention as one C++ loop on CPU (``csrc/gathered_attention.cpp``).

The torch path of ``decode._gathered_attention`` copies every attended key into a gathered
tensor before its matmul, and reads each value row once per query head. The kernel reads each
key and value row once, in place, with the scores, the softmax and the weighted sum in one
loop per query (fp32, as the torch path keeps them). It is built on first use with torch's
C++ extension builder (g++ and ninja; ``make setup`` builds it once, cached in
``~/.cache/torch_extensions`` or ``TORCH_EXTENSIONS_DIR``). Where it cannot be built, or
with ``GAZEATTN_CPU_KERNEL=0``, the torch path serves, after one warning.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from hashlib import blake2b
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "gathered_attention.cpp"
SWITCH = "GAZEATTN_CPU_KERNEL"  # "0" turns the kernel off (the torch path serves)

_lock = threading.Lock()
_built: list = []  # [module or None] once tried


def cpu_kernel():
    """The built extension (its ``gathered_attention``), or None where the torch path serves:
    turned off by ``GAZEATTN_CPU_KERNEL=0``, or a build that failed (warned once)."""
    if os.environ.get(SWITCH, "1") == "0":
        return None
    if not _built:
        with _lock:
            if not _built:
                _built.append(_build())
    return _built[0]


# the vector instructions the build may use, by what torch found the CPU can run: a build
# is named after them, so a cache shared by machines never loads one their CPU lacks, and
# after the torch it compiles against, so two environments sharing the cache (a checkout's
# venv, a fresh one) keep their own builds instead of rebuilding over each other's library
VECTOR_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}


def _build():
    try:
        import torch
        from torch.utils.cpp_extension import load

        capability = torch.backends.cpu.get_cpu_capability()
        install = blake2b(
            f"{Path(torch.__file__).parent}|{torch.__version__}".encode(), digest_size=4
        )
        name = f"gazeattn_gathered_attention_{capability.lower()}_{install.hexdigest()}"
        # fast-math: the exponentials of the softmax vectorize (no -inf mask to keep exact:
        # the kernel scores only the keys a query attends)
        # OpenMP: at::parallel_for splits the queries over torch's threads (the extension
        # links libgomp.so.1, which resolves to the one torch has loaded)
        flags = ["-O3", "-fopenmp", "-ffast-math", *VECTOR_FLAGS.get(capability, [])]
        # the builder runs ninja from PATH: pip's ninja lies beside this interpreter in a venv
        # that was not activated
        path = os.environ.get("PATH", "")
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])
        try:
            return load(
                name=name,
                sources=[str(SOURCE)],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
        finally:
            os.environ["PATH"] = path
    except Exception as err:  # noqa: BLE001 - no compiler, no ninja: the torch path serves
        logger.warning(
            "gazeattn's CPU decode kernel could not be built (%s); the torch path serves", err
        )
        return None
