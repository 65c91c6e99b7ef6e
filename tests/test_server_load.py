"""A bounded fault load on a real server (127.0.0.1): 32 concurrent clients mixing adapters,
streaming, cancelled streams and poison requests (benchmarks/bench_server_faults.py, smaller).

Every good request must get its solo answer (innocent failures: 0), every poison its own answer
(a 400 in OpenAI's shape, or, for the extreme-but-valid sampling settings, the greedy answer),
and the server must still answer afterwards. No timing is asserted.
"""
import json
import os
import sys
import urllib.request

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_server_faults as load  # noqa: E402

REQUESTS = 256


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    for name in ("fastapi", "uvicorn"):
        pytest.importorskip(name)
    pytest.importorskip("httpx2" if load.httpx().__name__ == "httpx2" else "httpx")
    assets = load.make_assets(str(tmp_path_factory.mktemp("load")))
    proc, url = load.start_server(assets)
    yield proc, url
    proc.terminate()
    proc.wait(timeout=30)


def test_fault_load_has_no_innocent_failures(served):
    proc, url = served
    before = load.rss_mib(proc.pid)
    run = load.run_load(url, REQUESTS, clients=32, seed=1)
    print(json.dumps({**run, "rss_before_mib": before, "rss_after_mib": load.rss_mib(proc.pid)}))
    assert run["innocent_failure_count"] == 0, run["innocent_failures"]
    assert run["good"] > 100 and run["cancelled"] > 0
    kinds = {k.split(":")[0] for k in run["poison_answers"]}
    assert len(kinds) >= 6, run["poison_answers"]   # most poison kinds were sent
    for answer in run["poison_answers"]:
        name, status = answer.split(": ", 1)
        want = "200 (greedy answer)" if name in ("temperature 1e-40", "top_p 1e-300") else "400"
        assert status == want, run["poison_answers"]
    assert urllib.request.urlopen(url + "/health", timeout=30).read() == b"ok"
