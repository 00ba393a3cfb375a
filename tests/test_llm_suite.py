"""The `llm` handler on a live suite, against the local OpenAI-compatible server: the
tokens the ledger commits are the ones the server reported (or the flagged count), a
429 is retried, an auth failure keeps its category, a cancel closes the connection,
`cortex budget` shows the use, and no key is left in any file under the home."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from cortex.loadtest.openai_server import OpenAIServer
from cortex.protocol import Client
from tests.conftest import suite_config, wait_for

FILE_KEY = "sk-live-file-key-1111222233334444"
ENV_KEY = "sk-live-env-key-5555666677778888"


def config(server: OpenAIServer, key_file) -> str:
    return suite_config(1, ("echo",), snapshot_interval=1.0,
                        tables='[ledger.budgets."type:llm"]\nlimit = 1000000\n', extra=f"""
[pool.groups.llm]
count = 3
types = ["llm"]
[providers.filekey]
base_url = "{server.base_url}"
model = "plain"
api_key_file = "{key_file}"
timeout = 10
[providers.envkey]
base_url = "{server.base_url}"
model = "plain"
api_key_env = "H6_LIVE_KEY"
[providers.wrongkey]
base_url = "{server.base_url}"
model = "plain"
api_key_env = "H6_LIVE_WRONG_KEY"
""")


def files_holding(home, secrets: list[str]) -> list[str]:
    found = []
    for path in home.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {s[:12]}..." for s in secrets if s.encode() in data]
    return found


def test_llm_tasks_on_a_live_suite_commit_what_the_provider_reported(suites, tmp_path,
                                                                     monkeypatch):
    key_file = tmp_path / "openai.key"
    key_file.write_text(FILE_KEY)
    key_file.chmod(0o600)
    monkeypatch.setenv("H6_LIVE_KEY", ENV_KEY)
    monkeypatch.setenv("H6_LIVE_WRONG_KEY", "sk-live-wrong-key-999900001111")
    with OpenAIServer(api_key={FILE_KEY, ENV_KEY}) as server:
        suite = suites.start(config(server, key_file))
        home = suite.home
        cases = {
            "stream": ({"provider": "filekey", "model": "live-stream;n=30"}, 500),
            "whole": ({"provider": "envkey", "model": "live-whole;n=7", "stream": False}, 500),
            "no-usage": ({"provider": "filekey", "model": "live-nousage;usage=0;n=11"}, 500),
            "runaway": ({"provider": "filekey", "model": "live-runaway;n=5000;ignore_max=1"},
                        200),
            "429": ({"provider": "envkey",
                     "model": "live-429;status=429;retry_after=0.2;fail_times=1;n=4"}, 500),
        }
        with Client(home) as client:
            ids = {name: client.submit("llm", f"say {name}", tokens=tokens, payload=payload,
                                       retries=0)["id"]
                   for name, (payload, tokens) in cases.items()}
            done = {name: client.wait(task_id, timeout=120) for name, task_id in ids.items()}
            for name, task in done.items():
                assert task["state"] == "completed", (name, task.get("error"))
            # Reported usage is what is committed, exactly.
            for name in ("stream", "whole", "429"):
                model = cases[name][0]["model"]
                reported = [r["usage"] for r in server.of_model(model) if r["usage"]]
                assert len(reported) == 1
                assert done[name]["tokens_used"] == reported[0]["total_tokens"], name
                assert done[name]["result"]["estimated"] is False
            assert done["429"]["result"]["throttled"] == 1
            # No usage: the counted tokens, flagged.
            for name in ("no-usage", "runaway"):
                result = done[name]["result"]
                assert result["estimated"] is True
                assert done[name]["tokens_used"] == result["usage"]["total_tokens"]
            assert done["runaway"]["tokens_used"] <= 200
            assert done["runaway"]["result"]["finish_reason"] == "length"

            # The ledger committed exactly the sum, visible in `cortex budget`.
            expected = sum(t["tokens_used"] for t in done.values())

            def committed():
                rows = {b["scope"]: b for b in client.budget()["budgets"]}
                return rows["type:llm"]["committed"] == expected and rows["type:llm"]

            wait_for(committed, 30, "the ledger to commit the llm tokens")
            shown = subprocess.run([sys.executable, "-m", "cortex.services.cli", "budget",
                                    "--home", str(home), "--json"], capture_output=True,
                                   text=True, timeout=60)
            rows = {b["scope"]: b for b in json.loads(shown.stdout)}
            assert rows["type:llm"]["committed"] == expected

            # A wrong key: failed, in its category, the echoed key nowhere.
            wrong = client.wait(client.submit("llm", "who am i", tokens=300, retries=0,
                                              payload={"provider": "wrongkey",
                                                       "model": "live-wrong"})["id"],
                                timeout=60)
            assert wrong["state"] == "failed" and wrong["error"]["category"] == "auth"
            assert "[key]" in wrong["error"]["message"]

            # A cancel closes the provider connection at once.
            hung = client.submit("llm", "hang", tokens=300, retries=0,
                                 payload={"provider": "filekey", "model": "live-hang;hang=1"})
            request = wait_for(lambda: (server.of_model("live-hang") or [None])[-1], 60,
                               "the hanging request to reach the server")
            cancelled_at = time.monotonic()
            client.cancel(hung["id"])
            wait_for(lambda: request["closed_at"], 30, "the connection to close on cancel")
            print(f"\nlive cancel: connection closed "
                  f"{1000 * (request['closed_at'] - cancelled_at):.1f} ms after the cancel call")
            assert client.wait(hung["id"], timeout=30)["state"] == "cancelled"
        suite.stop()
        assert files_holding(home, [FILE_KEY, ENV_KEY, "sk-live-wrong-key-999900001111"]) == []
        assert any(home.rglob("events-*.jsonl"))  # the grep did look at the event log
