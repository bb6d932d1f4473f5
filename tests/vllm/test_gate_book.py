"""The per-request gate state under vLLM's batch updates, on simulated updates (no engine, no model)."""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; run with .venv-vllm/bin/python (scripts/vllm_env.sh)")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import MoveDirectionality  # noqa: E402

from ngsd.vllm.gate_book import GateBook, as_int64_seed, gates_of, sampled_launches  # noqa: E402
from ngsd.vllm.processor import launch_setting  # noqa: E402
from ngsd.vllm.settings import GuardSettings  # noqa: E402


def _request(**extra_args):
    return SamplingParams(temperature=0.0, extra_args=extra_args or None), []


def _select(book: GateBook, index: int, token: int, potential: float) -> None:
    """What the processor does for a guarded row: remember the choice until the token shows up."""
    state = book.rows[index]
    state.pending = (len(state.output), token, potential)


def test_a_request_removed_and_added_back_continues_its_potential():
    book = GateBook(GuardSettings())
    params, output = _request()
    book.update([], [(0, params, [1, 2], output)], [])
    _select(book, 0, token=7, potential=0.8)
    output.append(7)  # vLLM kept the token
    book.update([0], [], [])  # preempted (or not scheduled this step)
    assert book.rows == {}
    book.update([], [(3, params, [1, 2], output)], [])  # resumed at another index
    state = book.rows[3]
    assert (state.potential, state.step) == (0.8, 1)


def test_children_sharing_one_params_object_keep_a_gate_each():
    """vLLM's single-process engine gives the n children of a request without a seed one SamplingParams."""
    book = GateBook(GuardSettings())
    params = SamplingParams(temperature=0.8, n=1)
    first, second = [], []
    book.update([], [(0, params, [1, 2], first), (1, params, [1, 2], second)], [])
    assert book.rows[0] is not book.rows[1]
    _select(book, 0, token=7, potential=0.8)
    _select(book, 1, token=9, potential=0.3)
    first.append(7)
    second.append(9)
    book.update([0, 1], [], [])  # both preempted
    later = []
    book.update([], [(0, params, [1, 2], second), (1, params, [1, 2], later)], [])  # one resumes, a third child comes
    assert (book.rows[0].potential, book.rows[0].step) == (0.3, 1)
    assert (book.rows[1].potential, book.rows[1].step) == (0.0, 0)  # new: not the preempted sibling's gate
    book.update([], [(2, params, [1, 2], first)], [])
    assert (book.rows[2].potential, book.rows[2].step) == (0.8, 1)


def test_a_request_resumed_with_a_new_output_list_continues_its_potential():
    """With async scheduling vLLM hands a resumed request a new list holding the same tokens."""
    book = GateBook(GuardSettings())
    params, output = _request()
    book.update([], [(0, params, [1, 2], output)], [])
    _select(book, 0, token=7, potential=0.8)
    output.append(7)
    book.update([0], [], [])
    book.update([], [(0, params, [1, 2], [7])], [])
    assert (book.rows[0].potential, book.rows[0].step) == (0.8, 1)


@pytest.mark.parametrize("route", ["routed", "opted out"])
def test_an_unguarded_request_resumed_with_a_new_output_list_keeps_its_gate(route):
    """Async scheduling hands a resumed request a new list. A request routed by the risk probe (or opted out)
    commits no steps, so its step (0) never matches the list's length: it must still find its gate, and the
    probe must not decide it a second time (found with vLLM 0.32's CPU engine forced to async scheduling:
    the verdict log got a line per resumption, read at a recompute step)."""
    from ngsd.vllm.settings import RequestPolicy

    book = GateBook(GuardSettings(allow_opt_out=True), SimpleNamespace(start_potential=0.0))
    params, output = _request(**({"ngsd_guard": False} if route == "opted out" else {}))
    sibling_output: list[int] = []
    book.update([], [(0, params, [1, 2, 3], output), (1, params, [1, 2, 3], sibling_output)], [])
    state, sibling = book.rows[0], book.rows[1]
    for gate in (state, sibling):
        if route == "routed":
            assert gate.awaiting
            gate.awaiting, gate.policy = False, RequestPolicy(guarded=False, alpha=0.0)  # the processor's verdict
        assert not gate.policy.guarded
    output.extend([7, 8, 9])
    sibling_output.extend([5, 6])
    book.update([0, 1], [], [])  # both preempted
    book.update([], [(2, params, [1, 2, 3], [7, 8, 9]), (0, params, [1, 2, 3], [5, 6])], [])  # resumed, new lists
    assert {id(book.rows[2]), id(book.rows[0])} == {id(state), id(sibling)}
    assert book.awaiting(3) == [] and book.guarded(3) == []
    assert len(gates_of(params)) == 2  # no gate added per resumption
    fresh: list[int] = []
    book.update([], [(1, params, [1, 2, 3], fresh)], [])  # a new child: a new gate, not a preempted one's
    assert book.rows[1] not in (state, sibling) and len(gates_of(params)) == 3


def test_async_schedulings_placeholder_commits_the_choice_without_a_warning(caplog):
    """With async scheduling (vLLM's default on GPUs) the worker appends -1 for a sampled token and fills it in
    before the request's next sampling; a request that leaves the batch first (it finished) keeps the -1. The
    choice is committed, and only a real replacement of the forced token is worth a warning."""
    book = GateBook(GuardSettings())
    params, output = _request()
    book.update([], [(0, params, [1, 2], output)], [])
    _select(book, 0, token=7, potential=0.8)
    output.append(-1)  # sampled; not copied back yet
    with caplog.at_level("WARNING", logger="ngsd.vllm.gate_book"):
        book.update([0], [], [])
    assert not caplog.records
    assert (gates_of(params)[0].potential, gates_of(params)[0].step) == (0.8, 1)
    other, replaced = _request()
    book.update([], [(0, other, [1, 2], replaced)], [])
    _select(book, 0, token=7, potential=0.5)
    replaced.append(9)  # vLLM put another token there (a stop rule)
    with caplog.at_level("WARNING", logger="ngsd.vllm.gate_book"):
        book.update([0], [], [])
    assert "output token 9 differs from the guarded choice 7" in caplog.text


def test_a_new_request_starts_at_the_configured_potential():
    for gate, start in (({}, 0.0), ({"v_reset": -0.25}, -0.25), ({"initial_potential": 1.0}, 1.0),
                        ({"prime_divergence": 0.5}, 0.5 / 0.875)):
        book = GateBook(GuardSettings(gate=gate))
        params, output = _request()
        book.update([], [(0, params, [1, 2], output)], [])
        assert book.rows[0].potential == pytest.approx(start), gate
    # "check" starts where the engine's probe check says (EngineRisk.start_potential); without a probe it is refused
    with pytest.raises(ValueError, match="prime_divergence='check' takes the risk probe's divergence check"):
        GuardSettings(gate={"prime_divergence": "check"}, risk="off")
    book = GateBook(GuardSettings(gate={"prime_divergence": "check"}), SimpleNamespace(start_potential=0.75))
    params, output = _request()
    book.update([], [(0, params, [1, 2], output)], [])
    assert book.rows[0].potential == 0.75


def test_a_discarded_sample_is_not_committed():
    """vLLM samples a partly prefilled request and throws the token away: the gate must not move."""
    book = GateBook(GuardSettings())
    params, output = _request()
    book.update([], [(0, params, [1, 2], output)], [])
    _select(book, 0, token=7, potential=0.8)
    (index, state), = book.guarded(batch_size=1)  # next step: the output did not grow
    assert (index, state.potential, state.step, state.pending) == (0, 0.0, 0, None)


def test_moves_and_swaps_keep_each_state_with_its_request():
    book = GateBook(GuardSettings())
    (a, out_a), (b, out_b), (c, out_c) = _request(), _request(ngsd_alpha=1.0), _request()
    book.update([], [(0, a, [], out_a), (1, b, [], out_b), (2, c, [], out_c)], [])
    book.update([], [], [(0, 1, MoveDirectionality.SWAP)])
    assert book.rows[0].policy.alpha == 1.0 and book.rows[1] is gates_of(a)[0]
    book.update([1], [], [(2, 1, MoveDirectionality.UNIDIRECTIONAL)])  # a finishes, c moves into its row
    assert book.rows[1] is gates_of(c)[0] and 2 not in book.rows


def test_a_finished_request_leaves_nothing_behind():
    book = GateBook(GuardSettings())
    params, output = _request()
    book.update([], [(0, params, [], output)], [])
    state = weakref.ref(book.rows[0])
    book.update([0], [], [])
    del params
    gc.collect()
    assert state() is None


def test_opt_out_needs_the_operators_permission():
    strict, lenient = GuardSettings(allow_opt_out=False), GuardSettings(allow_opt_out=True)
    with pytest.raises(ValueError, match="does not allow opting out"):
        strict.request_policy({"ngsd_guard": False})
    with pytest.raises(ValueError, match="below this engine's alpha"):
        strict.request_policy({"ngsd_alpha": 0.1})
    assert not lenient.request_policy({"ngsd_guard": False}).guarded
    assert not lenient.request_policy({"ngsd_guard": 0}).guarded  # JSON false as the server's vllm_xargs passes it
    # inside the engine a refused request is never dropped to unguarded: it is guarded at the engine's alpha
    book = GateBook(strict)
    params, output = _request(ngsd_guard=False)
    book.update([], [(0, params, [], output)], [])
    assert book.rows[0].policy.guarded and book.rows[0].policy.alpha == strict.alpha


@pytest.mark.parametrize("raw, error", [
    ({"alpha": 2.0}, ValueError),
    ({"alpha": "high"}, TypeError),
    ({"allow_opt_out": "yes"}, TypeError),
    ({"gate": {"tau": 0.5}}, ValueError),
    ({"gate": {"colour": 1}}, ValueError),
    ({"expertise": "x"}, ValueError),
])
def test_bad_engine_settings_are_refused(raw, error):
    with pytest.raises(error):
        GuardSettings.from_mapping(raw)


def test_requests_whose_logits_vllm_masks_are_marked():
    """Their expert rows get the same -inf tokens, so bad words or a grammar hold for the guarded choice too."""
    book = GateBook(GuardSettings())
    free, _ = _request()
    banned = SamplingParams(temperature=0.0, bad_words=["bomb"])
    book.update([], [(0, free, [], []), (1, banned, [], [])], [])
    assert [book.rows[0].constrained, book.rows[1].constrained] == [False, True]


def test_guarded_requests_with_masks_or_a_bias_have_their_raw_base_logits_kept_and_penalties_alone_do_not():
    """The rows `request_rules` reads (the model keeps their base logits from before vLLM's rules): masks or a logit
    bias on a request that is or may be guarded; not a request with penalties alone, nor one that opted out."""
    book = GateBook(GuardSettings.from_mapping({"allow_opt_out": True}))
    plain, _ = _request()
    opted_out = SamplingParams(temperature=0.0, bad_words=["I"], extra_args={"ngsd_guard": False})
    added = [plain, SamplingParams(temperature=0.0, bad_words=["I"]), SamplingParams(temperature=0.0, logit_bias={7: -9.0}),
             SamplingParams(temperature=0.0, repetition_penalty=1.3), SamplingParams(temperature=0.0, min_tokens=4),
             opted_out]
    book.update([], [(i, params, [], []) for i, params in enumerate(added)], [])
    assert book.ruled() == [1, 2, 4]
    assert [book.rows[i].has_rules for i in range(6)] == [False, True, True, False, True, True]


def test_sampled_requests_without_a_seed_share_a_launch_and_seeded_ones_run_alone():
    book = GateBook(GuardSettings())
    config = GuardSettings().config()
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=7),  # seeded: alone
        SamplingParams(temperature=0.8, top_p=0.9),
        SamplingParams(temperature=0.8, top_p=0.9),
        SamplingParams(temperature=0.5),  # another kind (no top-p): its own launch
        SamplingParams(temperature=0.8, top_p=0.9, seed=7),  # the same seed as row 0, still alone
        SamplingParams(temperature=1.3, top_p=0.5),  # another temperature and p only: the launch of rows 1 and 2
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9),  # top-k too: another kind
        SamplingParams(temperature=0.8, top_k=5000, top_p=0.9),  # a top-k of the whole vocabulary is off
    ]
    book.update([], [(i, p, [1, 2], []) for i, p in enumerate(params)], [])
    rows = book.guarded(len(params))
    drawn = iter(range(100, 200))
    step_params = lambda state: launch_setting(config, state, 1000)  # noqa: E731
    launches = sampled_launches(range(len(rows)), rows, step_params, lambda: next(drawn))
    assert sorted(map(sorted, launches)) == [[0], [1, 2, 5, 7], [3], [4], [6]]
    assert [state.seed for _, state in rows] == [7, 100, 101, 102, 7, 103, 104, 105]
    # a drawn seed is kept: the next step draws nothing new
    assert sorted(map(sorted, sampled_launches(range(len(rows)), rows, step_params, lambda: next(drawn)))) == \
        [[0], [1, 2, 5, 7], [3], [4], [6]]
    assert [state.seed for _, state in rows] == [7, 100, 101, 102, 7, 103, 104, 105]
    # grouped by every setting (as before per-row settings): one launch per distinct setting
    by_all = lambda state: config.step_params(state.step, *state.sampling)  # noqa: E731
    assert sorted(map(sorted, sampled_launches(range(len(rows)), rows, by_all, lambda: next(drawn)))) == \
        [[0], [1, 2], [3], [4], [5], [6], [7]]

def test_the_probe_sees_prompt_positions_only_across_chunks_and_its_decision_survives_preemption():
    """A request that asks for nothing waits for the probe (not guarded meanwhile); its running maximum spans the
    steps its prompt is prefilled over and ignores generated positions; once decided, a preemption and a
    recompute of the prompt do not reopen the decision. An explicit ngsd_alpha never waits where the engine lets a
    request set its own (allow_opt_out); elsewhere it waits too, as the probe may raise it (`at_least`)."""
    import torch

    from ngsd.vllm.risk import observe
    from ngsd.vllm.settings import RequestPolicy

    strict = GateBook(GuardSettings(), SimpleNamespace(start_potential=0.0))
    strict.update([], [(0, _request(ngsd_alpha=0.95)[0], [5, 6], []), (1, _request(ngsd_guard=True)[0], [5], [])], [])
    assert [i for i, _ in strict.awaiting(2)] == [0, 1] and strict.guarded(2) == []
    book = GateBook(GuardSettings(allow_opt_out=True), SimpleNamespace(start_potential=0.0))
    params, output = _request()
    explicit, explicit_output = _request(ngsd_alpha=0.95)
    book.update([], [(0, params, [5, 6, 7, 8, 9], output), (1, explicit, [5, 6], explicit_output)], [])
    state = book.rows[0]
    assert state.awaiting and [i for i, _ in book.guarded(2)] == [1] and [i for i, _ in book.awaiting(2)] == [0]
    assert not observe(state, torch.tensor([0.5, 2.0, -1.0]), torch.tensor([0, 1, 2]))  # first chunk
    assert observe(state, torch.tensor([1.0, 0.0, 9.0]), torch.tensor([3, 4, 5]))  # last prompt token; 5 generated
    assert (state.probe_max, state.prompt_steps) == (2.0, 2)
    state.awaiting, state.policy = False, RequestPolicy(guarded=False, alpha=0.0)  # what the processor does: routed
    output.append(11)
    book.update([0], [], [])  # preempted
    book.update([], [(2, params, [5, 6, 7, 8, 9], output)], [])  # resumed: its prompt is recomputed
    assert book.rows[2] is state and not state.awaiting and book.awaiting(3) == []
    assert [i for i, _ in book.guarded(3)] == [1]


def test_seeds_vllm_accepts_past_int64_keep_their_bits():
    """vLLM takes seeds up to 2**64 - 1 (child i of an n > 1 request gets seed + i: 2**63 from the server's cap);
    the op's int64 seed tensor overflowed and killed the engine."""
    import torch

    assert as_int64_seed(None) is None and as_int64_seed(5) == 5
    assert as_int64_seed(2**63) == -(2**63) and as_int64_seed(2**64 - 1) == -1
    assert torch.tensor([as_int64_seed(2**63 + 7)], dtype=torch.int64).item() & (2**64 - 1) == 2**63 + 7
    book = GateBook(GuardSettings())
    params, output = _request()
    params.seed = 2**63
    book.update([], [(0, params, [], output)], [])
    assert book.rows[0].seed == -(2**63)
