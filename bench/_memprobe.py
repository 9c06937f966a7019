"""Peak CPU memory of one forward+backward, measured in a fresh process (Linux only).

    python -m bench._memprobe FAMILY SHAPE DTYPE PROVIDER      e.g. softmax_kl 256x32000 bf16 eager

Prints one JSON line. The sequence is:

1. import torch, the family and the provider's library (kdkernels for kdkernels-*);
2. run the provider once on the family's tiny shape: this pays one-time costs before the
   baseline (lazy initialization, thread-pool start-up, library loading and, for ``compile``,
   starting inductor and compiling the tiny graph) while allocating next to nothing;
3. allocate the real inputs (written, so resident);
4. baseline: reset the kernel's peak-RSS counter (write "5" to /proc/self/clear_refs) and read
   the current RSS; if the reset is not allowed, the baseline is ``ru_maxrss`` instead;
5. one forward+backward on the real inputs (no warm-up at this shape: freed memory that the
   allocator keeps would hide the peak);
6. peak extra = peak RSS (VmHWM, or ``ru_maxrss``) minus the baseline. The input gradient,
   which stays alive, is part of it.

``python -m bench`` runs this with ``MALLOC_MMAP_THRESHOLD_=65536`` (unless already set), so that
glibc returns every freed tensor to the OS at once and the peak RSS follows the peak of live
tensors; the threshold is part of the reported method.

For ``compile`` the real shape is compiled in step 5, after the baseline (a static-shape compile;
a symbolic-shape compile on the tiny shape does not carry over, since inductor specializes on
V <= 4096). That compile adds about 1.5 MiB: measured against a real-shape warm-up followed by
``malloc_trim(0)``, 256x32000 and 512x131072 fp32 gave 33.0 vs 31.4 and 258.0 vs 256.7 MiB.
"""

from __future__ import annotations

import gc
import json
import os
import sys

from bench.common import DTYPES, MIB, load_family
from kdkernels._core.memory import maxrss_kib, reset_peak_rss, status_kib


def main(argv: list) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    family_name, shape_label, dtype_name, provider_name = argv
    family = load_family(family_name)
    shape, dtype = family.parse_shape(shape_label), DTYPES[dtype_name]
    notes = []
    providers = {p.name: p for p in family.providers("cpu", notes)}
    if provider_name not in providers:
        print(f"unknown provider {provider_name!r}; available: {', '.join(providers)}", file=sys.stderr)
        return 2
    provider = providers[provider_name]

    tiny = family.make_inputs(family.tiny_shape, dtype, "cpu")
    provider.warm_up_for_memprobe(tiny)
    del tiny
    gc.collect()

    inputs = family.make_inputs(shape, dtype, "cpu")
    rss_after_inputs = status_kib("VmRSS")
    maxrss_before = maxrss_kib()
    reset = reset_peak_rss()
    base_kib = status_kib("VmRSS") if reset else maxrss_before

    loss = provider.step(inputs)

    peak_kib = status_kib("VmHWM") if reset else maxrss_kib()
    result = {
        "family": family_name, "case": shape_label, "dtype": dtype_name, "provider": provider_name,
        "method": ("VmHWM after clear_refs" if reset else "ru_maxrss")
                  + f", MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'glibc default')}",
        "peak_extra_mib": (peak_kib - base_kib) / 1024,
        "baseline_mib": base_kib / 1024,
        "rss_after_inputs_mib": rss_after_inputs / 1024,
        "ru_maxrss_before_mib": maxrss_before / 1024,
        "ru_maxrss_after_mib": maxrss_kib() / 1024,
        "inputs_mib": sum(x.numel() * x.element_size() for x in inputs.values() if hasattr(x, "numel")) / MIB,
        "loss": float(loss.detach()),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown (inductor's worker pool shutdown costs a second or more)
