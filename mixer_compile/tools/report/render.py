"""The report as Markdown (a summary to paste into an issue) and as one self-contained HTML
page (tables plus the plots embedded as base64 PNG: it can be mailed or archived alone)."""

from __future__ import annotations

import base64
import html

from mixer_compile.tools.report.compare import Comparison, estimate_lines, table


def _inputs(c: Comparison) -> list[str]:
    lines = []
    for log in c.logs:
        model = f", model {log.model_name}" if log.model_name else ""
        lines.append(f"{log.label}: {log.source} (targets: {', '.join(log.targets)}; "
                     f"{len(log.tasks)} kernels, {sum(len(t.trials) for t in log.tasks.values())} trials{model})")
    return lines


def _model_note(c: Comparison) -> list[str]:
    if c.weights_known:
        return []
    return ["The model is unknown (a bare database): every kernel is counted once. Give an artifact, "
            "or --spec, for the calls per kernel."]


def _missing(c: Comparison) -> list[str]:
    return [f"{row.name} ({row.kernel.operator}, {row.kernel.shapes}) is in {', '.join(have) or 'the model only'}; "
            f"not in {', '.join(lack)}" for row, have, lack in c.missing()]


def _problems(c: Comparison) -> list[str]:
    return [p for log in c.logs for p in log.problems]


def markdown(c: Comparison) -> str:
    header, rows = table(c)
    out = ["# Tuning report", "", "## Inputs", ""]
    out += [f"- {line}" for line in _inputs(c)]
    out += ["", "## Estimated model latency", ""] + [f"- {line}" for line in estimate_lines(c)]
    out += ["", "## Kernels", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    for note in _model_note(c):
        out += ["", note]
    missing = _missing(c)
    if missing:
        out += ["", "## Kernels not in every input", ""] + [f"- {n}" for n in missing]
    problems = _problems(c)
    if problems:
        out += ["", "## Skipped lines", ""] + [f"- {p}" for p in problems]
    return "\n".join(out) + "\n"


def page(c: Comparison, convergence_png: bytes, bars_png: bytes) -> str:
    header, rows = table(c)
    esc = html.escape

    def items(lines: list[str]) -> str:
        return "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in lines) + "</ul>"

    def img(png: bytes, alt: str) -> str:
        return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'

    body = [
        "<h1>Tuning report</h1>", "<h2>Inputs</h2>", items(_inputs(c)),
        "<h2>Estimated model latency</h2>", items(estimate_lines(c)),
        "<h2>Kernels</h2>", "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>",
        *("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in rows), "</table>",
    ]
    body += [f"<p>{esc(note)}</p>" for note in _model_note(c)]
    missing = _missing(c)
    if missing:
        body += ["<h2>Kernels not in every input</h2>", items(missing)]
    problems = _problems(c)
    if problems:
        body += ["<h2>Skipped lines</h2>", items(problems)]
    body += ["<h2>Convergence</h2>", img(convergence_png, "best latency against trials per kernel"),
             "<h2>Per-kernel comparison</h2>", img(bars_png, "per-kernel time by input")]
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child{text-align:left}"
             "img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Tuning report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
