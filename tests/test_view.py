"""The lens viewer: the page's data against lens_stats, escaping, size; and the page in headless Chromium."""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import torch

from earlyexit import lens_stats
from earlyexit.core.batching import encode_prompts
from earlyexit.core.lens import n_layers
from earlyexit.view import LensView, display_token, embed_json, lens_view, plot_lens_grid

NASTY = 'if a < b && c > "d" or \'e\'\nthen </script><script>alert(1)</script> &amp; done'


@pytest.fixture(scope="module")
def view(tiny_llama):
    """Two lenses, three generated tokens, on a prompt that tries to break out of the page."""
    model, tok = tiny_llama
    return lens_view(model, tok, NASTY, lens=["normed", "raw"], max_new_tokens=3)


def _data_block(page: str) -> str:
    m = re.search(r'<script type="application/json" id="lens-data">(.*?)</script>', page, re.S)
    assert m, "no data block"
    return m.group(1)


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)


def test_data_matches_lens_stats(view, tiny_llama):
    model, tok = tiny_llama
    L = n_layers(model)
    d = view.data
    ids = d["token_ids"]
    T = len(ids)
    assert d["layers"] == list(range(L + 1)) and len(d["tokens"]) == T
    assert [d["strings"][i] for i in d["tokens"]] == [display_token(tok.decode([i])) for i in ids]
    assert [x["name"] for x in d["lenses"]] == ["normed", "raw"]
    final = lens_stats(model, tok, [ids], positions="all", layers=[L], top_k=1).top_ids[0, 0, :, 0].tolist()
    assert [d["strings"][i] for i in d["final"]] == [display_token(tok.decode([i])) for i in final]
    for ld in d["lenses"]:
        r = lens_stats(model, tok, [ids], positions="all", lens=ld["name"], top_k=5, kl=True, targets=[final])
        assert len(ld["top"]) == L + 1 and all(len(row) == T and all(len(c) == 5 for c in row) for row in ld["top"])
        for e in range(L + 1):
            for t in range(T):
                want = [display_token(tok.decode([i])) for i in r.top_ids[0, e, t].tolist()]
                assert [d["strings"][i] for i in ld["top"][e][t]] == want
        assert torch.allclose(torch.tensor(ld["p"]), r.top_probs[0], rtol=6e-3, atol=1e-7)
        assert torch.allclose(torch.tensor(ld["entropy"]), r.entropy[0], rtol=6e-3, atol=1e-6)
        assert torch.allclose(torch.tensor(ld["kl"]), r.kl_to_final[0].clamp(min=0), rtol=6e-3, atol=1e-5)
        assert ld["rank"] == r.target_ranks[0, :, :, 0].tolist()  # rank of the final prediction, 0 = top
    normed = d["lenses"][0]
    # the model's final prediction is the normed lens's top-1 at entry L: rank 0 and KL 0 there
    assert [normed["top"][L][t][0] for t in range(T)] == d["final"]
    assert normed["rank"][L] == [0] * T and max(normed["kl"][L]) < 1e-4


def test_generated_columns_are_the_greedy_continuation(view, tiny_llama):
    model, tok = tiny_llama
    d = view.data
    n = d["generated_from"]
    assert n == len(encode_prompts(tok, [NASTY], model)[0])
    assert 0 < len(d["token_ids"]) - n <= 3
    # each generated token is the model's own top-1 at the position before it
    for t in range(n, len(d["token_ids"])):
        assert d["final"][t - 1] == d["tokens"][t]


def test_escaping_keeps_the_page_whole(view):
    page = view.html
    block = _data_block(page)
    assert not set("<>&") & set(block), "raw < > & inside the JSON block"
    data = json.loads(block)
    assert data["prompt"] == NASTY and data == json.loads(embed_json(view.data))
    # exactly our two scripts: the prompt's </script><script> did not open a new one
    parser = _Tags()
    parser.feed(page)
    assert parser.tags.count("script") == 2 and page.count("</script>") == 2
    # tokens with newlines, quotes and ampersands survive, readable
    joined = "".join(data["strings"][i] for i in data["tokens"][: data["generated_from"]])
    assert "↵" in joined and '"' in joined and "&" in joined and "</" in joined
    assert "http://" not in page and "https://" not in page and "src=" not in page


def test_display_token_and_embed_json():
    assert display_token(" a\tb\r\n\x00") == "␣a⇥b␍↵\\x00"
    assert display_token("") == "∅"
    s = embed_json({"x": "</script>\u2028'\"&"})
    assert "<" not in s and "&" not in s and "\u2028" not in s
    assert json.loads(s) == {"x": "</script>\u2028'\"&"}


def test_save_and_notebook_repr(view, tmp_path):
    out = view.save(tmp_path / "sub" / "lens.html")
    assert out.read_text() == view.html
    assert [p.name for p in out.parent.iterdir()] == ["lens.html"]  # no temporary left behind
    rep = view._repr_html_()
    assert rep.startswith('<iframe srcdoc="') and "<script" not in rep
    assert html.unescape(rep[len('<iframe srcdoc="'): rep.index('" style=')]) == view.html


def test_static_figure_png_and_pdf(view, tmp_path):
    paths = view.save_figure(tmp_path / "grid.png", stat="rank", lens="raw")
    assert sorted(p.name for p in paths) == ["grid.pdf", "grid.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    for stat in ("prob", "entropy", "kl", "rank"):
        ax = plot_lens_grid(view.data, stat=stat)
        assert len(ax.texts) == len(view.data["layers"]) * len(view.data["tokens"])
    with pytest.raises(ValueError, match="statistic"):
        plot_lens_grid(view, stat="nope")
    with pytest.raises(ValueError, match="not in this view"):
        plot_lens_grid(view, lens="tuned")


def test_bad_arguments(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(ValueError, match="repeat"):
        lens_view(model, tok, "Hi", lens=["normed", "normed"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        lens_view(model, tok, "Hi", max_new_tokens=-1)
    with pytest.raises(IndexError, match="out of range"):
        lens_view(model, tok, "Hi", layers=[99])
    with pytest.raises(ValueError, match="lens"):
        lens_view(model, tok, "Hi", lens="tuned-nonexistent")


def test_lens_objects_are_named_by_their_name(tiny_llama):
    from earlyexit.core.lenses import resolve_lens

    model, tok = tiny_llama
    v = lens_view(model, tok, "Hello world", lens=[resolve_lens(model, "raw"), "normed"])
    assert [x["name"] for x in v.data["lenses"]] == ["raw", "normed"] and set(v.results) == {"raw", "normed"}


def test_encode_prompts_takes_token_ids(tiny_llama):
    model, tok = tiny_llama
    assert encode_prompts(tok, [[5, 6, 7], "Hi"], model)[0] == [5, 6, 7]
    with pytest.raises(TypeError, match="wrap it"):
        encode_prompts(tok, [5, 6, 7], model)
    with pytest.raises(ValueError, match="no tokens"):
        encode_prompts(tok, [[]], model)


def test_page_for_64_tokens_and_31_entries_is_under_1_mb(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=30,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, tokenizer.vocab_size, (64,)).tolist()
    one = lens_view(model, tokenizer, ids)
    two = lens_view(model, tokenizer, ids, lens=["normed", "raw"])
    assert len(one.data["layers"]) == 31 and len(one.data["tokens"]) == 64
    sizes = {k: len(v.html.encode()) for k, v in (("one lens", one), ("two lenses", two))}
    print(f"64 tokens × 31 entries: {sizes}")
    assert sizes["two lenses"] < 1_000_000, sizes


# ---- slow tier: the real model through the CLI, and the page in a real browser ----

@pytest.mark.slow
def test_cli_html_png_json(tmp_path, smollm2):
    from earlyexit.cli import main

    h, p, j = tmp_path / "v.html", tmp_path / "g.png", tmp_path / "t.json"
    argv = ["lens", "--prompt", "The capital of France is", "--lens", "normed,raw", "--generate", "2",
            "--html", str(h), "--png", str(p), "--json", str(j)]
    assert main(argv) == 0
    data = json.loads(_data_block(h.read_text()))
    assert [x["name"] for x in data["lenses"]] == ["normed", "raw"] and len(data["layers"]) == 31
    assert len(data["tokens"]) - data["generated_from"] == 2
    assert p.stat().st_size > 0 and (tmp_path / "g.pdf").stat().st_size > 0
    table = json.loads(j.read_text())
    assert table["lens"] == "normed" and table["layers"][-1]["top_tokens"][0] == " Paris"
    assert set(table["lenses"]) == {"normed", "raw"}
    with pytest.raises(SystemExit):  # argparse rejects an unknown lens before loading anything
        main(["lens", "--prompt", "x", "--lens", "normed,bogus"])


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1000,800"]


def _ensure_chromium() -> None:
    """Chromium and chromedriver, installed with apt-get when missing (as .ci/run does); skip if impossible."""
    have = lambda: os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)  # noqa: E731
    if have():
        return
    why = "apt-get is not available"
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        done = subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                              "chromium chromium-driver", shell=True, capture_output=True, text=True, timeout=1200)
        why = f"apt-get install failed: {done.stderr.strip()[-300:]}"
    elif shutil.which("apt-get"):
        why = "not root, so apt-get cannot install it"
    if not have():
        pytest.skip(f"headless Chromium is missing ({CHROMIUM}, {CHROMEDRIVER}) and could not be installed: {why}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    _ensure_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chrome-profile')}"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.get("about:blank")
    yield driver
    driver.quit()


@pytest.mark.slow
def test_page_in_headless_chromium(view, tiny_llama, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    model, tok = tiny_llama
    L, d = n_layers(model), view.data
    T, n = len(d["tokens"]), d["generated_from"]
    path = view.save(tmp_path / "lens.html")
    browser.get_log("performance"), browser.get_log("browser")  # drop what the start page logged
    browser.get(path.resolve().as_uri())
    WebDriverWait(browser, 20).until(lambda b: b.execute_script("return document.body.dataset.ready === '1'"))

    cells = browser.find_elements(By.CSS_SELECTOR, "#grid td.cell")
    assert len(cells) == (L + 1) * T
    heads = browser.find_elements(By.CSS_SELECTOR, "#grid tfoot th.tok")
    assert len(heads) == T and len(browser.find_elements(By.CSS_SELECTOR, "#grid tfoot th.tok.gen")) == T - n
    assert [h.get_attribute("textContent") for h in heads] == [display_token(tok.decode([i])) for i in d["token_ids"]]
    assert browser.find_element(By.ID, "prompt").get_attribute("textContent") == NASTY

    def cell(e, t):
        return browser.find_element(By.CSS_SELECTOR, f'#grid td.cell[data-e="{e}"][data-t="{t}"]')

    sample = [(0, 0), (L, T - 1), (L // 2, T // 2), (1, n), (L - 1, 3)]
    by_lens = {name: lens_stats(model, tok, [d["token_ids"]], positions="all", lens=name, top_k=5)
               for name in ("normed", "raw")}

    def check_top1(name):
        for e, t in sample:
            want = display_token(tok.decode([by_lens[name].top_ids[0, e, t, 0].item()]))
            assert cell(e, t).get_attribute("textContent") == want, (name, e, t)

    check_top1("normed")

    # hover: the tooltip lists the cell's top-5
    tip = browser.find_element(By.ID, "tip")
    e, t = L // 2, T // 2
    ActionChains(browser).move_to_element(cell(e, t)).perform()
    WebDriverWait(browser, 5).until(lambda b: tip.is_displayed())
    rows = tip.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) == 5
    want = [display_token(tok.decode([i])) for i in by_lens["normed"].top_ids[0, e, t].tolist()]
    assert [r.find_element(By.CSS_SELECTOR, "td.tk").get_attribute("textContent") for r in rows] == want

    # keyboard: focus a cell, the arrow key moves focus and the tooltip follows
    ActionChains(browser).move_by_offset(0, 0).perform()
    browser.execute_script("arguments[0].focus()", cell(2, 1))
    cell(2, 1).send_keys(Keys.ARROW_RIGHT)
    active = browser.switch_to.active_element
    assert (active.get_attribute("data-e"), active.get_attribute("data-t")) == ("2", "2")
    assert tip.is_displayed() and "(position 2)" in tip.find_element(By.CSS_SELECTOR, ".head").text
    assert len(tip.find_elements(By.CSS_SELECTOR, "tbody tr")) == 5

    # switching the statistic recolours (no recomputation: the page has no way to compute)
    colours = lambda: browser.execute_script(  # noqa: E731
        "return Array.from(document.querySelectorAll('#grid td.cell')).map(c => c.style.backgroundColor)")
    stat = Select(browser.find_element(By.ID, "stat"))
    before = colours()
    for key in ("entropy", "kl", "rank", "prob"):
        stat.select_by_value(key)
        now = colours()
        assert now != before and all(now), key
        before = now

    # the lens switch shows the raw lens's top-1
    lens_sel = browser.find_element(By.ID, "lens")
    assert lens_sel.is_displayed()
    Select(lens_sel).select_by_visible_text("raw")
    check_top1("raw")

    # long prompts scroll inside the grid's box
    assert browser.execute_script("var w = document.getElementById('wrap'); return w.scrollWidth > w.clientWidth")

    logs = browser.get_log("browser")
    assert not [x for x in logs if x["level"] in ("SEVERE", "WARNING")], logs
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    page_url = path.resolve().as_uri()
    requests = []  # (document that asked, url): the browser's own pages may log too
    for entry in browser.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            requests.append((msg["params"].get("documentURL"), msg["params"]["request"]["url"]))
    ours = [u for doc, u in requests if doc == page_url]
    assert ours == [page_url], ours  # the page itself, nothing else
    assert not [u for _, u in requests if u.split(":")[0] in ("http", "https", "ws", "wss", "ftp")], requests
