"""What an installed wheel must do on a machine with no server, no protoc and no Rust:
scripts/test builds the wheel, installs it into an empty virtual environment (nothing else in
it) and feeds this file to that environment's Python on stdin, in a directory outside the
checkout (so that the source tree is not on sys.path).
"""

import os
import sys
import tempfile

import palisade

work = tempfile.mkdtemp(prefix="palisade-smoke-")
assert os.path.dirname(palisade.__file__).startswith(sys.prefix), (
    f"palisade was imported from {palisade.__file__}, not from the environment {sys.prefix}"
)

local = palisade.RateLimiter.local("2/min")
assert [local.check("k").allowed for _ in range(3)] == [True, True, False]
shared = palisade.RateLimiter.file(os.path.join(work, "limits"), "1/min")
assert [shared.check("k").allowed for _ in range(2)] == [True, False]

api = palisade.breaker("smoke", minimum_calls=2, sliding_window=2)
assert api.call(lambda: 42) == 42

jobs = palisade.Coordinator.file(os.path.join(work, "locks"))
with jobs.lock("nightly") as guard:
    assert guard.fencing_token >= 1
ran = jobs.run_exclusive("nightly", lambda: "done")
assert ran.ran and ran.value == "done", ran

calls = []
store = "file://" + os.path.join(work, "once")
for _ in range(2):
    assert palisade.once("invoice-42", lambda: calls.append(1) or "sent", store=store) == "sent"
assert calls == [1], "once ran twice"

src, dest = os.path.join(work, "src"), os.path.join(work, "dest")
for day in ("2024-01-01", "2024-01-02"):
    os.makedirs(os.path.join(src, f"date={day}"))
    with open(os.path.join(src, f"date={day}", "part-0.csv"), "w") as f:
        f.write(f"id,day\n1,{day}\n")
first = palisade.publish(src, "file://" + dest)
again = palisade.publish(src, "file://" + dest)
assert first["written"] == ["date=2024-01-01", "date=2024-01-02"], first
assert again["written"] == [], f"the rerun wrote again: {again}"
with open(os.path.join(dest, "date=2024-01-02", "part-0.csv")) as f:
    assert f.read() == "id,day\n1,2024-01-02\n"
print("palisade wheel smoke test: ok", palisade.__file__)
