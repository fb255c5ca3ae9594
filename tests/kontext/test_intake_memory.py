"""Real memory of image intake, measured in a fresh process (issue 10).

Ten members' 40 MP PNGs (130 KB each on the wire, 160 MB each as a Pillow decode) checked at
once through :func:`kontext.images.fetch_and_check` from a local HTTP server must not grow the
process by more than 200 MiB. Before the shared decode budget and the streamed PNG check, the
same run grew it by ~870 MiB. The peak is VmHWM after resetting it (``/proc/self/clear_refs``)
once the server, the session and one warm-up check are in place, minus the RSS at that moment.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SIDE = 6324  # 39,992,976 pixels: just under the 40 MP limit

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, re, sys
    import aiohttp
    from aiohttp import web
    from kontext import images

    data = open(sys.argv[1], "rb").read()
    small = open(sys.argv[2], "rb").read()

    def status(field):
        text = open("/proc/self/status").read()
        return int(re.search(field + r":\\s+(\\d+) kB", text).group(1)) * 1024

    async def main():
        app = web.Application()
        app.router.add_get("/big/{n}", lambda r: web.Response(body=data, content_type="image/png"))
        app.router.add_get("/small", lambda r: web.Response(body=small, content_type="image/png"))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        hosts = images.input_hosts(base)
        limits = dict(declared_size=None, max_bytes=20 * 2**20, max_pixels=40_000_000,
                      allowed_hosts=hosts)
        async with aiohttp.ClientSession() as session:
            await images.fetch_and_check(session, base + "/small", which=1, **limits)  # warm up
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            before = status("VmRSS")
            results = await asyncio.gather(*(
                images.fetch_and_check(session, f"{base}/big/{n}", which=1 + n % 2, **limits)
                for n in range(10)
            ))
            peak = status("VmHWM")
        await runner.cleanup()
        print(json.dumps({"before": before, "peak": peak,
                          "sizes": sorted({i.width for _, i in results})}))

    asyncio.run(main())
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_ten_concurrent_40mp_checks_grow_rss_by_at_most_200_mib(tmp_path: Path) -> None:
    big, small = tmp_path / "big.png", tmp_path / "small.png"
    out = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), (40, 120, 200)).save(out, "PNG")
    big.write_bytes(out.getvalue())
    out = io.BytesIO()
    Image.linear_gradient("L").save(out, "PNG")
    small.write_bytes(out.getvalue())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(big), str(small)], capture_output=True, text=True,
        env=env, timeout=60, check=False,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["sizes"] == [SIDE]
    growth_mib = (result["peak"] - result["before"]) / 2**20
    print(f"RSS growth for 10 concurrent 40 MP checks: {growth_mib:.1f} MiB")
    assert growth_mib <= 200, growth_mib
