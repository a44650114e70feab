"""Every Triton kernel compiles for sm_80 and sm_90 at every autotune config, without register spills.

Compilation runs in a subprocess without TRITON_INTERPRET (`prefloss.commands.compile_report`); no GPU needed.
"""

from __future__ import annotations

import pytest

from prefloss.commands.compile_report import compile_report, format_table


@pytest.fixture(scope="module")
def results():
    return compile_report((80, 90))


def test_compile_all_kernels_without_spills(results):
    table = format_table(results)
    assert all(r.error is None for r in results), table
    assert all(r.spill_bytes == 0 for r in results), table
    assert all(0 < r.registers <= 255 for r in results), table


def test_compile_report_covers_kernels_targets_dtypes(results):
    built = {(r.kernel, r.target, r.dtype) for r in results}
    for kernel in ("logprobs_fwd_kernel", "logprobs_bwd_kernel"):
        for target in (80, 90):
            for dtype in ("fp32", "bf16"):
                assert (kernel, target, dtype) in built
    variants = {r.variant for r in results if r.kernel == "logprobs_fwd_kernel"}
    assert {"policy", "ref+eps", "all"} <= variants


def test_compile_report_rejects_bad_arguments():
    with pytest.raises(ValueError, match="targets"):
        compile_report(("sm_90",))
    with pytest.raises(ValueError, match="kernels"):
        compile_report((90,), kernels=("no_such_kernel",))
