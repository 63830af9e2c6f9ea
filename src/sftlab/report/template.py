"""The report page: one Jinja2 template with autoescape on, inline CSS, no scripts, no external resources.

Kept as a Python string (not package data) so the report works from any install without a packaging step.
Stable hooks for scripts and tests: `<table id="summary">`, `<img class="plot" data-plot="...">`,
`<table class="baselines|worst|per-class|by-length|metrics">`, `<pre class="config">`, `<p class="note">`.
"""
from __future__ import annotations

import jinja2


def environment() -> jinja2.Environment:
    return jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True)


TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sftlab report: {{ runs | map(attribute="name") | join(", ") }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1rem 2rem 4rem; color: #1d1d1f; line-height: 1.45; }
h1 { margin-bottom: .2rem; } h2 { border-bottom: 2px solid #ddd; padding-bottom: .2rem; margin-top: 2.5rem; }
h3 { margin-top: 1.8rem; } h4 { margin: 1.2rem 0 .4rem; }
.meta, .note { color: #555; font-size: .92rem; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .35rem .7rem; margin: .4rem 0; }
code { background: #f3f3f3; padding: 0 .25rem; border-radius: 3px; }
table { border-collapse: collapse; margin: .4rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #d0d0d0; padding: .25rem .6rem; vertical-align: top; text-align: left; }
thead th { background: #f0f2f5; position: sticky; top: 0; }
tbody tr:nth-child(even) { background: #fafafa; }
th[scope=row] { background: #f7f7f9; font-weight: 600; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text div { max-height: 9em; max-width: 48rem; overflow: auto; white-space: pre-wrap; word-break: break-word; }
img.plot { display: block; max-width: 100%; height: auto; margin: .5rem 0 1rem; border: 1px solid #eee; }
.pair { display: flex; flex-wrap: wrap; gap: 1rem; align-items: flex-start; }
pre.config { background: #f6f8fa; border: 1px solid #ddd; padding: .8rem; overflow: auto; max-height: 32rem;
             font-size: .85rem; }
nav a { margin-right: 1rem; }
</style>
</head>
<body>
{% macro table(head, rows, cls) %}
<table class="{{ cls }}">
<thead><tr>{% for h in head %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in rows %}
<tr>{% for text, c in row %}{% if c == "text" %}<td class="text"><div>{{ text }}</div></td>{% else %}<td class="{{ c }}">{{ text }}</td>{% endif %}{% endfor %}</tr>
{% endfor %}
</tbody>
</table>
{% endmacro %}
{% macro plot(b64, name, alt) %}
<img class="plot" data-plot="{{ name }}" alt="{{ alt }}" src="data:image/png;base64,{{ b64 }}">
{% endmacro %}
<h1>sftlab report</h1>
<p class="meta">Generated {{ generated }} from
{% for r in runs %}<code>{{ r.path }}</code>{% if not loop.last %}, {% endif %}{% endfor %}.</p>
<nav><a href="#summary-section">summary</a><a href="#curves">curves</a>
{% for r in runs %}<a href="#run-{{ loop.index }}">{{ r.name }}</a>{% endfor %}</nav>

<h2 id="summary-section">Summary</h2>
<table id="summary">
<thead><tr><th></th>{% for r in runs %}<th scope="col">{{ r.name }}</th>{% endfor %}</tr></thead>
<tbody>
{% for label, cells in summary %}
<tr><th scope="row">{{ label }}</th>{% for text, c in cells %}<td class="{{ c }}">{{ text }}</td>{% endfor %}</tr>
{% endfor %}
</tbody>
</table>
<p class="meta">dev metrics are those of the best checkpoint (step “best step”); throughput counts training steps only.</p>

<h2 id="curves">Curves</h2>
{% for key, alt in [("loss", "training loss"), ("parts", "loss parts"), ("dev", "dev metrics"), ("lr", "learning rate"), ("throughput", "training throughput")] %}
{% if curves[key] %}{{ plot(curves[key], key, alt ~ " over steps, one line per run") }}
{% elif key == "parts" %}
{% else %}<p class="note">No {{ alt }} logged{% if key == "dev" %} (no dev set in the config?){% endif %}.</p>
{% endif %}
{% endfor %}

{% for pr in per_run %}
{% set r = pr.run %}
<h2 id="run-{{ loop.index }}">Run {{ r.name }}</h2>
<p class="meta"><code>{{ r.path }}</code> · task {{ r.task }} · best metric {{ r.best_metric }}</p>
{% for n in r.notes %}<p class="note">{{ n }}</p>
{% endfor %}
{% for a in pr.analyses %}
<h3>Error analysis on <code>{{ a.data }}</code></h3>
<p class="meta">best model{% if a.step is not none %} from step {{ a.step }}{% endif %}{% if a.examples is not none %}, {{ a.examples }} examples{% endif %}</p>
{{ table(a.metrics.head, a.metrics.rows, "metrics") }}
{% if a.confusion or a.reliability %}
<div class="pair">
{% if a.confusion %}{{ plot(a.confusion, "confusion-" ~ r.name ~ a.suffix, "confusion matrix of " ~ r.name ~ " on " ~ a.stem) }}{% endif %}
{% if a.reliability %}{{ plot(a.reliability, "reliability-" ~ r.name ~ a.suffix, "reliability diagram of " ~ r.name ~ " on " ~ a.stem) }}{% endif %}
</div>
{% endif %}
{% for cls, title, head, rows in a.tables %}
<h4>{{ title }}</h4>
{{ table(head, rows, cls) }}
{% endfor %}
<h4>{{ a.worst.title }}</h4>
{% if a.worst.rows %}{{ table(a.worst.head, a.worst.rows, "worst") }}{% else %}<p class="note">No errors to show.</p>{% endif %}
{% endfor %}
<h3>Baselines</h3>
{% for b in pr.baselines %}
<h4>on <code>{{ b.data }}</code></h4>
{{ table(b.head, b.rows, "baselines") }}
{% for f in b.flags %}<p class="note flag">Warning: {{ f }}.</p>{% endfor %}
{% else %}
<p class="note">No baselines yet: <code>sftlab eval {{ r.path }} --data {{ r.dev_data or "FILE" }} --baselines</code></p>
{% endfor %}
<h3>Resolved config</h3>
<pre class="config">{{ r.config_text }}</pre>
{% endfor %}
</body>
</html>
"""
