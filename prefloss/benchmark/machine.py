"""The machine and software versions, recorded in every report."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_family_model() -> dict[str, str | None]:
    """``{"vendor", "family", "model"}`` of the CPU (x86 ``/proc/cpuinfo``; ``None`` elsewhere):
    two VMs both sold as "AMD EPYC" can be different machines (family 25 model 1, family 26 model 2),
    and step/floor ratios differ between them, so every report names which one it ran on."""
    fields = _cpuinfo()
    return {
        "vendor": fields.get("vendor_id"),
        "family": fields.get("cpu family"),
        "model": fields.get("model"),
    }


def _cpu_model() -> str:
    fields = _cpuinfo()
    if not fields:
        return platform.processor() or platform.machine()
    name = fields.get("model name", platform.machine())
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return name


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def source_digest() -> str:
    """sha256 (12 hex) over prefloss's Python sources: which code a result was measured on."""
    import hashlib
    from pathlib import Path

    import prefloss

    root = Path(prefloss.__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        if "benchmark" not in path.parts:
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def describe(device: str) -> dict:
    import torch

    info = {
        "cpu": _cpu_model(),
        "cpu_id": cpu_family_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _mem_total_gib(),
        "platform": platform.platform(),
        "device": device,
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()]
        if hasattr(os, "getloadavg")
        else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "triton": _version("triton"),
            "liger-kernel": _version("liger-kernel"),
            "trl": _version("trl"),
            "prefloss": _version("prefloss"),
            "prefloss_source_sha256": source_digest(),
        },
    }
    return info


def one_line(info: dict) -> str:
    v = info["versions"]
    where = info["gpu"] if info["device"].startswith("cuda") and info["gpu"] else info["cpu"]
    return (
        f"{where} | {info['cores']} cores, {info['torch_threads']} torch threads, {info['memory_gib']} GiB | "
        f"python {v['python']}, torch {v['torch']}, triton {v['triton']}, liger-kernel {v['liger-kernel']}, "
        f"trl {v.get('trl')}, "
        f"prefloss {v['prefloss']}"
    )
