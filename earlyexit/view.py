"""See the lens: a self-contained, interactive page of the logit lens (tokens × layers).

One row per hidden-state entry 0..L, one column per token; each cell shows the lens's top-1 token at
that entry and position, coloured by a statistic chosen in the page (top-1 probability, entropy, KL to
the final layer, rank of the token the model finally predicts). Hovering or focusing a cell shows its
top-k. All numbers come from :func:`earlyexit.core.lens.lens_stats` (top-k, entropy, KL, target
rank — never layers × positions × vocabulary) and are embedded as JSON; the page needs no network.

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
...                   num_attention_heads=2, num_key_value_heads=1, eos_token_id=None)
>>> _ = torch.manual_seed(0)
>>> model = LlamaForCausalLM(cfg).eval()
>>> class Tok:  # token ids are passed in, so a stand-in with decode() is enough here
...     pad_token_id = eos_token_id = None
...     def decode(self, ids, **kw): return "".join(f" t{i}" for i in ids)
>>> view = lens_view(model, Tok(), [5, 9, 12], lens=["normed", "raw"], max_new_tokens=2)
>>> len(view.data["layers"]), len(view.data["tokens"]), view.data["generated_from"]
(3, 5, 3)
>>> view.html.startswith("<!DOCTYPE html>") and "http" not in view.html
True
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import torch

from earlyexit.core.atomic import write_text

LensArg = Any  # a lens name ("normed", "raw") or a Lens object with a ``.name``
TokensArg = Union[str, Sequence[int], torch.Tensor]

#: statistics the page colours by: key → label
STATISTICS = {
    "prob": "top-1 probability",
    "entropy": "entropy (nats)",
    "kl": "KL(final ‖ layer) (nats)",
    "rank": "rank of the final prediction (0 = top)",
}


def _lens_name(lens: LensArg) -> str:
    """A lens's display name: its ``.name``, or the string itself."""
    return str(getattr(lens, "name", lens))


def display_token(text: str) -> str:
    """A token made readable in one line: ``␣`` for spaces, ``↵`` for newlines, ``⇥`` for tabs.

    >>> display_token(" Paris\\n")
    '␣Paris↵'
    >>> display_token("")
    '∅'
    """
    if text == "":
        return "∅"
    out = []
    for ch in text:
        if ch == " ":
            out.append("␣")
        elif ch == "\n":
            out.append("↵")
        elif ch == "\t":
            out.append("⇥")
        elif ch == "\r":
            out.append("␍")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def _sig(x: float, digits: int = 3) -> float | None:
    """``x`` to ``digits`` significant digits (short JSON); None for NaN/inf."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def embed_json(obj: Any) -> str:
    """JSON safe inside ``<script type="application/json">``: ``<``, ``>``, ``&`` as ``\\u003c`` etc.

    >>> embed_json({"t": "</script>&"})
    '{"t":"\\\\u003c/script\\\\u003e\\\\u0026"}'
    """
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


@dataclass
class LensView:
    """A rendered lens page: ``html`` (a complete, self-contained document) and the ``data`` in it.

    data: ``layers`` (E entries), ``tokens`` (T indices into ``strings``, the display text of every
    token that appears), ``token_ids`` [T], ``generated_from`` (index of the first generated token; T
    when none), ``final`` [T] (the model's own top-1 at each position), and per lens ``top`` / ``p``
    [E][T][k], ``entropy`` / ``kl`` / ``rank`` [E][T]. results: the :class:`LensResult` per lens name.
    """

    html: str
    data: dict[str, Any]
    results: dict[str, Any] = field(default_factory=dict, repr=False)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the page to ``path`` atomically."""
        return write_text(path, self.html)

    def save_figure(self, path: str | os.PathLike, stat: str = "prob", lens: str | None = None,
                    dpi: int = 150) -> list[Path]:
        """The static grid (:func:`plot_lens_grid`) as ``path``'s stem ``.png`` and ``.pdf``."""
        from earlyexit.plotting import save_figure

        fig = plot_lens_grid(self, stat=stat, lens=lens).figure
        path = Path(path)
        with warnings.catch_warnings():  # a token in a script the font lacks is drawn as a box
            warnings.filterwarnings("ignore", message="Glyph .* missing from font")
            return save_figure(fig, path.stem if path.suffix in (".png", ".pdf") else path.name, path.parent,
                               dpi=dpi)

    def _repr_html_(self) -> str:
        import html as _html

        height = min(900, 170 + 24 * (len(self.data["layers"]) + 1))
        return (f'<iframe srcdoc="{_html.escape(self.html, quote=True)}" style="width:100%;height:{height}px;'
                'border:1px solid #ddd" title="lens viewer"></iframe>')


def _as_ids(tokenizer, model, prompt_or_ids: TokensArg) -> tuple[list[int], str | None]:
    from earlyexit.core.batching import encode_prompts

    if isinstance(prompt_or_ids, str):
        return encode_prompts(tokenizer, [prompt_or_ids], model)[0], prompt_or_ids
    if isinstance(prompt_or_ids, torch.Tensor):
        prompt_or_ids = prompt_or_ids.reshape(-1).tolist()
    ids = [int(t) for t in prompt_or_ids]
    if not ids:
        raise ValueError("No token ids given: pass a prompt string or a non-empty list of ids.")
    return ids, None


def _lens_list(lens: LensArg | Sequence[LensArg]) -> list[LensArg]:
    lenses = list(lens) if isinstance(lens, (list, tuple)) else [lens]
    if not lenses:
        raise ValueError("No lens given: pass a lens (e.g. 'normed') or a list of lenses.")
    names = [_lens_name(x) for x in lenses]
    if len(set(names)) != len(names):
        raise ValueError(f"Lens names repeat: {names}; give each lens once.")
    return lenses


def lens_view(
    model,
    tokenizer,
    prompt_or_ids: TokensArg,
    *,
    lens: LensArg | Sequence[LensArg] = "normed",
    max_new_tokens: int = 0,
    layers: Sequence[int] | None = None,
    top_k: int = 5,
    title: str | None = None,
) -> LensView:
    """The lens page of one prompt (a string, or its ``T`` token ids).

    ``max_new_tokens > 0`` first extends the prompt by greedy decoding (EOS ends it early); the whole
    prompt + generation is then read with :func:`lens_stats` at every position, and the generated
    columns are marked. ``lens``: one lens or a list (the page switches between them). For every
    lens and entry e, position t: top-``top_k`` ids and probabilities, entropy, KL to the final layer
    and the rank of the model's own top-1 at t (its final prediction). Returns a :class:`LensView`
    whose ``html`` holds ``E × T`` cells (E = len(layers), all of 0..L by default).
    """
    from earlyexit.core.generation import generate_with_lens
    from earlyexit.core.lens import check_layers, lens_stats, n_layers

    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be ≥ 0, got {max_new_tokens}")
    if top_k < 1:
        raise ValueError(f"top_k must be ≥ 1, got {top_k}")
    lenses = _lens_list(lens)
    entries = check_layers(model, layers)
    L = n_layers(model)
    ids, prompt_text = _as_ids(tokenizer, model, prompt_or_ids)
    n_prompt = len(ids)
    if max_new_tokens > 0:
        gen = generate_with_lens(model, tokenizer, [ids], max_new_tokens=max_new_tokens, stop=(), layers=[L],
                                 top_k=1)[0]
        ids = ids + list(gen.token_ids)
    # the model's own prediction at every position: the normed lens at entry L is the model's output
    final = lens_stats(model, tokenizer, [ids], positions="all", layers=[L], lens="normed", top_k=1)
    final_ids = final.top_ids[0, 0, :, 0].tolist()
    results = {}
    for ln in lenses:
        results[_lens_name(ln)] = lens_stats(model, tokenizer, [ids], positions="all", layers=entries, lens=ln,
                                             top_k=top_k, targets=[final_ids], kl=True)
    data = build_view_data(tokenizer, ids, n_prompt, results, final_ids, vocab_size=_vocab_size(model),
                           model=_model_name(model), prompt=prompt_text)
    if title is not None:
        data["title"] = title
    return LensView(html=render_html(data), data=data, results=results)


def _vocab_size(model) -> int:
    from earlyexit.core.lens import get_unembed

    return get_unembed(model).vocab_size


def _model_name(model) -> str:
    try:
        from earlyexit.core.models import model_name

        return str(model_name(model))
    except Exception:  # a model the loader does not know: its class name
        return type(model).__name__


def build_view_data(tokenizer, ids: Sequence[int], n_prompt: int, results: dict[str, Any],
                    final_ids: Sequence[int], *, vocab_size: int, model: str = "",
                    prompt: str | None = None) -> dict[str, Any]:
    """The page's JSON: token strings once in a table, per lens ``[E][T]`` statistics (see :class:`LensView`).

    ids: the ``T`` tokens read; results: lens name → :class:`LensResult` of one prompt at all T
    positions (top_ids / top_probs ``[1, E, T, k]``, entropy / kl_to_final ``[1, E, T]``,
    target_ranks ``[1, E, T, 1]`` of ``final_ids``).
    """
    strings: list[str] = []
    index: dict[int, int] = {}

    def ref(i: int) -> int:
        i = int(i)
        if i not in index:
            index[i] = len(strings)
            strings.append(display_token(tokenizer.decode([i])) if i >= 0 else "")
        return index[i]

    T = len(ids)
    tokens = [ref(i) for i in ids]
    final = [ref(i) for i in final_ids]
    first = next(iter(results.values()))
    lens_data = []
    for name, r in results.items():
        if r.top_ids.shape[2] != T:
            raise ValueError(f"Lens {name!r}: {r.top_ids.shape[2]} positions for {T} tokens; read all positions.")
        top = r.top_ids[0].tolist()
        lens_data.append({
            "name": name,
            "top": [[[ref(i) for i in cell] for cell in row] for row in top],
            "p": [[[_sig(p) for p in cell] for cell in row] for row in r.top_probs[0].tolist()],
            "entropy": [[_sig(x) for x in row] for row in r.entropy[0].tolist()],
            "kl": [[_sig(max(x, 0.0)) for x in row] for row in r.kl_to_final[0].tolist()],
            "rank": r.target_ranks[0, :, :, 0].tolist(),
        })
    return {
        "version": 1,
        "model": model,
        "prompt": prompt if prompt is not None else tokenizer.decode(list(ids[:n_prompt])),
        "layers": list(first.layers),
        "vocab_size": int(vocab_size),
        "top_k": int(first.top_ids.shape[-1]),
        "strings": strings,
        "tokens": tokens,
        "token_ids": [int(i) for i in ids],
        "generated_from": int(n_prompt),
        "final": final,
        "stats": [{"key": k, "label": v} for k, v in STATISTICS.items()],
        "lenses": lens_data,
    }


def render_html(data: dict[str, Any]) -> str:
    """A complete HTML document showing ``data`` (from :func:`build_view_data`); inline CSS and JS only."""
    return (_TEMPLATE.replace("/*CSS*/", _CSS).replace("/*JS*/", _JS)
            .replace("/*DATA*/", embed_json(data)))


def _stat_values(data: dict[str, Any], lens: dict[str, Any], stat: str) -> list[list[float]]:
    if stat == "prob":
        return [[c[0] for c in row] for row in lens["p"]]
    if stat in ("entropy", "kl", "rank"):
        return lens[stat]
    raise ValueError(f"Unknown statistic {stat!r}; use one of {list(STATISTICS)}.")


def plot_lens_grid(view: LensView | dict[str, Any], stat: str = "prob", lens: str | None = None, ax=None,
                   max_chars: int = 8, cmap: str = "Blues"):
    """The static grid for papers: entries (rows, 0 at the bottom) × tokens, top-1 text in each cell.

    ``view``: a :class:`LensView` or its data; ``stat``: one of :data:`STATISTICS`; ``lens``: which
    lens (default the first). Draws ``E × T`` coloured cells into ``ax`` (a new figure, no pyplot
    state, when None) and returns the axes.
    """
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    data = view.data if isinstance(view, LensView) else view
    names = [x["name"] for x in data["lenses"]]
    if lens is None:
        lens = names[0]
    if lens not in names:
        raise ValueError(f"Lens {lens!r} is not in this view; it has {names}.")
    ld = data["lenses"][names.index(lens)]
    vals = np.array(_stat_values(data, ld, stat), dtype=float)  # [E, T]
    E, T = vals.shape
    if ax is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(max(6.0, 0.62 * T + 1.8), max(3.0, 0.27 * E + 1.4)))
        ax = fig.add_subplot()
    if stat == "prob":
        norm = Normalize(0, 1)
    elif stat == "entropy":
        norm = Normalize(0, math.log(data["vocab_size"]))
    elif stat == "kl":
        norm = Normalize(0, max(1e-6, float(np.nanmax(vals))))
    else:
        norm = LogNorm(1, data["vocab_size"])
        vals = vals + 1
    im = ax.imshow(vals, aspect="auto", origin="lower", cmap=cmap, norm=norm, interpolation="nearest")
    strings = data["strings"]
    fontsize = 6.5 if T <= 40 else 5.5
    rgba = im.cmap(im.norm(vals))
    for e in range(E):
        for t in range(T):
            text = strings[ld["top"][e][t][0]]
            if len(text) > max_chars:
                text = text[: max_chars - 1] + "…"
            r, g, b = rgba[e, t, :3]
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(t, e, text, ha="center", va="center", fontsize=fontsize, color="white" if dark else "black")
    g0 = data["generated_from"]
    ax.set_xticks(range(T), [strings[i][:max_chars] for i in data["tokens"]], rotation=70, fontsize=7,
                  ha="right", rotation_mode="anchor")
    for t, label in enumerate(ax.get_xticklabels()):
        if t >= g0:
            label.set_color("tab:orange")
    if g0 < T:
        ax.axvline(g0 - 0.5, color="tab:orange", lw=1.2)
    step = 1 if E <= 20 else 2
    ax.set_yticks(range(0, E, step), [str(data["layers"][e]) for e in range(0, E, step)], fontsize=7)
    ax.set_ylabel("hidden-state entry")
    ax.set_xlabel("input token" + ("  (orange: generated)" if g0 < T else ""))
    title = data.get("title") or f"{data['model']} · {lens} lens · colour: {STATISTICS[stat]}"
    ax.set_title(title, fontsize=9)
    cb = ax.figure.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    cb.ax.tick_params(labelsize=7)
    cb.set_label(STATISTICS[stat], fontsize=7)
    return ax


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>Lens viewer</title>
<style>/*CSS*/</style>
</head>
<body>
<header>
  <h1 id="title">Lens viewer</h1>
  <p id="prompt" class="prompt"></p>
  <div class="controls">
    <label>colour by <select id="stat"></select></label>
    <label id="lens-label">lens <select id="lens"></select></label>
    <span id="legend" class="legend"><span id="lo"></span><span id="ramp" class="ramp"></span><span id="hi"></span></span>
  </div>
  <p class="help">Each cell: the lens's top-1 next token at that entry (row) after that token (column).
  Hover or focus a cell (Tab, arrow keys) for its top-<span id="k"></span>.
  <span id="gen-note"></span></p>
</header>
<div id="wrap" class="wrap"><table id="grid" class="grid"><tbody></tbody><tfoot></tfoot></table></div>
<div id="tip" class="tip" role="tooltip" hidden></div>
<script type="application/json" id="lens-data">/*DATA*/</script>
<script>/*JS*/</script>
</body>
</html>
"""

_CSS = """
body{font:13px/1.35 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:12px;color:#222;background:#fff}
h1{font-size:16px;margin:0 0 4px}
.prompt{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;margin:0 0 6px;color:#444;max-height:6em;overflow:auto}
.controls{display:flex;gap:16px;align-items:center;flex-wrap:wrap;margin:4px 0}
.legend{display:inline-flex;gap:6px;align-items:center;font-size:12px}
.ramp{display:inline-block;width:140px;height:12px;border:1px solid #ccc}
.help{color:#666;font-size:12px;margin:4px 0 8px}
.wrap{overflow:auto;max-height:80vh;max-width:100%;border:1px solid #ddd}
.grid{border-collapse:separate;border-spacing:0;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.grid td,.grid th{padding:2px 4px;white-space:nowrap;max-width:7em;min-width:2.5em;overflow:hidden;text-overflow:ellipsis;border-right:1px solid rgba(0,0,0,.06);border-bottom:1px solid rgba(0,0,0,.06)}
.grid td.cell{cursor:default;text-align:center}
.grid td.cell:focus,.grid td.cell:hover{outline:2px solid #e6550d;outline-offset:-2px}
.grid th.layer{position:sticky;left:0;background:#f6f6f6;text-align:right;z-index:1;font-weight:normal;color:#555}
.grid tfoot th{position:sticky;bottom:0;background:#f6f6f6;font-weight:bold;z-index:1}
.grid tfoot th.corner{left:0;z-index:2}
.grid th.tok.gen{color:#c2410c;font-style:italic;background:#fff1e6}
.grid .gstart{border-left:2px solid #e6550d}
.tip{position:fixed;z-index:10;background:#fff;border:1px solid #bbb;box-shadow:0 2px 8px rgba(0,0,0,.2);padding:6px 8px;font-size:12px;max-width:420px;pointer-events:none}
.tip .head{color:#555;margin-bottom:4px}
.tip table{border-collapse:collapse;font-family:ui-monospace,Menlo,Consolas,monospace}
.tip td{padding:1px 6px 1px 0;white-space:pre}
.tip td.bar span{display:inline-block;height:9px;background:#3182bd}
.tip tr.next td.tk{font-weight:bold;color:#c2410c}
.tip .foot{color:#555;margin-top:4px}
"""

_JS = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("lens-data").textContent);
  var S = D.strings, E = D.layers.length, T = D.tokens.length, V = D.vocab_size;
  var cur = {lens: 0, stat: "prob"};
  var klMax = 1e-6;
  D.lenses.forEach(function (l) { l.kl.forEach(function (row) { row.forEach(function (x) {
    if (x !== null && x > klMax) klMax = x; }); }); });
  function value(l, e, t, stat) {
    if (stat === "prob") return l.p[e][t][0];
    return l[stat][e][t];
  }
  function norm(v, stat) {  // value -> [0, 1]
    if (v === null || v === undefined || isNaN(v)) return 0;
    if (stat === "prob") return v;
    if (stat === "entropy") return v / Math.log(V);
    if (stat === "kl") return v / klMax;
    return Math.log(1 + Math.max(v, 0)) / Math.log(V);
  }
  // matplotlib's "Blues", light to dark
  var STOPS = [[247,251,255],[222,235,247],[198,219,239],[158,202,225],[107,174,214],[66,146,198],[33,113,181],[8,81,156],[8,48,107]];
  function colour(x) {
    x = Math.min(1, Math.max(0, x)) * (STOPS.length - 1);
    var i = Math.min(STOPS.length - 2, Math.floor(x)), f = x - i, a = STOPS[i], b = STOPS[i + 1];
    var c = [0, 1, 2].map(function (j) { return Math.round(a[j] + (b[j] - a[j]) * f); });
    return {bg: "rgb(" + c.join(",") + ")", fg: (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) < 128 ? "#fff" : "#111"};
  }
  function fmtP(p) {
    if (p === null) return "–";
    if (p >= 0.001) return (100 * p).toFixed(p >= 0.1 ? 1 : 2) + "%";
    return (100 * p).toExponential(1) + "%";
  }
  function fmt(v, stat) {
    if (v === null || v === undefined) return "–";
    if (stat === "prob") return fmtP(v);
    if (stat === "rank") return String(v);
    return v.toFixed(2);
  }
  var LABEL = {};
  D.stats.forEach(function (s) { LABEL[s.key] = s.label; });

  document.title = "Lens viewer · " + D.model;
  document.getElementById("title").textContent = D.title || ("Lens viewer · " + D.model);
  document.getElementById("prompt").textContent = D.prompt;
  document.getElementById("k").textContent = String(D.top_k);
  if (D.generated_from < T) {
    document.getElementById("gen-note").textContent = "Columns in orange (from position " + D.generated_from +
      ") are tokens the model generated (greedy).";
  }
  var statSel = document.getElementById("stat"), lensSel = document.getElementById("lens");
  D.stats.forEach(function (s) {
    var o = document.createElement("option"); o.value = s.key; o.textContent = s.label; statSel.appendChild(o);
  });
  D.lenses.forEach(function (l, i) {
    var o = document.createElement("option"); o.value = String(i); o.textContent = l.name; lensSel.appendChild(o);
  });
  if (D.lenses.length < 2) document.getElementById("lens-label").hidden = true;

  var grid = document.getElementById("grid"), body = grid.tBodies[0], foot = grid.tFoot;
  var cells = [];
  for (var e = E - 1; e >= 0; e--) {
    var tr = document.createElement("tr"), th = document.createElement("th");
    th.className = "layer"; th.textContent = String(D.layers[e]); th.title = "hidden-state entry " + D.layers[e];
    tr.appendChild(th);
    cells[e] = [];
    for (var t = 0; t < T; t++) {
      var td = document.createElement("td");
      td.className = "cell" + (t === D.generated_from ? " gstart" : "");
      td.tabIndex = 0; td.dataset.e = String(e); td.dataset.t = String(t);
      tr.appendChild(td); cells[e][t] = td;
    }
    body.appendChild(tr);
  }
  var ftr = document.createElement("tr"), corner = document.createElement("th");
  corner.className = "layer corner"; corner.textContent = "entry"; corner.title = "rows: hidden-state entries; columns: tokens"; ftr.appendChild(corner);
  for (var t2 = 0; t2 < T; t2++) {
    var fth = document.createElement("th");
    fth.className = "tok" + (t2 >= D.generated_from ? " gen" : "") + (t2 === D.generated_from ? " gstart" : "");
    fth.textContent = S[D.tokens[t2]];
    fth.title = "position " + t2 + " · id " + D.token_ids[t2] + (t2 >= D.generated_from ? " · generated" : "");
    ftr.appendChild(fth);
  }
  foot.appendChild(ftr);

  function render() {
    var l = D.lenses[cur.lens];
    for (var e = 0; e < E; e++) for (var t = 0; t < T; t++) {
      var td = cells[e][t], txt = S[l.top[e][t][0]], v = value(l, e, t, cur.stat), c = colour(norm(v, cur.stat));
      td.textContent = txt;
      td.style.backgroundColor = c.bg; td.style.color = c.fg;
      td.setAttribute("aria-label", "entry " + D.layers[e] + ", position " + t + ": " + txt + ", " +
        LABEL[cur.stat] + " " + fmt(v, cur.stat));
    }
    var lo = "0", hi = "1";
    if (cur.stat === "entropy") hi = Math.log(V).toFixed(1) + " (ln V)";
    else if (cur.stat === "kl") hi = klMax.toFixed(1);
    else if (cur.stat === "rank") hi = String(V) + " (log)";
    document.getElementById("lo").textContent = lo;
    document.getElementById("hi").textContent = hi;
    var stops = [0, 0.25, 0.5, 0.75, 1].map(function (x) { return colour(x).bg; });
    document.getElementById("ramp").style.background = "linear-gradient(to right," + stops.join(",") + ")";
  }
  var tip = document.getElementById("tip");
  function show(td) {
    var e = +td.dataset.e, t = +td.dataset.t, l = D.lenses[cur.lens];
    while (tip.firstChild) tip.removeChild(tip.firstChild);
    var head = document.createElement("div"); head.className = "head";
    head.textContent = "entry " + D.layers[e] + " · after “" + S[D.tokens[t]] + "” (position " + t + ") · " +
      l.name + " lens";
    tip.appendChild(head);
    var tab = document.createElement("table"), tb = document.createElement("tbody");
    var next = t + 1 < T ? D.tokens[t + 1] : -1;
    for (var j = 0; j < l.top[e][t].length; j++) {
      var tr = document.createElement("tr"), p = l.p[e][t][j];
      if (l.top[e][t][j] === next) tr.className = "next";
      var a = document.createElement("td"); a.className = "tk"; a.textContent = S[l.top[e][t][j]];
      var b = document.createElement("td"); b.className = "bar";
      var span = document.createElement("span"); span.style.width = Math.round(80 * (p || 0)) + "px"; b.appendChild(span);
      var c = document.createElement("td"); c.className = "pv"; c.textContent = fmtP(p);
      tr.appendChild(a); tr.appendChild(b); tr.appendChild(c); tb.appendChild(tr);
    }
    tab.appendChild(tb); tip.appendChild(tab);
    var f = document.createElement("div"); f.className = "foot";
    f.textContent = "entropy " + fmt(l.entropy[e][t], "entropy") + " nats · KL to final " + fmt(l.kl[e][t], "kl") +
      " · final prediction “" + S[D.final[t]] + "” at rank " + fmt(l.rank[e][t], "rank") +
      (next >= 0 ? " · actual next “" + S[next] + "”" : "");
    tip.appendChild(f);
    tip.hidden = false;
    var r = td.getBoundingClientRect(), w = tip.offsetWidth, h = tip.offsetHeight;
    var x = Math.min(r.left, window.innerWidth - w - 4), y = r.bottom + 4;
    if (y + h > window.innerHeight) y = Math.max(4, r.top - h - 4);
    tip.style.left = Math.max(4, x) + "px"; tip.style.top = y + "px";
  }
  function hide() { tip.hidden = true; }
  grid.addEventListener("mouseover", function (ev) { var td = ev.target.closest("td.cell"); if (td) show(td); });
  grid.addEventListener("mouseleave", hide);
  grid.addEventListener("focusin", function (ev) { var td = ev.target.closest("td.cell"); if (td) show(td); });
  grid.addEventListener("focusout", hide);
  grid.addEventListener("keydown", function (ev) {
    var td = ev.target.closest("td.cell"); if (!td) return;
    var e = +td.dataset.e, t = +td.dataset.t;
    if (ev.key === "ArrowLeft") t = Math.max(0, t - 1);
    else if (ev.key === "ArrowRight") t = Math.min(T - 1, t + 1);
    else if (ev.key === "ArrowUp") e = Math.min(E - 1, e + 1);
    else if (ev.key === "ArrowDown") e = Math.max(0, e - 1);
    else if (ev.key === "Escape") { hide(); return; }
    else return;
    ev.preventDefault(); cells[e][t].focus();
  });
  statSel.addEventListener("change", function () { cur.stat = statSel.value; render(); hide(); });
  lensSel.addEventListener("change", function () { cur.lens = +lensSel.value; render(); hide(); });
  render();
  document.body.dataset.ready = "1";
})();
"""
