"""A newcomer's first look, in a real browser at 1280 and 1920 px: every tab shows something
true on first open, plots and tables are legible (no clipped or covered titles, no header
broken letter by letter, no "nan"), and refused inputs leave the page usable.

Screenshots of every tab at both widths land in test-output/screenshots/.
"""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("playwright")
from playwright.sync_api import Page, expect  # noqa: E402

from conftest import DEMO  # noqa: E402

LONG = 120_000
TABS = ["Models", "Tailor", "Fine-tune", "Compare", "Forgetting", "Export"]
expect.set_options(timeout=30_000)

# Every plot's layout boxes, measured in the page: the figure, its title, axis titles,
# legend and subplot titles (annotations); and every table header's size and text.
MEASURE = """() => {
  const box = e => { const r = e.getBoundingClientRect();
                     return {x: r.x, y: r.y, w: r.width, h: r.height}; };
  const plots = [...document.querySelectorAll('.js-plotly-plot')].filter(p => p.offsetParent)
    .map(p => ({
      id: p.closest('[id]') ? p.closest('[id]').id : '',
      svg: box(p.querySelector('.main-svg')),
      titles: [...p.querySelectorAll('.gtitle, .xtitle, .ytitle, .g-xtitle text, .g-ytitle text')]
        .filter(t => t.textContent.trim()).map(t => ({text: t.textContent, ...box(t)})),
      legend: p.querySelector('.legend') ? box(p.querySelector('.legend')) : null,
      notes: [...p.querySelectorAll('.annotation-text')]
        .filter(t => t.textContent.trim()).map(t => ({text: t.textContent, ...box(t)})),
    }));
  const lines = e => { const r = document.createRange(); r.selectNodeContents(e);
                       return new Set([...r.getClientRects()].filter(c => c.width > 0)
                                      .map(c => Math.round(c.top))).size; };
  const headers = [...document.querySelectorAll('table thead th')].filter(h => h.offsetParent)
    .map(h => ({text: h.innerText.trim(), w: h.getBoundingClientRect().width,
                lines: lines(h.querySelector('.header') || h)}));
  return {plots, headers};
}"""


def overlap(a: dict, b: dict) -> bool:
    return a["x"] < b["x"] + b["w"] - 1 and b["x"] < a["x"] + a["w"] - 1 and \
        a["y"] < b["y"] + b["h"] - 1 and b["y"] < a["y"] + a["h"] - 1


def inside(inner: dict, outer: dict) -> bool:
    return inner["x"] >= outer["x"] - 1 and inner["y"] >= outer["y"] - 1 and \
        inner["x"] + inner["w"] <= outer["x"] + outer["w"] + 1 and \
        inner["y"] + inner["h"] <= outer["y"] + outer["h"] + 1


def legibility_problems(page: Page) -> list[str]:
    """What a reader could not read on the page as it is now."""
    found = page.evaluate(MEASURE)
    problems = []
    for plot in found["plots"]:
        where = plot["id"]
        for title in plot["titles"]:
            if not inside(title, plot["svg"]):
                problems.append(f"{where}: title {title['text']!r} clipped")
        if plot["legend"] is not None:
            for title in plot["titles"] + plot["notes"]:
                if overlap(plot["legend"], title):
                    problems.append(f"{where}: the legend covers {title['text']!r}")
            if plot["legend"]["w"] > 0.45 * plot["svg"]["w"]:
                problems.append(f"{where}: the legend takes {plot['legend']['w']:.0f} of "
                                f"{plot['svg']['w']:.0f} px beside the plot")
        texts = plot["titles"] + plot["notes"]
        for i, a in enumerate(texts):
            for b in texts[i + 1:]:
                if overlap(a, b):
                    problems.append(f"{where}: {a['text']!r} overlaps {b['text']!r}")
    for header in found["headers"]:
        if header["text"] in ("1", "2", "3"):
            problems.append(f"a table shows the placeholder header {header['text']!r}")
        elif header["lines"] > len(header["text"].split()):  # a word broken across lines
            problems.append(f"header {header['text']!r} takes {header['lines']} lines in "
                            f"{header['w']:.0f} px")
    return problems


def open_tab(page: Page, name: str) -> None:
    page.get_by_role("tab", name=name).click()
    expect(page.get_by_role("tab", name=name)).to_have_attribute("aria-selected", "true")


@pytest.mark.parametrize("width", [1280, 1920])
def test_every_tab_on_first_open_is_true_and_legible(browser, app, screenshots, width):
    context = browser.new_context(viewport={"width": width, "height": 1000})
    page = context.new_page()
    page.goto(app.url)
    expect(page.locator("#pair-status")).to_contain_text("ready", timeout=60_000)
    problems = {}
    for tab in TABS:
        open_tab(page, tab)
        if tab == "Forgetting":  # the shipped sweep of the README, labelled as precomputed
            source = page.locator("#sweep-source")
            expect(source).to_contain_text("precomputed")
            expect(source).to_contain_text("python -m tailor_ui sweep")
            expect(source).to_contain_text("--finetuned assets/demo/finetuned")
            expect(page.locator("#sweep-tradeoff")).to_contain_text("Model Tailor")
            expect(page.locator("#sweep-tradeoff")).to_contain_text("(precomputed)")
            expect(page.locator("#sweep-table")).to_contain_text(
                "Model Tailor keep=0.02 alpha=0.8 compensation=exact")
        if tab == "Compare":  # one example and every model's answer, without pressing anything
            expect(page.locator("#compare-image img")).to_be_visible(timeout=LONG)
            for elem_id in ("compare-base", "compare-finetuned", "compare-tailored"):
                expect(page.locator(f"#{elem_id} textarea")).not_to_have_value("", timeout=LONG)
            expect(page.locator("#compare-tailored textarea")).not_to_have_value(re.compile("run a merge"))
            expect(page.locator("#compare-references")).to_contain_text("Reference answers")
        page.wait_for_timeout(1500)  # plotly lays out after the tab shows
        page.screenshot(path=screenshots / f"{tab.lower()}-{width}.png", full_page=True)
        text = page.locator("body").inner_text()
        assert not re.search(r"\bnan\b", text, re.I), f"{tab}: 'nan' on the page"
        problems[tab] = legibility_problems(page)
    context.close()
    assert not any(problems.values()), json.dumps(problems, indent=1)


def test_a_refused_upload_leaves_the_box_ready_for_the_next(browser, app, tmp_path):
    """A failed "Add set" clears its upload box: the next, correct upload is not appended to
    the refused files."""
    good = tmp_path / "good.jsonl"
    rows = [json.loads(line) for line in (DEMO / "target_eval.jsonl").read_text().splitlines()[:3]]
    images = [DEMO / r["image"] for r in rows]
    good.write_text("".join(json.dumps({**r, "image": (DEMO / r["image"]).name}) + "\n" for r in rows))
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.goto(app.url)
    expect(page.locator("#pair-status")).to_contain_text("ready", timeout=60_000)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "what is it?"}\n')  # no image: refused
    upload = page.locator("#evalsets-files input[type=file]")
    upload.set_input_files([str(bad)])
    expect(page.locator("#evalsets-files").get_by_role("cell", name="bad.jsonl")).to_be_visible()
    page.locator("#evalsets-add").click()
    expect(page.locator(".toast-body")).to_contain_text("image")
    expect(page.locator("#evalsets-files")).to_contain_text("Drop File Here")  # emptied
    upload.set_input_files([str(good), *map(str, images)])
    page.locator("#evalsets-name textarea").fill("mine")
    page.locator("#evalsets-add").click()
    expect(page.locator("#evalsets-table")).to_contain_text("mine", timeout=LONG)
    context.close()


def test_compare_refuses_a_non_image_and_an_unchosen_set_keeps_the_example(browser, app, tmp_path,
                                                                            screenshots):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.goto(app.url)
    expect(page.locator("#pair-status")).to_contain_text("ready", timeout=60_000)
    open_tab(page, "Compare")
    # the first example fills in; "Compare on this example" without a set must keep it
    expect(page.locator("#compare-base textarea")).not_to_have_value("", timeout=LONG)
    question = page.locator("#compare-question textarea").input_value()
    assert question
    page.locator("#compare-pick").click()
    expect(page.locator(".toast-body")).to_contain_text("choose an evaluation set")
    page.wait_for_timeout(1000)
    expect(page.locator("#compare-image img")).to_be_visible()
    expect(page.locator("#compare-question textarea")).to_have_value(question)
    expect(page.locator("#compare-mode input[value=question]")).to_be_checked()
    page.screenshot(path=screenshots / "compare-no-set-1280.png", full_page=True)
    context.close()
