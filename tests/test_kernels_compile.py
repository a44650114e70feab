"""Every Triton kernel compiles for sm_80 and sm_90 and for AMD gfx942 (MI300X/MI325X) and gfx90a
(MI250X) at every autotune config, without register spills; the AMD resource figures are read from
the real amdgcn listings.

Compilation runs in a subprocess without TRITON_INTERPRET (`prefloss.commands.compile_report`); no GPU needed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from prefloss.commands.compile_report import (
    AMD_TARGETS,
    AmdCompileResult,
    CompileResult,
    compile_report,
    format_table,
    parse_amdgcn,
)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Every build for sm_80, sm_90, gfx942, gfx90a, and the directory holding the AMD listings."""
    asm_dir = tmp_path_factory.mktemp("amdgcn")
    return compile_report((80, 90, *AMD_TARGETS), asm_dir=asm_dir), asm_dir


@pytest.fixture(scope="module")
def results(builds):
    """The CUDA builds."""
    return [r for r in builds[0] if isinstance(r, CompileResult)]


@pytest.fixture(scope="module")
def amd(builds):
    """The AMD builds, and the directory holding their amdgcn listings."""
    return [r for r in builds[0] if isinstance(r, AmdCompileResult)], builds[1]


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


def test_amd_compiles_at_every_nvidia_config_without_spills(amd, results):
    builds, _ = amd
    table = format_table(builds)
    assert builds and all(isinstance(r, AmdCompileResult) for r in builds)
    assert all(r.error is None for r in builds), table
    assert all(r.vgpr_spills == r.sgpr_spills == r.scratch_bytes == 0 for r in builds), table
    # 512 VGPRs per lane at most on CDNA2/3; 1 to 8 waves per SIMD; a CU has 64 KiB of LDS
    assert all(0 < r.vgprs <= 512 and 0 < r.sgprs and 1 <= r.occupancy <= 8 for r in builds), table
    assert all(r.lds_bytes <= 65536 and r.threads == 64 * r.num_warps <= 1024 for r in builds), table
    assert all(r.ok for r in builds), table
    # every (kernel, autotune config) compiled for NVIDIA, for each AMD target and dtype
    nvidia_configs = {(r.kernel, r.block_v, r.num_warps) for r in results}
    for target in AMD_TARGETS:
        for dtype in ("fp32", "bf16"):
            built = {
                (r.kernel, r.block_v, r.num_warps) for r in builds if (r.target, r.dtype) == (target, dtype)
            }
            assert built == nvidia_configs, (target, dtype)
    assert {(r.kernel, r.variant) for r in builds} == {(r.kernel, r.variant) for r in results}
    assert "VGPR" in table and "occupancy" in table and "gfx942" in table and "gfx90a" in table


def _one(pattern: str, text: str) -> int:
    found = re.findall(pattern, text, re.M)
    assert len(found) == 1, (pattern, found)
    return int(found[0])


def test_amdgcn_metadata_parsed_from_the_real_listings(amd):
    """`parse_amdgcn` (the code-object metadata) agrees with the listing's kernel descriptor and the
    compiler's resource comments, read here independently, and with what the report holds."""
    builds, asm_dir = amd
    listings = sorted(Path(asm_dir).glob("*.amdgcn"))
    assert len(listings) == len(builds)
    by_name = {
        f"{r.kernel}-{r.variant}-{r.dtype}-{r.target}-BLOCK_V{r.block_v}-w{r.num_warps}.amdgcn": r
        for r in builds
    }
    for path in listings:
        asm = path.read_text()
        usage = parse_amdgcn(asm)
        assert usage["vgprs"] == _one(r"^; TotalNumVgprs: (\d+)$", asm) == _one(r"^; NumVgprs: (\d+)$", asm)
        assert usage["agprs"] == _one(r"^; NumAgprs: (\d+)$", asm)
        assert usage["sgprs"] == _one(r"^; TotalNumSgprs: (\d+)$", asm)
        assert usage["scratch_bytes"] == _one(r"^; ScratchSize: (\d+)$", asm)
        assert usage["scratch_bytes"] == _one(r"^\s*\.amdhsa_private_segment_fixed_size (\d+)$", asm)
        assert usage["lds_static_bytes"] == _one(r"^\s*\.amdhsa_group_segment_fixed_size (\d+)$", asm)
        assert usage["wavefront_size"] == 64
        r = by_name[path.name]
        assert (r.vgprs, r.agprs, r.sgprs, r.scratch_bytes) == (
            usage["vgprs"],
            usage["agprs"],
            usage["sgprs"],
            usage["scratch_bytes"],
        )
        assert r.occupancy <= usage["occupancy"] and r.lds_bytes >= usage["lds_static_bytes"]


def test_a_spill_in_the_amd_listing_fails_the_build(amd):
    """A real listing with its spill counts raised: parsed as spilled, reported as SPILL, not ok."""
    builds, asm_dir = amd
    path = next(Path(asm_dir).glob("logprobs_fwd_kernel-*-gfx942-*.amdgcn"))
    asm = path.read_text()
    assert re.search(r"\.vgpr_spill_count:\s+0$", asm, re.M)
    spilled = re.sub(r"(\.vgpr_spill_count:\s+)0$", r"\g<1>3", asm, flags=re.M)
    spilled = re.sub(r"(\.sgpr_spill_count:\s+)0$", r"\g<1>2", spilled, flags=re.M)
    usage = parse_amdgcn(spilled)
    assert (usage["vgpr_spills"], usage["sgpr_spills"]) == (3, 2)
    ok = builds[0]
    bad = AmdCompileResult(
        **{**ok.__dict__, "vgpr_spills": usage["vgpr_spills"], "sgpr_spills": usage["sgpr_spills"]}
    )
    assert ok.ok and not bad.ok
    assert "SPILL" in format_table([bad]) and "3/2" in format_table([bad])
    scratch = AmdCompileResult(**{**ok.__dict__, "scratch_bytes": 16})
    assert not scratch.ok
    # one kernel's metadata only; a key missing is an error, not a zero
    with pytest.raises(ValueError, match="sgpr_count"):
        parse_amdgcn(re.sub(r"^\s*\.sgpr_count:.*$", "", asm, flags=re.M))
    with pytest.raises(ValueError, match="amdgpu_metadata"):
        parse_amdgcn("v_add_f32 v0, v1, v2")


def test_compile_report_rejects_bad_arguments():
    with pytest.raises(ValueError, match="targets"):
        compile_report(("sm_90",))
    with pytest.raises(ValueError, match="targets"):
        compile_report(("gfx1100",))
    with pytest.raises(ValueError, match="kernels"):
        compile_report((90,), kernels=("no_such_kernel",))
    with pytest.raises(ValueError, match="asm_dir"):
        compile_report(("gfx942",), asm_dir="/no/such/directory")


def test_one_table_per_vendor_in_the_order_of_the_targets(builds):
    lines = format_table(builds[0]).splitlines()
    amd_header = next(i for i, line in enumerate(lines) if line.split()[5:8] == ["VGPR", "AGPR", "SGPR"])
    assert lines[0].split()[5:9] == ["regs", "spill", "B", "smem"]
    cuda_rows, amd_rows = lines[2 : amd_header - 1], lines[amd_header + 2 :]
    assert [row.split()[3] for row in cuda_rows] == sorted(
        (row.split()[3] for row in cuda_rows), key=["sm_80", "sm_90"].index
    )
    assert {row.split()[3] for row in amd_rows} == set(AMD_TARGETS)
    assert [r.target for r in builds[0]] == sorted(
        (r.target for r in builds[0]), key=[80, 90, *AMD_TARGETS].index
    )


def test_lds_caps_the_amd_occupancy():
    """Workgroups per CU that fit its 64 KiB of LDS, times waves per workgroup, over 4 SIMDs; at most 8."""
    from prefloss.commands.compile_report import _lds_occupancy

    assert _lds_occupancy(32 * 1024, 4, 65536) == 2  # 2 workgroups of 4 waves on 4 SIMDs
    assert _lds_occupancy(16 * 1024, 8, 65536) == 8  # 4 workgroups of 8 waves: 8 per SIMD
    assert _lds_occupancy(64, 16, 65536) == 8 and _lds_occupancy(0, 4, 65536) == 8
