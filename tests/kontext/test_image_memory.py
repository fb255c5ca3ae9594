"""The real memory of a member image's check stays within what it reserves in the decode budget,
and within the budget itself: measured as the peak resident memory of a fresh interpreter that
checks one file (libjpeg's allocations are not Python's, so tracemalloc cannot see them)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from kontext.errors import InputError
from kontext.images import budget, inspect_image
from kontext.images.budget import MIB

ROOT = Path(__file__).resolve().parents[2]

MEASURE = """
import json, sys
from kontext.images import cost, inspect_image

def status(field):
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024

data = open(sys.argv[1], "rb").read()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from what is resident now
base = status("VmRSS")
info = inspect_image(data, which=1, max_bytes=64 << 20, max_pixels=50_000_000)
peak = status("VmHWM")
print(json.dumps({"peak": peak - base, "cost": cost.check_cost(data, info.format,
                  (info.width, info.height))}))
"""


def _progressive_jpeg(path: Path, size: tuple[int, int], mode: str, subsampling: int) -> Path:
    """A smooth (so small: ~0.5 MiB at 40 MP) progressive JPEG."""
    img = Image.linear_gradient("L").resize(size).convert(mode)
    out = io.BytesIO()
    img.save(out, "JPEG", progressive=True, quality=30, subsampling=subsampling)
    del img
    path.write_bytes(out.getvalue())
    return path


def _measure(path: Path) -> tuple[int, int]:
    """``(peak bytes over the baseline, bytes the check reserves)`` of checking ``path``."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)], cwd=ROOT, capture_output=True, text=True,
        check=True, timeout=120,
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return int(found["peak"]), int(found["cost"])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize(
    ("size", "mode", "subsampling"),
    [
        ((7300, 5480), "RGB", 0),  # 40 MP 4:4:4: ~232 MiB of coefficients
        ((7300, 5480), "CMYK", 0),  # 40 MP CMYK: ~308 MiB
        ((5000, 4000), "RGB", 0),  # 20 MP 4:4:4: decoded (reduced), within the budget
        ((7300, 5480), "RGB", 2),  # 40 MP 4:2:0: decoded (reduced), within the budget
    ],
    ids=["40mp-444", "40mp-cmyk", "20mp-444", "40mp-420"],
)
def test_a_progressive_jpeg_is_checked_within_the_decode_budget(
    tmp_path: Path, size: tuple[int, int], mode: str, subsampling: int
) -> None:
    path = _progressive_jpeg(tmp_path / "in.jpg", size, mode, subsampling)
    assert path.stat().st_size < MIB
    peak, reserved = _measure(path)
    assert peak <= reserved <= budget.DECODE_BUDGET_BYTES, (peak / MIB, reserved / MIB)


def test_an_over_budget_progressive_jpeg_cut_short_is_refused(tmp_path: Path) -> None:
    data = _progressive_jpeg(tmp_path / "in.jpg", (7300, 5480), "RGB", 0).read_bytes()
    for cut in (len(data) // 2, len(data) - 2):
        with pytest.raises(InputError) as info:
            inspect_image(data[:cut], which=2, max_bytes=64 << 20, max_pixels=50_000_000)
        assert info.value.key == "input.unreadable"
    assert inspect_image(data, which=2, max_bytes=64 << 20, max_pixels=50_000_000).width == 7300
