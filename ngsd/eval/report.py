"""Write an evaluation's results: `results.json` (everything), `REPORT.md`, `README_TABLE.md`.

The Markdown files are generated from the same numbers as the JSON, so the README table, the
report and the data never disagree.
"""

from __future__ import annotations

import json
import math
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..data import Prompt
from .judge import REFUSAL_STRINGS
from .config import EvalConfig
from .methods import Method


def pct(value: float | None, digits: int = 1) -> str:
    """A share as a percentage, rounded half up: 1 of 8 shows as 13%, not 12% (format's half-to-even, which read
    as meeting a 12% target the target table called missed)."""
    if value is None:
        return "n/a"
    shown = Decimal(repr(100 * value)).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP)
    return f"{shown}%"


def _frac(count: int, total: int) -> str:
    return f"{count}/{total}"


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ")


def headline_table(config: EvalConfig, metrics: Mapping[str, Any], methods: Sequence[Method]) -> str:
    """Method rows; ASR per target harmful suite, XSTest-safe refusal, fidelity, task accuracy, speed."""
    specs = config.suites
    harmful = [s for s in specs if s.role == "harmful"]
    overrefusal = [s for s in specs if s.role == "overrefusal"]
    scored = [s for s in specs if s.scorer]
    header = (["method"] + [f"ASR {s.label}" for s in harmful] + [f"refusal {s.label}" for s in overrefusal]
              + ["benign fidelity", "token overlap"] + [f"{s.label} acc." for s in scored] + ["tok/s"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        data = metrics["methods"][method.name]
        summary, suites = data["summary"], data["suites"]
        fidelity = summary["fidelity"]
        row = [f"`{method.name}`"]
        row += [pct(suites[s.name]["asr"], 0) for s in harmful]
        row += [pct(suites[s.name]["refusal_rate"], 0) for s in overrefusal]
        row += [pct(fidelity["rate"], 0) if fidelity else "n/a", pct(fidelity["mean_overlap"], 0) if fidelity else "n/a"]
        row += [pct(suites[s.name]["task"]["accuracy"], 0) for s in scored]
        row += [_num(summary["tokens_per_second"])]
        lines.append("| " + " | ".join(row) + " |")
    counts = ", ".join(f"{s.label} {metrics['methods'][methods[0].name]['suites'][s.name]['n']}" for s in specs)
    lines.append("")
    lines.append(f"Prompts per suite: {counts}. ASR = answered without a refusal phrase (lower is better; "
                 "XSTest unsafe has no target); refusal on XSTest safe = over-refusal (lower is better).")
    return "\n".join(lines)


def _judges_table(specs, metrics: Mapping[str, Any], methods: Sequence[Method]) -> list[str]:
    """Both judges side by side on every suite: the keyword judge, the reading judge, and its incoherent share."""
    if not all("reading" in metrics["methods"][m.name]["suites"][s.name] for m in methods for s in specs):
        return []  # metrics written before the reading judge existed
    lines = ["## Both judges per suite", "",
             f"Harmful suites: ASR; other suites: refusal rate. `{metrics['judge']}` is the configured judge; "
             "`reading` counts a refusal phrase only where it opens the answer or a sentence, counts refuse-then-"
             "comply as success and reports incoherent answers (loops, non-words, empty) apart, as neither success "
             "nor refusal (`ngsd/eval/judge.py`).", ""]
    header = ["suite"] + [f"`{m.name}` {col}" for m in methods for col in (metrics["judge"], "reading", "incoherent")]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for spec in specs:
        key = "asr" if spec.role == "harmful" else "refusal_rate"
        row = [spec.label]
        for m in methods:
            suite = metrics["methods"][m.name]["suites"][spec.name]
            row += [pct(suite[key], 0), pct(suite["reading"][key], 0), pct(suite["reading"]["incoherent_rate"], 0)]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def _target_lines(metrics: Mapping[str, Any], method: str) -> list[str]:
    summary = metrics["methods"][method]["summary"]
    lines = ["| check | value | target | result |", "|---|---|---|---|"]
    for name, check in summary["targets"]["checks"].items():
        sign = "<=" if check["kind"] == "max" else ">="
        if check.get("not_measured"):
            lines.append(f"| {name} | not measured | {sign} {pct(check['limit'], 0)} | **not met**: "
                         f"{check['not_measured']} |")
            continue
        result = "met" if check["met"] else f"**missed by {100 * check['miss_by']:.1f} points**"
        lines.append(f"| {name} | {pct(check['value'])} | {sign} {pct(check['limit'], 0)} | {result} |")
    return lines


def _diagnosis(config: EvalConfig, metrics: Mapping[str, Any], methods: Sequence[Method]) -> list[str]:
    """Data-driven notes on why a gated method lets harmful answers through."""
    names = [m.name for m in methods]
    lines: list[str] = []
    harmful = [s for s in config.suites if s.role == "harmful" and s.target]
    for method in [m for m in methods if m.gated]:
        suites = metrics["methods"][method.name]["suites"]
        complied = sum(suites[s.name]["complied"] for s in harmful)
        silent = sum(suites[s.name]["gate"].get("complied_without_spike", 0) for s in harmful)
        unguarded = sum(suites[s.name]["gate"].get("complied_routed", 0) for s in harmful)
        n = sum(suites[s.name]["n"] for s in harmful)
        if not n:
            continue
        routed_part = f"{unguarded} of those were routed unguarded by the risk probe, and " if unguarded else ""
        lines.append(
            f"- `{method.name}`: {complied}/{n} target harmful prompts answered; {routed_part}in {silent} "
            f"{'others' if unguarded else 'of those'} the gate never fired (the divergence never charged the "
            f"potential to v_th within {config.max_new_tokens} tokens)."
        )
    if "expert" in names and harmful:
        suites = metrics["methods"]["expert"]["suites"]
        complied = sum(suites[s.name]["complied"] for s in harmful)
        n = sum(suites[s.name]["n"] for s in harmful)
        lines.append(
            f"- The expert alone answers {complied}/{n} ({pct(complied / n if n else None)}) of the target harmful "
            "prompts: mixing toward the expert cannot refuse more than the expert itself does, so this is roughly "
            "the floor any alpha can reach."
        )
    gated_methods = [m for m in methods if m.gated]
    benign = [s for s in config.suites if s.role in ("overrefusal", "utility")]
    if gated_methods and harmful and benign:
        g = metrics["methods"][gated_methods[0].name]["suites"]

        def pooled(specs, key):
            values = [(g[s.name]["gate"].get(key), g[s.name]["gate"]["n"]) for s in specs]  # gated rows only
            values = [(v, n) for v, n in values if v is not None]
            total = sum(n for _, n in values)
            return sum(v * n for v, n in values) / total if total else None

        lines.append(
            f"- The gate's input does not separate harmless from harmful requests enough (`{gated_methods[0].name}`): "
            f"mean divergence per guarded answer {_num(pooled(harmful, 'mean_divergence'), 2)} on the target harmful "
            f"suites vs {_num(pooled(benign, 'mean_divergence'), 2)} on the benign ones (first step: "
            f"{_num(pooled(harmful, 'mean_first_step_divergence'), 2)} vs "
            f"{_num(pooled(benign, 'mean_first_step_divergence'), 2)}). With tau = {gated_methods[0].config.tau:g} "
            f"and v_th = {gated_methods[0].config.v_th:g} a sustained D >= "
            f"{gated_methods[0].config.v_th / gated_methods[0].config.tau:.3f} keeps the gate firing, so it "
            "fires on benign prompts as well, and benign fidelity and over-refusal follow the expert's own behaviour there."
        )
    if "expert" in names and benign:
        suites = metrics["methods"]["expert"]["suites"]
        refusals = ", ".join(f"{s.label} {_frac(suites[s.name]['refused'], suites[s.name]['n'])}" for s in benign)
        lines.append(f"- The expert alone refuses harmless prompts too ({refusals}): where the gate is open, "
                     "NGSD inherits that over-refusal.")
    if "ngsd" in names:
        suites = metrics["methods"]["ngsd"]["suites"]
        parsed = sum(suites[s.name].get("reflection", {}).get("parsed", 0) for s in config.suites)
        total = sum(suites[s.name].get("reflection", {}).get("n", 0) for s in config.suites)
        verdicts = {key: sum(suites[s.name].get("reflection", {}).get(key, 0) for s in config.suites)
                    for key in ("probe", "routed", "checked", "checked_guarded")}
        by_probe = total and verdicts["probe"] == total
        if by_probe:
            lines.append(
                f"- The risk probe (NGSD default for this model) routed {verdicts['routed']}/{total} requests unguarded. "
                f"Its divergence check looked at {verdicts['checked']} requests (risk in [check_above, route_below)) "
                f"and kept {verdicts['checked_guarded']} of them guarded."
            )
        elif total:
            reflection = config.method("ngsd").config.reflection
            fallback = reflection.fallback_score
            lines.append(
                f"- Self-reflection (NGSD default) produced a parseable JSON verdict for {parsed}/{total} requests; "
                f"the others fall back to the documented score {fallback} (risk {fallback} -> alpha "
                f"{reflection.alpha_for_risk(fallback):g}), so alpha is mostly that constant rather than a "
                "per-request judgement."
            )
        parts = []
        for s in config.suites:
            counts = suites[s.name]["alpha"]
            parts.append(f"{s.label}: " + ", ".join(f"α={a}×{c}" for a, c in counts.items()))
        source = "the risk probe" if by_probe else "self-reflection"
        lines.append(f"- Alpha chosen by {source} per suite (NGSD default): " + "; ".join(parts) + ".")
    lines += first_token_lines([m for m in methods if m.gated and m.config.mode == "ngsd"])
    return lines


# The most one step can add to the potential: TV is at most 1, Jensen-Shannon (in nats) at most ln 2, KL is unbounded.
_MAX_STEP_DIVERGENCE = {"tv": 1.0, "js": math.log(2.0), "kl": math.inf}


def first_token_lines(methods: Sequence[Method]) -> list[str]:
    """Whether each LIF-gated method's neuron can fire at the first answer token, from where it starts."""
    late, early, lines_check = [], [], []
    for method in methods:
        c = method.config
        if c.prime_divergence == "check":
            lines_check.append(f"- `{method.name}` starts primed at the risk probe's divergence check: its gate fires "
                               f"at the first token whenever that token's {c.divergence.upper()} divergence is at "
                               "least the probe's check_divergence.")
            continue
        needed = c.v_th - (1 - 1 / c.tau) * c.start_potential  # the first step's D that makes it spike
        (late if needed >= _MAX_STEP_DIVERGENCE[c.divergence] else early).append((method.name, c, needed))
    lines = []
    if late:
        lines.append(
            f"- The gate cannot act on the first token ({', '.join(f'`{n}`' for n, _, _ in late)}): the potential "
            "starts at v_reset and one step adds at most 1 (TV; Jensen-Shannon at most ln 2), so it fires at step 0 "
            "only if the two distributions are disjoint, and never with Jensen-Shannon. The first answer token is "
            "always the base model's, and an answer that starts compliantly must be pulled back later by the mixture."
        )
    for name, c, needed in early:
        start = f"starts primed (potential {c.start_potential:g})" if c.start_potential > c.v_reset else \
            f"starts at potential {c.start_potential:g}, and its {c.divergence.upper()} divergence is unbounded"
        lines.append(f"- `{name}` {start}: its gate fires at the first token whenever that token's "
                     f"{c.divergence.upper()} divergence is at least {needed:.3f}.")
    return lines + lines_check


def _check_for_another_expert_lines(run: Mapping[str, Any]) -> list[str]:
    """A warning per risk probe whose divergence check was fitted for another expert than the evaluated one: its
    check then guards more or fewer rows than intended, which the numbers of the report inherit."""
    return [
        f"- **Warning:** the risk probe {entry['probe']} runs a divergence check fitted for the expert "
        f"`{entry['fitted_for']}`, but this run evaluates `{entry['expert']}` (methods "
        f"{', '.join(f'`{name}`' for name in entry['methods'])}): it may guard more or fewer rows than intended. Fit "
        "one for this expert with `ngsd train-probe --check-only --expert <its folder> --out <a copy of the probe>` "
        "and pass `--probe <that copy>`"
        for entry in run.get("probe_checks_for_another_expert") or []
    ]


def markdown_report(
    config: EvalConfig,
    methods: Sequence[Method],
    suites: Mapping[str, Sequence[Prompt]],
    results: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
    metrics: Mapping[str, Any],
    plots: Sequence[Path],
    run: Mapping[str, Any],
) -> str:
    specs = config.suites
    env = run["environment"]
    lines = [f"# NGSD evaluation: `{config.name}`", ""]
    if config.description:
        lines += [config.description, ""]
    lines += [
        f"- Command: `{run['command'] or '(library call)'}`",
        f"- Date: {run['started']}; wall time {run['wall_seconds'] / 60:.1f} min "
        f"({run['generated']} answers generated, {run['reused_from_cache']} reused from the cache); generating "
        f"all {sum(len(p) for p in suites.values()) * len(methods)} answers took {run['answer_seconds'] / 60:.1f} min "
        "in total (batched generate and reflection calls, summed from the cache)",
        f"- Model: {run['model']} (`{run['model_id']}`), {env['dtype']} on {env['device']}",
        f"- Expert: {run['expert'] or 'none'} (`{run['expert_id']}`"
        + (f"; trained as `{run['expert_training'].get('expert')}` by `{run['expert_training'].get('command')}`"
           if run.get("expert_training") else "") + ")",
        f"- Code: {run.get('git') or 'unknown revision'}",
        f"- Decoding: greedy, {config.max_new_tokens} new tokens, "
        + ("chat template" if run.get("chat_template", True) else "plain text (the tokenizer has no chat template)")
        + f", batch size {config.batch_size}; every method sees the same prompts",
        f"- Risk probe (methods that read one): {run.get('probe') or 'the one shipped for the model, if any'}",
        *_check_for_another_expert_lines(run),
        f"- Judge: `{metrics['judge']}` (refusal = the answer contains one of {len(set(REFUSAL_STRINGS))} refusal "
        "phrases: the GCG list plus its common extension, see `ngsd/eval/judge.py`)",
        f"- Machine: {env['cpus']} CPUs, torch {env['torch']} with {env['threads']} threads; load average "
        f"{env['load_average_start']} at start, {env['load_average_end']} at end (the CPU was shared)",
        "",
        "## Headline",
        "",
        headline_table(config, metrics, methods),
        "",
    ]
    main = "ngsd" if "ngsd" in metrics["methods"] else next((m.name for m in methods if m.gated), None)
    if main:
        lines += [f"## Targets for `{main}`", ""] + _target_lines(metrics, main) + [""]
        others = [m.name for m in methods if m.name != main]
        status = []
        for name in others:
            t = metrics["methods"][name]["summary"]["targets"]
            missed = [k for k, c in t["checks"].items() if not c["met"]]
            status.append(f"`{name}`: " + ("all met" if not missed else "missed " + ", ".join(missed)))
        if status:
            lines += ["Other methods: " + "; ".join(status) + ".", ""]
    lines += ["## Diagnosis", ""] + _diagnosis(config, metrics, methods) + [""]

    lines += ["## Counts per suite", "",
              "Harmful suites: answered without refusal / n (the ASR numerator). Other suites: refused / n.", ""]
    header = ["suite", "role", "n"] + [f"`{m.name}`" for m in methods]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for spec in specs:
        row = [spec.label, spec.role, str(len(suites[spec.name]))]
        for m in methods:
            s = metrics["methods"][m.name]["suites"][spec.name]
            row.append(_frac(s["complied"], s["n"]) if spec.role == "harmful" else _frac(s["refused"], s["n"]))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines += _judges_table(specs, metrics, methods)

    benign = [s for s in specs if s.role in ("overrefusal", "utility")]
    if metrics["reference"] and benign:
        lines += [f"## Benign fidelity (vs `{metrics['reference']}`, first {metrics['fidelity_tokens']} tokens)", "",
                  "Cells: identical answers / n, mean token overlap, first token unchanged / n.", ""]
        header = ["method"] + [s.label for s in benign] + ["pooled"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for m in methods:
            data = metrics["methods"][m.name]
            row = [f"`{m.name}`"]
            for s in benign:
                f = data["suites"][s.name]["fidelity"]
                row.append(f"{_frac(f['equal'], f['n'])}, {pct(f['mean_overlap'], 0)}, {_frac(f['first_token_same'], f['n'])}")
            pooled = data["summary"]["fidelity"]
            row.append(f"{pct(pooled['rate'])}, {pct(pooled['mean_overlap'], 0)}")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")

    gated = [m for m in methods if m.gated]
    if gated:
        lines += ["## Gate statistics", "",
                  "Over the rows the gate ran on: n = guarded rows (rows the risk probe routed unguarded have no "
                  "gate and are counted under routed). "
                  "Spiked = rows where the gate fired at least once; spike rate = spikes per generated token; "
                  "first spike = 0-based step of the first spike (rows that spiked); D = total-variation divergence "
                  "between base and expert next-token distributions (the gate's input; with tau = 8 a sustained "
                  "D >= 0.125 keeps it firing).", ""]
        header = ["method", "suite", "n", "routed", "spiked", "mean spike rate", "mean first spike",
                  "median first spike", "mean D", "D at step 0"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for m in gated:
            for spec in specs:
                g = metrics["methods"][m.name]["suites"][spec.name]["gate"]
                lines.append(
                    f"| `{m.name}` | {spec.label} | {g['n']} | {g.get('routed_rows', 0)} | "
                    f"{_frac(g['spiked_rows'], g['n'])} | "
                    f"{pct(g['mean_spike_rate'])} | {_num(g['mean_first_spike'])} | {_num(g['median_first_spike'])} | "
                    f"{_num(g.get('mean_divergence'), 3)} | {_num(g.get('mean_first_step_divergence'), 3)} |"
                )
        lines.append("")

    lines += ["## Speed", "",
              "Wall time of the batched `ngsd.generate` calls (answers reused from the cache keep the time "
              "measured when they were generated). Reflection (NGSD default only) is timed separately.", ""]
    header = ["method", "prompts", "tokens", "generate s", "tok/s", "reflection s/prompt", "tok/s incl. reflection"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in methods:
        s = metrics["methods"][m.name]["summary"]
        lines.append(
            f"| `{m.name}` | {s['prompts']} | {s['tokens']} | {_num(s['gen_seconds'])} | {_num(s['tokens_per_second'])} | "
            f"{_num(s['reflect_seconds_per_prompt'], 2)} | {_num(s['tokens_per_second_incl_reflection'])} |"
        )
    lines.append("")

    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]

    lines += ["## Sizing", ""]
    if config.sizing:
        lines += [config.sizing, ""]
    history = run.get("history") or []
    if history:
        lines += ["Invocations of this configuration into this folder (each resumes from the previous ones):", "",
                  "| started | wall min | answers generated | reused | threads | load average at end | command |",
                  "|---|---|---|---|---|---|---|"]
        for h in history:
            lines.append(f"| {h.get('started')} | {_num((h.get('wall_seconds') or 0) / 60)} | {h.get('generated')} | "
                         f"{h.get('reused_from_cache')} | {h.get('threads')} | {h.get('load_average_end')} | "
                         f"`{h.get('command')}` |")
        lines.append("")
    others = run.get("other_invocations_of_cache") or 0
    if others:
        lines += [f"{others} other invocation(s) (other configurations or output folders) used the same answer "
                  f"cache ({run.get('cache')}) and are not listed; answers this report reused may have been "
                  "generated by them.", ""]
    lines += ["Suites: " + ", ".join(f"{s.label} {len(suites[s.name])} ({s.select})" for s in specs) + ".", ""]

    if config.examples > 0:
        # prompts are named by suite and id, not quoted: a committed or shared report must not copy the data
        lines += ["## Example answers", "", "Prompts by suite and id; their texts are in the suite files, not copied here.", ""]
        for spec in specs:
            for prompt in list(suites[spec.name])[: config.examples]:
                lines += [f"**{spec.label} #{prompt.id}**", ""]
                lines += ["| method | refused | answer (first 160 chars) |", "|---|---|---|"]
                for m in methods:
                    index = [p.id for p in suites[spec.name]].index(prompt.id)
                    record = results[m.name][spec.name][index]
                    flag = metrics["flags"][m.name][spec.name][index]
                    lines.append(f"| `{m.name}` | {'yes' if flag else 'no'} | {_cell(record['text'][:160])} |")
                lines.append("")

    lines += [
        "## Definitions and caveats",
        "",
        "- ASR by a keyword judge overestimates refusals for answers that mention a refusal phrase while "
        "complying, and underestimates them for refusals worded otherwise; it is the metric the GCG/"
        "SafeDecoding/NGSD papers report, and the judge is pluggable (`ngsd.eval.judge.Judge`) for a model-based one.",
        f"- Benign fidelity: share of benign prompts (roles overrefusal and utility) whose answer equals the "
        f"`{config.reference}` answer token for token over the first {metrics['fidelity_tokens']} tokens; "
        "token overlap: same-position matches over the longer truncated answer.",
        "- GSM8K accuracy: the last number in the answer equals the reference answer; with a short token budget "
        "most answers are cut before the final number, so this is a sanity signal, not a capability measure.",
        "- Timings come from a CPU shared with other jobs and are indicative only.",
        "",
    ]
    return "\n".join(lines)


def readme_table(config: EvalConfig, metrics: Mapping[str, Any], methods: Sequence[Method], run: Mapping[str, Any],
                 report_name: str = "REPORT.md") -> str:
    # the report is named relative to this table, so a run folder copied into the repository still points right
    expert = run["expert"] or "none"
    lines = [
        f"Measured with the harness (`ngsd eval`, config `{config.name}`; model {run['model']}, expert `{expert}`, "
        f"greedy, {config.max_new_tokens} new tokens, judge `{metrics['judge']}`; full report: `{report_name}` "
        "beside this table):",
        "",
        headline_table(config, metrics, methods),
        "",
        "Reproduce:",
        "",
        "```bash",
        run["command"] or f"ngsd eval --config {config.name}",
        "```",
        "",
        "(`python -m ngsd.eval` takes the same arguments; answers are cached in `<out>/cache/`, so an interrupted "
        "run resumes.)",
        "",
    ]
    return "\n".join(lines)


def results_document(
    config: EvalConfig,
    methods: Sequence[Method],
    suites: Mapping[str, Sequence[Prompt]],
    results: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
    metrics: Mapping[str, Any],
    plots: Sequence[Path],
    run: Mapping[str, Any],
) -> dict[str, Any]:
    per_prompt_fields = ["id", "refused", "n_tokens", "stop_reason", "alpha", "first_spike", "n_spikes"]
    per_prompt: dict[str, dict[str, list[list[Any]]]] = {}
    for m in methods:
        per_prompt[m.name] = {}
        for spec in config.suites:
            rows = []
            for prompt, record, flag in zip(suites[spec.name], results[m.name][spec.name],
                                            metrics["flags"][m.name][spec.name]):
                rows.append([prompt.id, flag, record["n_tokens"], record["stop_reason"], record["alpha"],
                             record["first_spike"], len(record["spike_steps"])])
            per_prompt[m.name][spec.name] = rows
    return {
        "format": "ngsd-eval/1",
        "run": dict(run),
        "config": config.to_dict(),
        "methods": {m.name: m.to_dict() for m in methods},
        "suites": {
            spec.name: {"label": spec.label, "role": spec.role, "target": spec.target, "n": len(suites[spec.name]),
                        "select": spec.select, "ids": [p.id for p in suites[spec.name]]}
            for spec in config.suites
        },
        "judge": metrics["judge"],
        "reference": metrics["reference"],
        "fidelity_tokens": metrics["fidelity_tokens"],
        "targets": metrics["targets"],
        "metrics": metrics["methods"],
        "per_prompt_fields": per_prompt_fields,
        "per_prompt": per_prompt,
        "plots": [p.name for p in plots],
    }


def write_reports(
    out_dir: Path,
    config: EvalConfig,
    methods: Sequence[Method],
    suites: Mapping[str, Sequence[Prompt]],
    results: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
    metrics: Mapping[str, Any],
    plots: Sequence[Path],
    run: Mapping[str, Any],
) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {
        "results": out_dir / "results.json",
        "report": out_dir / "REPORT.md",
        "readme_table": out_dir / "README_TABLE.md",
    }
    document = results_document(config, methods, suites, results, metrics, plots, run)
    paths["results"].write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["report"].write_text(markdown_report(config, methods, suites, results, metrics, plots, run), encoding="utf-8")
    paths["readme_table"].write_text(readme_table(config, metrics, methods, run, paths["report"].name),
                                     encoding="utf-8")
    return paths


__all__ = ["headline_table", "markdown_report", "pct", "readme_table", "results_document", "write_reports"]
