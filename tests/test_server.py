"""`serve` as a client sees it: a server started here on 127.0.0.1 with the tiny model. The
references are the `openai` client's own parsing, and in-process Sessions that run each
conversation alone (the answers must match: no cross-talk between slots)."""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import random
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from flowmm_edge.app.session import Session

from greedy_reference import GreedyReference

MSG1 = [{"role": "user", "content": "the secret key is red and the code is 1234"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(tiny_models, *args):
    port = free_port()
    model = [] if "-m" in args else ["-m", str(tiny_models[0]), "--mmproj", str(tiny_models[1])]  # tiny by default
    cmd = [sys.executable, "-m", "flowmm_edge", "serve", *model, "--port", str(port), "-t", "2", "-n", "8", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if proc.poll() is not None:
                raise AssertionError(f"the server exited: {proc.stdout.read()}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise AssertionError("the server did not come up in 30 s")
        proc.url = url
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def srv(tiny_models):
    with server(tiny_models, "-c", "1024", "-np", "2", "--budget", "96") as proc:
        yield proc


def reference(tiny_models, turns: list[list[dict]], **kw) -> list[str]:
    """Each request of one conversation, answered by an in-process Session alone."""
    with Session(tiny_models[0], tiny_models[1], budget=96, n_ctx=1024, max_reply=8, n_threads=2) as s:
        return [s.create_chat_completion(m, temperature=0, **kw)["choices"][0]["message"]["content"] for m in turns]


def client(srv, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_health_models_and_metrics(srv, tiny_models):
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    models = client(srv).models.list()
    assert [m.id for m in models.data] == [tiny_models[0].name]
    text = httpx.get(srv.url + "/metrics").text
    assert "flowmm_kv_cells_total 1024" in text and 'flowmm_kv_slot_cells{slot="1"}' in text
    # the tiny model has no policy: its merges teach a predictor (self-distillation)
    assert 'flowmm_importance_state{state="learning"} 1' in text and 'flowmm_importance_state{state="repeat"} 0' in text
    assert "flowmm_importance_learned_tokens " in text


def test_the_openai_client_chats_and_streams(srv, tiny_models):
    c = client(srv)
    r = c.chat.completions.create(model="x", messages=MSG1, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.usage.completion_tokens <= 8
    chunks = list(c.chat.completions.create(model="x", messages=MSG1, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert r.choices[0].message.content == streamed == reference(tiny_models, [MSG1])[0]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_concurrent_conversations_keep_their_own_answers_and_reuse_their_slots(srv, tiny_models):
    convs = {"a": ["the secret key is red and the code is 1234", "what is the code", "and the key"],
             "b": ["dogs are here in the picture of the city", "how many dogs", "what city is it"]}
    got, usage, errors = {}, {}, []

    def talk(name):
        try:
            c, msgs, answers, prompts = client(srv), [], [], []
            for text in convs[name]:
                msgs.append({"role": "user", "content": text})
                r = c.chat.completions.create(model="x", messages=list(msgs), max_tokens=8, temperature=0)
                answers.append(r.choices[0].message.content)
                prompts.append((r.usage.prompt_tokens, r.usage.prompt_tokens_details.cached_tokens))
                msgs.append({"role": "assistant", "content": answers[-1]})
            got[name], usage[name] = answers, prompts
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=talk, args=(n,)) for n in convs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for name, texts in convs.items():
        history, requests = [], []
        for k, text in enumerate(texts):
            history = history + [{"role": "user", "content": text}]
            requests.append(list(history))
            history = history + [{"role": "assistant", "content": got[name][k]}]
        assert got[name] == reference(tiny_models, requests)
        turns = usage[name]  # later turns decoded only their new messages: the turns before were held
        assert all(cached >= before for (_, cached), (before, _) in zip(turns[1:], turns)), turns


def test_a_new_conversation_keeps_the_slots_same_first_tokens_unless_cache_prompt_is_false(tiny_models):
    """One slot: a second conversation with the same system message decodes only what follows
    the tokens both begin with (usage's cached_tokens, llama-server's cache_prompt), and with
    "cache_prompt": false the whole prompt; the replies are the conversations' decoded alone."""
    system = {"role": "system", "content": "you answer about cats and the city " * 3}
    convs = [[system, {"role": "user", "content": text}]
             for text in ("the secret key is red", "dogs are in the city", "what color is the cat")]
    with server(tiny_models, "-c", "512", "-np", "1", "--method", "full") as s:
        got = []
        for msgs, keep in zip(convs, (True, True, False)):
            r = httpx.post(s.url + "/v1/chat/completions", timeout=60,
                           json={"messages": msgs, "max_tokens": 6, "temperature": 0, "logprobs": True,
                                 "cache_prompt": keep}).json()
            got.append((r["usage"]["prompt_tokens"], r["usage"]["prompt_tokens_details"]["cached_tokens"],
                        [bytes(e["bytes"]) for e in r["choices"][0]["logprobs"]["content"]]))
    (_, first, _), (n, kept, _), (_, afresh, _) = got
    assert first == 0 and afresh == 0 and 30 < kept < n, got
    for msgs, (_, _, pieces) in zip(convs, got):
        with GreedyReference(tiny_models[0], 6) as ref:
            ref.feed(msgs)
            ref.check(pieces=pieces)


def test_a_new_conversation_goes_to_the_free_slot_that_shares_its_system_prompt(tiny_models):
    """llama-server's slot prompt similarity: two slots hold conversations under two system
    prompts; a new conversation under the second goes to that slot, though the other is the one
    used least recently, and keeps the cells of the system prompt (usage's cached_tokens at
    least its rendering, less the template's seam); the reply is the conversation's decoded alone."""
    from flowmm_edge.bindings import runtime

    systems = [{"role": "system", "content": text * 3} for text in ("you answer about cats and the city ",
                                                                   "you are a terse assistant for dogs ")]
    convs = [[systems[0], {"role": "user", "content": "the secret key is red"}],
             [systems[1], {"role": "user", "content": "dogs are in the city"}],
             [systems[1], {"role": "user", "content": "what color is the cat"}]]
    with server(tiny_models, "-c", "512", "-np", "2", "--method", "full") as s:
        got = []
        for msgs in convs:
            r = httpx.post(s.url + "/v1/chat/completions", timeout=60,
                           json={"messages": msgs, "max_tokens": 6, "temperature": 0, "logprobs": True}).json()
            got.append((r["usage"]["prompt_tokens_details"]["cached_tokens"],
                        [bytes(e["bytes"]) for e in r["choices"][0]["logprobs"]["content"]]))
    model = runtime.Model(str(tiny_models[0]))
    try:
        system_tokens = len(model.tokenize(model.format_chat([("system", systems[1]["content"])], add_assistant=False)))
    finally:
        model.close()
    assert got[0][0] == got[1][0] == 0 and got[2][0] >= system_tokens - 4, (got, system_tokens)
    with GreedyReference(tiny_models[0], 6) as ref:
        ref.feed(convs[2])
        ref.check(pieces=got[2][1])


def test_a_resent_history_goes_to_the_slot_that_holds_it(tiny_models):
    with server(tiny_models, "-c", "1024", "-np", "2", "--budget", "96") as s:
        c = client(s)

        def ask(history, text):
            history.append({"role": "user", "content": text})
            r = c.chat.completions.create(model="x", messages=list(history), max_tokens=4, temperature=0)
            history.append({"role": "assistant", "content": r.choices[0].message.content})
            return r.usage.prompt_tokens - r.usage.prompt_tokens_details.cached_tokens  # decoded now

        a, b, filler = [], [], " and the cat sat on the mat" * 4
        first_a = ask(a, "the secret key is red and the code is 1234" + filler)
        first_b = ask(b, "dogs are in the city" + filler)
        # b's slot is the one used last: the least recently used free slot is a's, which must not be taken
        assert ask(b, "how many dogs") < first_b and ask(a, "what is the code") < first_a


def test_bad_requests_get_4xx_and_a_concurrent_good_one_still_answers(srv):
    done = {}

    def good():
        with httpx.stream("POST", srv.url + "/v1/chat/completions", timeout=60,
                          json={"messages": MSG1, "max_tokens": 8, "stream": True}) as r:
            done["lines"] = [line for line in r.iter_lines() if line.startswith("data: ")]

    t = threading.Thread(target=good)
    t.start()
    junk = "data:image/png;base64," + base64.b64encode(b"not a picture").decode()
    bad = [b"{not json", b"[1, 2]", json.dumps({"messages": "hi"}).encode(),
           json.dumps({"messages": MSG1, "max_tokens": "many"}).encode(),
           json.dumps({"messages": MSG1, "temperature": -1}).encode(),
           json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": junk}]}]}).encode(),
           json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                                  "image_url": "http://example.com/x.png"}]}]}).encode(),
           json.dumps({"messages": [{"role": "assistant", "content": "last"}]}).encode()]
    for body in bad:
        r = httpx.post(srv.url + "/v1/chat/completions", content=body, timeout=60,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"] == "invalid_request_error"
    assert httpx.get(srv.url + "/v1/nothing").status_code == 404
    t.join(60)
    assert done["lines"][-1] == "data: [DONE]" and len(done["lines"]) >= 3


def test_a_prompt_that_cannot_fit_is_refused_and_the_server_goes_on(tiny_models):
    with server(tiny_models, "-c", "256", "-np", "1", "--method", "full") as s:
        long = " ".join(["the cat sat on the mat"] * 40)
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": long}]}, timeout=60)
        assert r.status_code == 400 and "does not fit" in r.json()["error"]["message"]
        ok = httpx.post(s.url + "/v1/chat/completions", json={"messages": MSG1, "max_tokens": 4}, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_ignore_eos_runs_the_reply_to_max_tokens(srv):
    """llama-server's ignore_eos: the same request that the tiny model ends early ("stop") runs to
    its max_tokens ("length") when asked to."""
    ask = lambda **kw: httpx.post(srv.url + "/v1/chat/completions", timeout=60,  # noqa: E731
                                  json={"messages": MSG1, "max_tokens": 200, **kw}).json()
    plain, forced = ask(), ask(ignore_eos=True)
    assert plain["choices"][0]["finish_reason"] == "stop" and plain["usage"]["completion_tokens"] < 200
    assert forced["choices"][0]["finish_reason"] == "length" and forced["usage"]["completion_tokens"] == 200


def test_a_client_that_leaves_mid_stream_frees_its_slot(tiny_models):
    with server(tiny_models, "-c", "8192", "-np", "1", "--budget", "1024") as s:
        # ignore_eos: the tiny model ends this reply after 85 tokens, which a fast decode could finish
        # before the server sees the client leave (a cancel that was never needed)
        with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=60,
                          json={"messages": MSG1, "max_tokens": 6000, "stream": True, "ignore_eos": True}) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
        # the only slot is free again long before 6000 tokens: the next request is served
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": MSG1, "max_tokens": 4}, timeout=60)
        assert r.status_code == 200
        metrics = httpx.get(s.url + "/metrics").text
        assert "flowmm_requests_cancelled_total 1" in metrics, metrics
        predicted = next(float(line.split()[1]) for line in metrics.splitlines()
                         if line.startswith("flowmm_tokens_predicted_total"))
        assert predicted < 6000


def test_the_api_key_is_required_where_set(tiny_models):
    with server(tiny_models, "-c", "512", "-np", "1", "--api-key", "sesame") as s:
        assert httpx.get(s.url + "/health").status_code == 200
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": MSG1, "max_tokens": 2})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            client(s, "wrong").chat.completions.create(model="x", messages=MSG1, max_tokens=2)
        assert client(s, "sesame").chat.completions.create(model="x", messages=MSG1, max_tokens=2).choices
        # llama-server also reads Anthropic's X-Api-Key header
        body = {"messages": MSG1, "max_tokens": 2}
        assert httpx.post(s.url + "/v1/chat/completions", json=body, headers={"X-Api-Key": "sesame"}).status_code == 200
        assert httpx.post(s.url + "/v1/chat/completions", json=body, headers={"X-Api-Key": "sesam"}).status_code == 401


def fuzz_bodies(n: int, seed: int = 0) -> list[bytes]:
    """Malformed chat requests: broken JSON, wrong types, odd nesting, bad content parts."""
    rng = random.Random(seed)
    values = [None, True, -1, 0, 2 ** 70, 1e308, float("nan"), "", "x" * 3000, [], {}, [[]], {"a": {"b": []}}]
    fields = ["messages", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "n", "top_k", "min_p"]
    parts = [{"type": "image_url"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}},
             {"type": "text"}, {"type": "video"}, {"type": "text", "text": 5}, "just a string"]
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            raw = json.dumps({"messages": MSG1, "max_tokens": 4}).encode()
            cut = rng.randrange(1, len(raw) - 1)
            out.append(raw[:cut] + bytes(rng.randrange(256) for _ in range(rng.randrange(4))))
        elif kind == 1:
            body = {"messages": MSG1}
            body[rng.choice(fields)] = rng.choice(values)
            out.append(json.dumps(body, allow_nan=True).encode())
        elif kind == 2:
            role = rng.choice(["user", "system", "tool", 7, None])
            content = rng.choice([[rng.choice(parts)], rng.choice(values)])
            out.append(json.dumps({"messages": [{"role": role, "content": content}]}, allow_nan=True).encode())
        else:
            out.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))))
    return out


def test_a_bounded_fuzz_leaves_the_server_answering_and_its_memory_flat(srv):
    c = httpx.Client(timeout=120)  # a hang detector: a 3,000-character prompt merges as it goes (16-44 s on 2 busy cores)
    for _ in range(20):  # warm up every path once before taking the baseline
        c.post(srv.url + "/v1/chat/completions", json={"messages": MSG1, "max_tokens": 2})
        c.post(srv.url + "/v1/chat/completions", content=b"{bad")
    before = rss_kib(srv.pid)
    statuses, t0 = [], time.monotonic()
    for body in fuzz_bodies(300):
        if time.monotonic() - t0 > 90:
            break
        statuses.append(c.post(srv.url + "/v1/chat/completions", content=body,
                               headers={"content-type": "application/json"}).status_code)
    assert len(statuses) >= 200
    assert all(s < 500 for s in statuses), sorted(set(statuses))
    r = c.post(srv.url + "/v1/chat/completions", json={"messages": MSG1, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    grown = rss_kib(srv.pid) - before
    assert grown < 32 * 1024, f"the server grew by {grown} KiB over the fuzz"


def test_on_the_default_model_a_reused_slot_answers_as_a_fresh_prefill(default_model_path, tiny_models):
    """Real replies re-tokenize to what was generated, so the slot that reuses the history must
    answer as the other slot does from a fresh prefill of the same history ("cache_prompt":
    false); and the same history sent again as a new conversation keeps every turn's cells in
    the slot that shares them, all but the last token (its logits start the reply)."""
    with server(tiny_models, "-m", str(default_model_path), "-c", "2048", "-np", "2", "-n", "16") as s:
        c = client(s)
        msgs = [{"role": "user", "content": "What is the capital of France? One word."}]
        r1 = c.chat.completions.create(model="x", messages=msgs, max_tokens=16, temperature=0)
        assert "paris" in r1.choices[0].message.content.lower()
        msgs += [{"role": "assistant", "content": r1.choices[0].message.content},
                 {"role": "user", "content": "And of Italy? One word."}]
        reused = c.chat.completions.create(model="x", messages=msgs, max_tokens=16, temperature=0)
        assert reused.usage.prompt_tokens_details.cached_tokens == r1.usage.prompt_tokens + r1.usage.completion_tokens
        fresh = c.chat.completions.create(model="x", messages=msgs, max_tokens=16, temperature=0,
                                          extra_body={"cache_prompt": False})  # the other slot, afresh
        assert fresh.usage.prompt_tokens_details.cached_tokens == 0
        assert fresh.usage.prompt_tokens == reused.usage.prompt_tokens
        assert reused.choices[0].message.content == fresh.choices[0].message.content
        assert "rome" in fresh.choices[0].message.content.lower()
        again = c.chat.completions.create(model="x", messages=msgs, max_tokens=16, temperature=0)
        assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
        assert again.choices[0].message.content == fresh.choices[0].message.content


def test_a_stream_its_client_does_not_read_pauses_and_goes_on_when_read(tiny_models):
    """Backpressure: the worker decodes at most MAX_UNREAD_PIECES ahead of what the client took,
    so a slow (or silently gone) reader holds a bounded queue and no core; reading resumes it."""
    import asyncio

    from flowmm_edge.app import chat_api
    from flowmm_edge.app.engine import Engine
    from flowmm_edge.app.server import MAX_UNREAD_PIECES, Job, Worker
    from flowmm_edge.bindings.sampling import SamplingParams

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    want = MAX_UNREAD_PIECES + 40
    with Engine(tiny_models[0], tiny_models[1], method="full", n_ctx=1024, n_slots=1, max_reply=want,
                n_threads=2, temperature=0.0) as engine:
        worker = Worker(engine)
        worker.start()
        try:
            job = Job(chat_api.parse_messages(MSG1), want, SamplingParams(ignore_eos=True), [], loop, asyncio.Queue())
            worker.submit(job)
            events = []

            def take(n=None):  # what the HTTP side does: take events off the queue on its loop
                async def drain():
                    while n is None or len(events) < n:
                        try:
                            events.append(await asyncio.wait_for(job.events.get(), 0.5))
                        except asyncio.TimeoutError:
                            return
                    return
                asyncio.run_coroutine_threadsafe(drain(), loop).result(60)
                job.taken = sum(e[0] == "piece" for e in events)

            deadline = time.monotonic() + 30
            while job.sent < MAX_UNREAD_PIECES and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # time for hundreds of tiny-model tokens, were it not paused
            assert job.sent == MAX_UNREAD_PIECES
            assert job.conv.busy and job in worker.active
            take()
            deadline = time.monotonic() + 30
            while not any(e[0] == "done" for e in events) and time.monotonic() < deadline:
                take()
            pieces = [e for e in events if e[0] == "piece"]
            done = [e for e in events if e[0] == "done"]
            assert done and len(pieces) == job.sent and len(pieces) > MAX_UNREAD_PIECES
        finally:
            worker.stop()
            worker.join(30)
            loop.call_soon_threadsafe(loop.stop)


@pytest.mark.parametrize("method", ["flowmm", "snapkv", "full"])
def test_an_oversubscribed_pool_answers_every_turn(tiny_models, method):
    """Six conversations at once in a buffer that holds about two of them whole, as K users
    chatting: every request is answered (no 4xx the client did not cause, no 5xx), each slot
    queues for room instead of failing mid-prefill. Merged, every conversation stays in its slot;
    with the full cache, its answers are its conversation's decoded alone (greedy_reference),
    the second where its history was kept."""
    docs = [f"document {k}: the secret code is {1000 + 37 * k} and " + "the cat sat on the mat and " * 12
            for k in range(6)]
    with server(tiny_models, "-c", "384", "-np", "6", "--budget", "48", "--method", method) as s:
        answers, statuses, errors = {}, [], []
        rounds = threading.Barrier(len(docs))

        def talk(k):
            try:
                msgs, got = [], []
                for text in (docs[k], "what is the secret code"):
                    rounds.wait(timeout=120)
                    msgs.append({"role": "user", "content": text})
                    r = httpx.post(s.url + "/v1/chat/completions", timeout=120,
                                   json={"messages": list(msgs), "max_tokens": 8, "temperature": 0, "logprobs": True})
                    statuses.append(r.status_code)
                    if r.status_code != 200:
                        raise AssertionError(r.text)
                    choice = r.json()["choices"][0]
                    got.append((choice["message"]["content"],
                                r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0,
                                [bytes(e["bytes"]) for e in choice["logprobs"]["content"]]))
                    msgs.append({"role": "assistant", "content": got[-1][0]})
                answers[k] = got
            except Exception as e:  # pragma: no cover - reported below
                errors.append(f"{k}: {e}")
                rounds.abort()

        threads = [threading.Thread(target=talk, args=(k,)) for k in range(len(docs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors and statuses == [200] * 2 * len(docs), (errors, statuses)
        assert "flowmm_requests_errors_total 0" in httpx.get(s.url + "/metrics").text
        if method != "full":  # six merged conversations fit: each second turn decodes only itself
            assert all(second[1] for _, second in answers.values()), answers
    if method == "full":  # the reference: the conversation decoded alone, where the history was kept
        for k, doc in enumerate(docs):
            (first_text, _, first), (_, held, second) = answers[k]
            with GreedyReference(tiny_models[0], 8) as ref:
                ref.feed([{"role": "user", "content": doc}])
                ref.check(pieces=first)
                if held:  # the slot kept its first turn and reply: the reference goes on from the same tokens
                    assert ref.feed([{"role": "user", "content": doc}, {"role": "assistant", "content": first_text},
                                     {"role": "user", "content": "what is the secret code"}]) > 0
                    ref.check(pieces=second)


def _run_jobs(engine, prompts: list[str], n: int, prefill_step: int | None = None) -> list[tuple[str, int, list]]:
    """Queue one greedy request per prompt on a Worker of `engine` before it starts; each reply's
    (text, token count, tokens)."""
    import asyncio

    from flowmm_edge.app import chat_api
    from flowmm_edge.app.server import PREFILL_STEP, Job, Worker
    from flowmm_edge.bindings.sampling import SamplingParams

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    worker = Worker(engine, prefill_step=prefill_step or PREFILL_STEP)
    jobs = [Job(chat_api.parse_messages([{"role": "user", "content": p}]), n, SamplingParams(ignore_eos=True), [],
                loop, asyncio.Queue()) for p in prompts]
    with worker.cond:  # all queued before the worker takes any
        worker.pending.extend(jobs)
    worker.start()
    try:
        async def collect(job):
            out = []
            while True:
                kind, *rest = await asyncio.wait_for(job.events.get(), 60)
                if kind == "piece":
                    out.append(rest[0])
                    job.taken += 1
                elif kind == "done":
                    return "".join(out), rest[1], list(job.stream.generated)
                elif kind == "error":
                    raise AssertionError(rest)
        return [asyncio.run_coroutine_threadsafe(collect(j), loop).result(120) for j in jobs]
    finally:
        worker.stop()
        worker.join(30)
        loop.call_soon_threadsafe(loop.stop)


def _answers_as_alone(tiny_models, prompts: list[str], got: list, n: int) -> None:
    """Each greedy reply (ignore_eos, n tokens) is the prompt's decoded alone on a fresh context,
    up to near ties (greedy_reference: llama.cpp's kernels sum in another order in a shared batch)."""
    for p, (_, count, tokens) in zip(prompts, got):
        assert count == n == len(tokens), p
        with GreedyReference(tiny_models[0], n, ignore_eos=True) as ref:
            ref.feed([{"role": "user", "content": p}])
            ref.check(tokens)


def test_replying_slots_decode_in_one_batch_and_answer_as_each_alone(tiny_models):
    """Continuous batching: four requests queued at once are prefilled in one llama_decode (a
    chunk each), then decoded one llama_decode per step, a row per slot (the batches are counted
    at the context), and each greedy reply equals the same request decoded by itself on a fresh
    context (a Session of its own)."""
    from flowmm_edge.app.engine import Engine

    prompts = ["the secret key is red", "dogs are in the city", "what color is the cat", "the code is 1234"]
    n = 24
    with Engine(tiny_models[0], method="full", n_ctx=1024, n_slots=4, max_reply=n, n_threads=2) as engine:
        batches = []  # (sequences of the prompt chunks, rows) of every decode
        real = engine.ctx.decode_rows
        engine.ctx.decode_rows = lambda rows, chunks=(): batches.append(
            (sorted(c[2] for c in chunks), len(rows))) or real(rows, chunks)
        got = _run_jobs(engine, prompts, n)
    assert batches[0] == ([0, 1, 2, 3], 0), batches  # the four prompts in one decode
    sizes = [rows for _, rows in batches]
    assert max(sizes) == 4 and sizes.count(4) >= n - 4, sizes  # the four streams shared their steps
    _answers_as_alone(tiny_models, prompts, got, n)


def test_a_prompt_prefills_in_the_batch_of_the_replying_slots_and_each_answers_as_alone(tiny_models):
    """llama-server's update_slots: a starting prompt's chunks go into the same llama_decode as the
    replying slots' tokens. Three requests queued at once, one a long prompt prefilled in chunks
    of 64: the three first chunks go in one decode; then every chunk of the long prompt carries
    the two replies' rows (counted at the context); all three greedy replies equal each request
    decoded alone on a fresh context."""
    from flowmm_edge.app.engine import Engine

    prompts = ["the secret key is red", "dogs are in the city",
               " ".join(["the code is 1234 and the cat is red"] * 60)]  # ~600 tokens: 9 chunks or more
    n = 40
    with Engine(tiny_models[0], method="full", n_ctx=1024, n_slots=3, max_reply=n, n_threads=2) as engine:
        batches = []  # (sequences of the prompt chunks, rows) of every decode that carried one
        real = engine.ctx.decode_rows
        engine.ctx.decode_rows = lambda rows, chunks=(): (chunks and batches.append(
            (sorted(c[2] for c in chunks), len(rows)))) or real(rows, chunks)
        got = _run_jobs(engine, prompts, n, prefill_step=64)
    assert batches[0] == ([0, 1, 2], 0), batches  # the three prompts started in one decode
    rest = batches[1:]
    assert len(rest) >= 8 and all(seqs == [2] and rows == 2 for seqs, rows in rest), batches
    _answers_as_alone(tiny_models, prompts, got, n)


def test_observed_turn_ends_share_the_batch_and_merge_as_each_alone(tiny_models):
    """Window statistics are per sequence: three prompts queued at once, each ending in the
    32-row window SnapKV observes, prefill together, so each window is decoded in a batch that
    holds other sequences' prompt chunks or reply rows (counted at the context), one window a
    batch (a ubatch counts one observed sequence's rows). Each slot's merge then keeps the
    positions the same conversation keeps decoded alone on a fresh context (up to near ties:
    llama.cpp's kernels sum in another order in a shared batch)."""
    from flowmm_edge.app import chat_api
    from flowmm_edge.app.conversation import Conversation
    from flowmm_edge.app.engine import Engine
    from flowmm_edge.bindings import kv_cache

    prompts = [f"document {k}: the secret code is {1000 + 37 * k} and " + "the cat sat on the mat and " * (6 + 3 * k)
               for k in range(3)]
    kw = dict(method="snapkv", budget=48, max_reply=4, n_threads=2, schedule="blocking")
    alone = []  # (prompt positions, positions its merge keeps) of each conversation decoded alone
    for p in prompts:
        with Engine(tiny_models[0], n_ctx=1024, n_slots=1, **kw) as engine:
            conv = Conversation(engine)
            conv.feed(chat_api.parse_messages([{"role": "user", "content": p}]))
            alone.append((conv.pos, set(kv_cache.seq_cells(engine.ctx, conv.seq_id)[1].tolist())))
    with Engine(tiny_models[0], n_ctx=1024, n_slots=3, **kw) as engine:
        batches = []  # ([(seq_id, first pos, last pos) of each prompt chunk], reply rows) of every decode
        real = engine.ctx.decode_rows
        engine.ctx.decode_rows = lambda rows, chunks=(): batches.append(
            ([(c[2], c[1], c[1] + len(c[0]) - 1) for c in chunks], len(rows))) or real(rows, chunks)
        _run_jobs(engine, prompts, 4, prefill_step=64)
        kept = [kv_cache.seq_cells(engine.ctx, seq)[1] for seq in range(len(prompts))]
    ends = [[seq for seq, _, last in chunks if last == alone[seq][0] - 1] for chunks, _ in batches]
    assert sorted(sum(ends, [])) == [0, 1, 2] and max(map(len, ends)) == 1, batches  # one window a batch
    assert all(len(chunks) + rows > 1 for (chunks, rows), end in zip(batches, ends) if end), batches  # shared
    for (n, want), pos in zip(alone, kept):
        got = set(pos[pos < n].tolist())
        assert len(got) == len(want) < n and len(got & want) >= 0.9 * len(want), (sorted(got ^ want), n)
