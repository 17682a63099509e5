"""Chat streams decoded together (app/decoding.py): a request joins the running batch at the
next step, and every row's answer is exactly the answer it gets alone from transformers'
`generate` — whatever else is in the batch, whenever it joined or left, whatever its version."""

import threading
import time

import pytest
import torch

from app.decoding import ChatBatcher, ChatRequest
from app.serving import ModelLock, PolicyServer, SamplingParams
from tests.app.test_hot_swap import save_tiny_adapter

GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.3, max_new_tokens=20)
PROMPTS = ["hi", "a much longer question about the colour of the sea at night, and the sky?", "capital of France"]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    server = PolicyServer(tiny_model_dir)
    server.load_adapter("v1", save_tiny_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "v1"))
    return server


def messages(prompt):
    return [{"role": "user", "content": prompt}]


def alone(server, prompt, sampling=GREEDY, version="base"):
    """Token ids of the answer transformers' `generate` gives this prompt on its own."""
    inputs = server._encode([messages(prompt)], 1)
    with torch.inference_mode():
        out = server._model_for(version).generate(**inputs, **server._generate_kwargs(sampling))
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    return ids[:-1] if ids and ids[-1] == server.tokenizer.eos_token_id else ids


def request(server, prompt, sampling=GREEDY, version=None):
    return ChatRequest(server._prompt_ids(messages(prompt)), sampling, version)


def drained(req):
    """(version, token ids, how it ended) from a request's events."""
    version, ids, end = None, [], None
    while not req.events.empty():
        kind, value = req.events.get()
        if kind == "version":
            version = value
        elif kind == "token":
            ids.append(value)
        else:
            end = (kind, value)
    return version, ids, end


def test_answers_joining_at_different_steps_equal_each_answer_alone(server):
    batcher = ChatBatcher(server)
    reqs = [request(server, p) for p in PROMPTS]
    batcher.enqueue(reqs[0])
    batcher.advance()
    batcher.advance()
    batcher.enqueue(reqs[1])  # a longer prompt joins a row two tokens in
    batcher.advance()
    batcher.enqueue(reqs[2])
    while batcher.advance():
        pass
    assert batcher.peak_rows == 3
    for prompt, req in zip(PROMPTS, reqs):
        version, ids, end = drained(req)
        assert (version, end) == ("base", ("end", None))
        assert ids == alone(server, prompt)


def test_rows_of_different_versions_are_decoded_side_by_side(server):
    batcher = ChatBatcher(server)
    plan = [(PROMPTS[0], "base"), (PROMPTS[0], "v1"), (PROMPTS[1], "v1")]
    reqs = [request(server, p, version=v) for p, v in plan]
    for req in reqs:
        batcher.enqueue(req)
    while batcher.advance():
        pass
    answers = [drained(req) for req in reqs]
    for (prompt, version), (recorded, ids, _) in zip(plan, answers):
        assert recorded == version
        assert ids == alone(server, prompt, version=version)
    assert answers[0][1] != answers[1][1]  # the adapter really changes the answer


def test_a_row_leaves_at_its_own_length_and_the_others_go_on(server):
    batcher = ChatBatcher(server)
    short = SamplingParams(temperature=0.0, repetition_penalty=1.3, max_new_tokens=3)
    long_prompt, short_prompt = request(server, PROMPTS[1], short), request(server, PROMPTS[0])
    batcher.enqueue(long_prompt)
    batcher.enqueue(short_prompt)
    steps = 0
    while batcher.advance():
        steps += 1
        if steps == 3:  # the long prompt's row has left: the padding it needed is gone too
            assert batcher._batches["base"].mask[:, 0].all()
    assert drained(long_prompt)[1] == alone(server, PROMPTS[1], short)
    assert drained(short_prompt)[1] == alone(server, PROMPTS[0])


def test_a_cancelled_row_leaves_and_the_others_are_unaffected(server):
    batcher = ChatBatcher(server)
    kept, cancelled = request(server, PROMPTS[2]), request(server, PROMPTS[1])
    batcher.enqueue(kept)
    batcher.enqueue(cancelled)
    batcher.advance()
    cancelled.cancelled.set()  # the browser tab closed
    batcher.advance()
    assert len(batcher.rows) == 1
    _, ids, end = drained(cancelled)
    assert end == ("end", None) and len(ids) == 2
    while batcher.advance():
        pass
    assert drained(kept)[1] == alone(server, PROMPTS[2])


def test_an_unknown_version_fails_that_request_only(server):
    batcher = ChatBatcher(server)
    bad, good = request(server, PROMPTS[0], version="v404"), request(server, PROMPTS[0])
    batcher.enqueue(bad)
    batcher.enqueue(good)
    while batcher.advance():
        pass
    kind, error = drained(bad)[2]
    assert kind == "error" and isinstance(error, KeyError) and "v404" in str(error)
    assert drained(good)[1] == alone(server, PROMPTS[0])


def test_sampled_rows_keep_their_own_settings(server):
    batcher = ChatBatcher(server)
    hot = SamplingParams(temperature=1.5, top_p=0.5, max_new_tokens=7)
    cold = SamplingParams(temperature=0.0, repetition_penalty=1.0, max_new_tokens=12)
    sampled, greedy = request(server, PROMPTS[0], hot), request(server, PROMPTS[2], cold)
    batcher.enqueue(sampled)
    batcher.enqueue(greedy)
    while batcher.advance():
        pass
    assert len(drained(sampled)[1]) == 7
    assert drained(greedy)[1] == alone(server, PROMPTS[2], cold)


def test_concurrent_streams_are_decoded_in_one_batch(server):
    """Three people chat at once: all three answers come from one running batch."""
    server._batcher = ChatBatcher(server)
    results = {}

    def chat(i):
        results[i] = list(server.stream(messages(PROMPTS[i]), GREEDY))[-1]

    server._lock.acquire(ModelLock.INTERACTIVE)  # the model is busy while all three arrive
    threads = [threading.Thread(target=chat, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while (len(server._batcher._pending) < 3 or not server._lock._queue) and time.monotonic() < deadline:
        time.sleep(0.01)
    server._lock.release()
    for thread in threads:
        thread.join(30)
    assert server._batcher.peak_rows == 3
    for i, prompt in enumerate(PROMPTS):
        text, version = results[i]
        assert version == "base"
        assert text == server.tokenizer.decode(alone(server, prompt), skip_special_tokens=True)


def test_an_interactive_request_goes_between_two_decoding_steps(server):
    """An arena request does not wait for the chat batch to finish; the chat answer goes on
    afterwards from where it was, unchanged."""
    long = SamplingParams(temperature=0.0, repetition_penalty=1.3, max_new_tokens=300)
    expected = alone(server, PROMPTS[2], long)
    assert len(expected) == 300  # no end of answer before the arena request comes
    results = []
    thread = threading.Thread(target=lambda: results.append(list(server.stream(messages(PROMPTS[2]), long))[-1]))
    thread.start()
    deadline = time.monotonic() + 10
    while not server._batcher.rows and time.monotonic() < deadline:
        time.sleep(0.001)
    server.generate(messages("quick"), sampling=SamplingParams(max_new_tokens=2), interactive=True)
    assert server._batcher.rows, "the chat answer was still in flight when the arena request got the model"
    thread.join(30)
    assert results[0][0] == server.tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("spread", [0.2, 3.0])  # flat logits: the nucleus is larger than the candidates searched
def test_the_nucleus_is_the_one_transformers_keeps(top_p, spread):
    from transformers import TopPLogitsWarper

    from app.decoding import TOP_P_CANDIDATES, sample_token

    torch.manual_seed(0)
    scores = torch.randn(5000) * spread
    kept = set(torch.nonzero(TopPLogitsWarper(top_p)(None, scores[None].clone())[0] > -float("inf")).flatten().tolist())
    if spread < 1 and top_p > 0.5:
        assert len(kept) > TOP_P_CANDIDATES  # this case does take the whole-vocabulary path
    drawn = {sample_token(scores, 1.0, top_p) for _ in range(3000)}
    assert drawn <= kept
    if len(kept) <= 20:
        assert drawn == kept  # every token of a small nucleus comes up


def test_sampling_follows_the_nucleus_probabilities():
    from app.decoding import sample_token

    torch.manual_seed(1)
    scores = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    counts = torch.bincount(torch.tensor([sample_token(scores, 1.0, 0.9) for _ in range(4000)]), minlength=4)
    assert counts[3] == 0  # 0.5 + 0.3 + 0.15 = 0.95 above it: outside the nucleus
    assert abs(counts[0] / 4000 - 0.5 / 0.95) < 0.03 and abs(counts[2] / 4000 - 0.15 / 0.95) < 0.03
    assert sample_token(scores, 0.0, 0.9) == 0


# ---------------------------------------------------------------- merged serving copies


@pytest.fixture
def fresh_server(tiny_model_dir, tmp_path):
    server = PolicyServer(tiny_model_dir)
    for version in ("v1", "v2"):
        server.load_adapter(version, save_tiny_adapter(tiny_model_dir, tmp_path / version))
    return server


def test_a_merged_version_answers_as_its_adapter_does(fresh_server):
    server = fresh_server
    unmerged = alone(server, PROMPTS[1], version="v1")
    assert server.merge("v1") and server.merged_versions() == ["v1"]
    assert server._model_for("v1") is not server.model  # a plain model: no PEFT wrappers
    assert alone(server, PROMPTS[1], version="v1") == unmerged
    batcher = ChatBatcher(server)
    reqs = [request(server, PROMPTS[1], version="v1"), request(server, PROMPTS[0], version="v1")]
    for req in reqs:
        batcher.enqueue(req)
    batcher.advance()
    batcher.enqueue(other := request(server, PROMPTS[1], version="v2"))  # v2 runs unmerged, beside
    while batcher.advance():
        pass
    assert drained(reqs[0])[1] == unmerged
    assert drained(other)[1] == alone(server, PROMPTS[1], version="v2")
    assert alone(server, PROMPTS[1]) != unmerged  # the base is untouched by the merge


def drop_merged_copies(server):
    """Forget every merged copy, as the server's owner (the model thread) would."""
    def drop():
        server._merged.clear()
        server._publish()

    server._owner.call(ModelLock.SWAP, drop)


def test_merged_copies_stay_within_their_budget_and_keep_the_live_one(fresh_server):
    server = fresh_server
    assert server.merge("v1")
    (_, size), = server._merged.values()
    drop_merged_copies(server)
    server.merged_budget_bytes = size  # room for one copy
    assert server.merge("v1")
    assert server.merge("v2") and server.merged_versions() == ["v2"]  # v1 was not live: evicted
    server.set_live("v2")
    assert not server.merge("v1") and server.merged_versions() == ["v2"]  # the live copy stays
    server.set_live("v1")
    assert server.merge("v1") and server.merged_versions() == ["v1"]
    server.merged_budget_bytes = 0
    drop_merged_copies(server)
    assert not server.merge("v1")


def test_a_merge_proceeds_while_chat_answers_keep_the_model_busy(fresh_server):
    """The merge goes one layer at a time between two decoding steps; a steady stream of chat
    answers must not starve it."""
    server = fresh_server
    long = SamplingParams(temperature=0.0, repetition_penalty=1.3, max_new_tokens=400)
    expected = alone(server, PROMPTS[2], long, version="v1")
    assert len(expected) == 400
    results = []
    thread = threading.Thread(target=lambda: results.append(
        list(server.stream(messages(PROMPTS[2]), long, "v1"))[-1]))
    thread.start()
    deadline = time.monotonic() + 10
    while not server._batcher.rows and time.monotonic() < deadline:
        time.sleep(0.001)
    assert server.merge("v1")
    assert server._batcher.rows, "merged while the answer was still being decoded"
    thread.join(30)
    assert results[0][0] == server.tokenizer.decode(expected, skip_special_tokens=True)


def tokens_per_step(batcher, reqs, steps):
    """How many events (tokens, after the first step's version event) each request received in
    each of `steps` decoding steps."""
    counts = []
    for _ in range(steps):
        before = [req.events.qsize() for req in reqs]
        batcher.advance()
        counts.append([req.events.qsize() - b for req, b in zip(reqs, before)])
    return counts


def test_after_a_promotion_the_old_versions_answers_yield_every_other_step(fresh_server):
    """Answers asked of "live" before a promotion finish on the old version at half speed
    while the new version's answers take every step; each still equals its answer alone."""
    server = fresh_server
    long = SamplingParams(temperature=0.0, repetition_penalty=1.3, max_new_tokens=12)
    batcher = ChatBatcher(server)
    old = request(server, PROMPTS[1], long)
    batcher.enqueue(old)
    batcher.advance()
    batcher.advance()
    server.set_live("v1")
    new = request(server, PROMPTS[0], long)
    batcher.enqueue(new)
    counts = tokens_per_step(batcher, [old, new], 6)
    # first step: the new answer's version, its prefill token and a step's; the old one waits every other step
    assert [c[1] for c in counts] == [3, 1, 1, 1, 1, 1]
    assert [c[0] for c in counts] == [0, 1, 0, 1, 0, 1] or [c[0] for c in counts] == [1, 0, 1, 0, 1, 0]
    while batcher.advance():
        pass
    assert drained(old)[:2] == ("base", alone(server, PROMPTS[1], long))
    assert drained(new)[:2] == ("v1", alone(server, PROMPTS[0], long, version="v1"))


def test_answers_asked_of_a_named_version_keep_full_speed_beside_the_live_one(fresh_server):
    server = fresh_server
    long = SamplingParams(temperature=0.0, repetition_penalty=1.3, max_new_tokens=12)
    batcher = ChatBatcher(server)
    server.set_live("v1")
    named, live = request(server, PROMPTS[1], long, version="base"), request(server, PROMPTS[0], long)
    batcher.enqueue(named)
    batcher.enqueue(live)
    batcher.advance()
    assert {row.version for row in batcher.rows} == {"base", "v1"}
    counts = tokens_per_step(batcher, [named, live], 4)
    assert counts == [[1, 1]] * 4


def test_a_staged_versions_merged_copy_is_not_evicted_for_a_candidates(fresh_server, tiny_model_dir, tmp_path):
    server = fresh_server
    assert server.merge("v1")
    (_, size), = server._merged.values()
    drop_merged_copies(server)
    server.merged_budget_bytes = size  # room for one copy
    server.load_adapter("v3", save_tiny_adapter(tiny_model_dir, tmp_path / "v3"), provisional_round=3)
    assert server.merge("v3")
    assert not server.merge("v2") and server.merged_versions() == ["v3"]


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.8, 0.95, 0), (1.3, 0.5, 0), (0.7, 1.0, 0), (0.8, 0.95, 50),
                                                     (1.0, 1.0, 50), (0.9, 0.3, 50)])
def test_the_nucleus_warper_gives_the_scores_transformers_warpers_give(temperature, top_p, top_k):
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from app.decoding import NucleusWarper

    torch.manual_seed(3)
    scores = torch.randn(4, 5000) * torch.tensor([[8.0], [3.0], [0.2], [1.0]])  # peaked to flat: the flat row
    ids = torch.zeros(4, 1, dtype=torch.long)                                  # needs the whole-vocabulary path
    warpers = [TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else []) \
        + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
    theirs = LogitsProcessorList(warpers)(ids, scores)
    ours = NucleusWarper(temperature, top_p, top_k)(ids, scores)
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    torch.testing.assert_close(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])


def test_sampled_candidates_are_the_tokens_transformers_own_warpers_sample(server):
    """`generate` with the server's settings (NucleusWarper, transformers' temperature and
    top-p off) draws the same answers, seed for seed, as with transformers' warpers."""
    sampling = SamplingParams(temperature=0.9, top_p=0.8, repetition_penalty=1.2, max_new_tokens=16)
    inputs = server._encode([messages(p) for p in PROMPTS], 2)
    theirs_kwargs = {**server._generate_kwargs(sampling), "temperature": 0.9, "top_p": 0.8}
    del theirs_kwargs["logits_processor"], theirs_kwargs["top_k"]  # transformers' default top-k: 50
    with torch.inference_mode():
        torch.manual_seed(11)
        ours = server._plain.generate(**inputs, **server._generate_kwargs(sampling))
        torch.manual_seed(11)
        theirs = server._plain.generate(**inputs, **theirs_kwargs)
    assert ours.tolist() == theirs.tolist()



