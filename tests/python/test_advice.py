"""The daemon's checkpoint advice through the Python client and `tierckpt status`: a preemption notice file
appears, then goes."""

import json
import os
import time

import pytest

from conftest import run_daemon, tierckpt, wait_until
from tierckpt import Client


@pytest.fixture
def noticed_daemon():
    yield from run_daemon("--preemption-notice", "{dir}/notice", "--preemption-notice-every", "50ms",
                          "--preemption-grace", "20s")


def test_client_advice_follows_a_notice_file(noticed_daemon):
    c = Client(noticed_daemon["socket"])
    quiet = c.advice("job")
    assert quiet["save_now"] is False and quiet["events"] == [] and "preemption" not in quiet, quiet
    notice = os.path.join(noticed_daemon["dir"], "notice")
    with open(notice, "w") as f:
        f.write("spot reclaim")
    a = wait_until(lambda: (lambda a: a if "preemption" in a else None)(c.advice("job")), 30, "the notice")
    assert a["save_now"] is True
    assert a["preemption"]["detail"] == "spot reclaim"
    assert a["preemption"]["deadline_unix_ms"] >= time.time() * 1000 + 15_000
    (e,) = a["events"]
    assert e["kind"] == "preemption" and e["detail"] == "preemption notice: spot reclaim" and e["id"] > 0
    shown = json.loads(tierckpt(noticed_daemon["socket"], "status", "--json").stdout)["advice"]
    assert shown["preemption"]["detail"] == "spot reclaim" and shown["events"][0]["id"] == e["id"]
    text = tierckpt(noticed_daemon["socket"], "status").stdout
    assert "PREEMPTION" in text and "preemption notice: spot reclaim" in text, text
    os.remove(notice)
    a = wait_until(lambda: (lambda a: a if "preemption" not in a else None)(c.advice("job")), 30, "the notice gone")
    assert a["save_now"] is True and [x["id"] for x in a["events"]] == [e["id"]], a
