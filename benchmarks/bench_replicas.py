"""Losing a replica: how long from a model node's death to the next good answer, and how many messages are lost.

    python benchmarks/bench_replicas.py [--rounds 3] [--people 6] [--before-s 15] [--after-s 20]

Two real model agents (llama-server on the tiny generated GGUF behind the mTLS gateway) and the real chat agent
routing over both (clawbot.chat.upstreams), all on this machine's loopback. `--people` clients send messages
one after another (a new conversation each) through the chat node's conversation API. After `--before-s`, one
model agent is killed (SIGKILL, as a power cut or the OOM killer would; its llama-server dies with it). Per round:

- lost: messages that did not end as a complete reply from the model (`source` model, `status` complete);
- in flight at the kill: messages sent before and not finished at the kill (the most the policy allows to fail);
- first good answer: from the kill to the end of the first message sent after it that the model answered;
- all new on the survivor: every message sent after the kill, answered by the model (a count of those that were not).

Results: benchmarks/results/replicas.json and replicas.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from fixtures_chat import ChatAgent, ModelAgent, chat_config, make_cluster_pki, model_config, parse_sse  # noqa: E402
from tests.fixtures_models import write_model_file  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def send(client, conversation: str, text: str) -> dict:
    sent = time.monotonic()
    try:
        with client.stream("POST", f"/api/conversations/{conversation}/messages", json={"content": text}) as r:
            body = r.read().decode() if r.status_code == 200 else ""
        done = parse_sse(body).of("done")
        message = done[-1]["message"] if done else {}
    except Exception as exc:  # noqa: BLE001 - a lost message is what is measured
        message = {"status": "broken", "error": str(exc)}
    return {"sent": sent, "ended": time.monotonic(), "source": message.get("source"), "status": message.get("status")}


def one_round(work: Path, people: int, before_s: float, after_s: float) -> dict:
    pki_ = make_cluster_pki(work / "pki")
    (work / "models").mkdir()
    model = write_model_file(work / "models")
    agents = [ModelAgent(model_config(pki_, model, context_window=1024, max_tokens=48), work / f"model-{n}", pki_)
              for n in range(2)]
    for agent in agents:
        agent.start()
    for agent in agents:
        agent.wait_ready()
    config = chat_config(pki_, work / "chat", agents[0].endpoint, context_window=1024, max_tokens=48)
    config["model_gateway"]["upstreams"] = [a.endpoint for a in agents]
    chat = ChatAgent(config, work / "chat", pki_)
    chat.start()
    chat.wait_ready()
    results: list[dict] = []
    stop = threading.Event()
    try:
        clients = [chat.client(timeout=120) for _ in range(people)]

        def person(client):
            while not stop.is_set():
                conversation = client.post("/api/conversations", json={}).json()["id"]
                results.append(send(client, conversation, "Hello, how are you today?"))

        threads = [threading.Thread(target=person, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        time.sleep(before_s)
        killed_at = time.monotonic()
        os.kill(agents[0].proc.pid, signal.SIGKILL)
        time.sleep(after_s)
        stop.set()
        for t in threads:
            t.join(timeout=180)
        for c in clients:
            c.close()
    finally:
        chat.stop()
        for agent in agents:
            agent.stop()
    good = [r for r in results if r["source"] == "model" and r["status"] == "complete"]
    in_flight = [r for r in results if r["sent"] < killed_at < r["ended"]]
    after = [r for r in results if r["sent"] >= killed_at]
    first_good = min((r["ended"] for r in good if r["sent"] >= killed_at), default=None)
    return {"messages": len(results), "answered": len(good), "lost": len(results) - len(good),
            "in_flight_at_kill": len(in_flight),
            "lost_of_in_flight": sum(1 for r in in_flight if r not in good),
            "sent_after_kill": len(after), "not_answered_after_kill": sum(1 for r in after if r not in good),
            "first_good_answer_after_kill_s": None if first_good is None else round(first_good - killed_at, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--people", type=int, default=6)
    parser.add_argument("--before-s", type=float, default=15)
    parser.add_argument("--after-s", type=float, default=20)
    args = parser.parse_args()
    rounds = []
    for n in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="bench-replicas-") as work:
            rounds.append(one_round(Path(work), args.people, args.before_s, args.after_s))
            print(json.dumps(rounds[-1]), flush=True)
    firsts = [r["first_good_answer_after_kill_s"] for r in rounds if r["first_good_answer_after_kill_s"] is not None]
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_average": os.getloadavg()},
              "settings": vars(args), "rounds": rounds,
              "summary": {"lost": sum(r["lost"] for r in rounds),
                          "in_flight_at_kill": sum(r["in_flight_at_kill"] for r in rounds),
                          "not_answered_after_kill": sum(r["not_answered_after_kill"] for r in rounds),
                          "first_good_answer_after_kill_s_median": statistics.median(firsts) if firsts else None}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "replicas.json").write_text(json.dumps(report, indent=2) + "\n")
    s = report["summary"]
    lines = ["# Losing a replica (bench_replicas.py)", "",
             f"{args.rounds} rounds, {args.people} people sending one message after another, one of two model "
             f"agents SIGKILLed after {args.before_s:g} s, {args.after_s:g} s more. Tiny generated model, loopback, "
             f"{os.cpu_count()} cores (load {os.getloadavg()[0]:.1f}).", "",
             "| round | messages | lost | in flight at the kill | sent after the kill, not answered | first good answer after the kill |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {n + 1} | {r['messages']} | {r['lost']} | {r['in_flight_at_kill']} | {r['not_answered_after_kill']} "
              f"| {r['first_good_answer_after_kill_s']} s |" for n, r in enumerate(rounds)]
    lines += ["", f"In all: {s['lost']} lost of {s['in_flight_at_kill']} in flight at the kill; "
              f"{s['not_answered_after_kill']} sent after it not answered; first good answer after the kill, median "
              f"{s['first_good_answer_after_kill_s_median']} s.", ""]
    (RESULTS / "replicas.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
