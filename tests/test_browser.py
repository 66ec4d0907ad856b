"""A real browser (Debian's chromium, driven by Playwright) on the launched app.

One page, one visitor, tab by tab: the demo pair is ready, sliders move, a merge runs
with progress, answers appear side by side, the sweep's plots render, a job is cancelled.
Screenshots of every tab land in test-output/screenshots/ for a person to look at.
"""

from __future__ import annotations

import re
import time

import pytest

pytest.importorskip("playwright")
from playwright.sync_api import Page, expect  # noqa: E402

LONG = 120_000  # ms: a sweep on a busy 2-core machine
TARGET_QUESTION = re.compile(r"on the (left|right)\?|in the middle\?")  # the demo's spatial target
expect.set_options(timeout=30_000)  # plotly.js and first renders can be slow on a busy machine


@pytest.fixture(scope="module")
def page(browser, app):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(app.url)
    yield page
    context.close()


def open_tab(page: Page, name: str) -> None:
    page.get_by_role("tab", name=name).click()
    expect(page.get_by_role("tab", name=name)).to_have_attribute("aria-selected", "true")


def move_slider(page: Page, elem_id: str, fraction: float) -> None:
    """Click the range input at `fraction` of its width: input, then pointerup (release)."""
    track = page.locator(f"#{elem_id} input[type=range]")
    box = track.bounding_box()
    page.mouse.click(box["x"] + fraction * box["width"], box["y"] + box["height"] / 2)


def set_number(page: Page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Tab")


def plot_rendered(page: Page, elem_id: str):
    return page.locator(f"#{elem_id} .js-plotly-plot")


def test_page_opens_with_the_demo_pair_ready(page, screenshots):
    expect(page.locator("#pair-status")).to_contain_text("ready", timeout=60_000)
    expect(page.locator("#models-summary")).to_contain_text("Changed by fine-tuning")
    expect(plot_rendered(page, "models-change-plot")).to_be_visible()
    expect(page.locator("#models-table")).to_contain_text("q_proj")
    page.screenshot(path=screenshots / "models.png", full_page=True)


def test_tailor_sliders_rerun_and_run_button(page, screenshots):
    open_tab(page, "Tailor")
    result = page.locator("#tailor-result")
    expect(result).to_contain_text("start-up merge with the default settings")
    progress = page.locator("#tailor-progress .mts-progress")
    job_box = page.locator("#tailor-job-id textarea")
    # a first visitor moves a slider: the start-up merge's cached scores are re-thresholded
    move_slider(page, "tailor-keep", 0.15)
    keep = float(page.locator("#tailor-keep input[type=number]").input_value())
    assert 0.1 < keep < 0.25
    expect(job_box).to_have_value(re.compile(r"^job-"))
    first_job = job_box.input_value()
    expect(progress).to_have_attribute("data-job", first_job)
    expect(progress).to_have_attribute("data-status", "done", timeout=LONG)
    expect(result).to_contain_text(f"keep={keep:g} alpha=0.8")
    expect(result).to_contain_text("Patch:")
    expect(page.locator("#tailor-quick")).to_contain_text("This merge")
    expect(plot_rendered(page, "tailor-heatmap")).to_be_visible()
    move_slider(page, "tailor-alpha", 0.5)
    alpha = float(page.locator("#tailor-alpha input[type=number]").input_value())
    expect(job_box).not_to_have_value(first_job, timeout=LONG)
    expect(result).to_contain_text(f"alpha={alpha:g}", timeout=LONG)
    # the Run button: a sequential (authors' order) merge, progress shows its stages
    page.get_by_text("Advanced").click()
    page.locator("#tailor-hessians").get_by_text("sequential").click()
    second_job = job_box.input_value()
    page.locator("#tailor-run").click()
    expect(job_box).not_to_have_value(second_job)
    expect(progress).to_have_attribute("data-status", "done", timeout=LONG)
    expect(result).to_contain_text("hessians=sequential")
    expect(page.locator("#job-history")).to_contain_text(first_job)
    page.screenshot(path=screenshots / "tailor.png", full_page=True)


def test_compare_side_by_side_from_an_example(page, screenshots):
    open_tab(page, "Compare")
    examples = page.locator("#compare-examples tbody tr")
    expect(examples.first).to_be_visible()
    examples.filter(has_text=TARGET_QUESTION).first.click()
    for elem_id in ("compare-base", "compare-finetuned", "compare-tailored"):
        expect(page.locator(f"#{elem_id} textarea")).not_to_have_value("", timeout=LONG)
    expect(page.locator("#compare-table")).to_contain_text("Model Tailor")
    caption_row = examples.filter(has_text="Caption").first
    caption_row.click()
    expect(page.locator("#compare-mode input[value=caption]")).to_be_checked()
    expect(page.locator("#compare-base textarea")).to_have_value(re.compile(r"\w+ \w+ \w+"), timeout=LONG)
    page.screenshot(path=screenshots / "compare.png", full_page=True)


def test_sweep_plots_render_and_csv_downloads(page, screenshots):
    open_tab(page, "Forgetting")
    page.locator("#sweep-keeps textarea").fill("0.05, 0.2")
    page.locator("#sweep-lams textarea").fill("0.5")
    set_number(page, "sweep-n", 4)
    page.locator("#sweep-run").click()
    progress = page.locator("#sweep-progress .mts-progress")
    expect(progress).to_have_attribute("data-job", re.compile(r"^job-"))
    expect(progress).to_have_attribute("data-status", "done", timeout=LONG)
    for elem_id in ("sweep-tradeoff", "sweep-keep", "sweep-retention", "sweep-heatmap"):
        expect(plot_rendered(page, elem_id)).to_be_visible()
    expect(page.locator("#sweep-tradeoff")).to_contain_text("Model Tailor")
    expect(page.locator("#sweep-table")).to_contain_text("magnitude")
    with page.expect_download() as download:
        page.locator("#sweep-csv").click()
    assert download.value.suggested_filename.endswith(".csv")
    text = open(download.value.path()).read()
    assert text.splitlines()[0].startswith("kind,method,setting")
    page.screenshot(path=screenshots / "forgetting.png", full_page=True)


def test_cancel_a_running_job(page, screenshots):
    open_tab(page, "Forgetting")
    page.locator("#sweep-keeps textarea").fill("0.03, 0.06, 0.09, 0.12")
    set_number(page, "sweep-n", 100)
    page.locator("#sweep-run").click()
    progress = page.locator("#sweep-progress .mts-progress")
    expect(progress).to_have_attribute("data-status", "running", timeout=LONG)
    expect(page.locator("#sweep-progress .mts-stage")).to_contain_text("evaluating", timeout=LONG)
    page.locator("#sweep-cancel").click()
    expect(progress).to_have_attribute("data-status", "cancelled", timeout=LONG)
    page.screenshot(path=screenshots / "cancelled.png", full_page=True)


def test_export_the_patch(page, screenshots):
    open_tab(page, "Export")
    expect(page.locator("#export-info")).to_contain_text("entries")
    page.locator("#export-patch").click()
    expect(page.locator("#export-file")).to_contain_text(re.compile(r"patch\s*\.safetensors"), timeout=LONG)
    page.locator("#export-model").click()
    expect(page.locator("#export-file")).to_contain_text(re.compile(r"tailored-model\s*\.zip"), timeout=LONG)
    page.screenshot(path=screenshots / "export.png", full_page=True)


def test_finetune_with_model_dowser_shows_the_loss_and_joins_compare(page, screenshots):
    open_tab(page, "Fine-tune")
    rho = page.locator("#finetune-rho input[type=number]")
    expect(rho).to_be_disabled()  # ρ only means something for Model-Dowser
    page.locator("#finetune-method").get_by_text("Model-Dowser").click()
    expect(rho).to_be_enabled()
    expect(page.locator("#finetune-method-info")).to_contain_text("least important")
    set_number(page, "finetune-n", 8)
    page.locator("#finetune-layers textarea").fill("1")
    page.locator("#finetune-run").click()
    progress = page.locator("#finetune-progress .mts-progress")
    expect(page.locator("#finetune-job-id textarea")).to_have_value(re.compile(r"^job-"))
    expect(progress).to_have_attribute("data-status", "done", timeout=LONG)
    expect(plot_rendered(page, "finetune-loss")).to_be_visible()
    result = page.locator("#finetune-result")
    expect(result).to_contain_text("Model-Dowser")
    expect(result).to_contain_text(re.compile(r"Loss: [\d.]+ → [\d.]+"))
    page.screenshot(path=screenshots / "finetune.png", full_page=True)
    open_tab(page, "Compare")  # the trained model answers next to the others
    page.locator("#compare-examples tbody tr").filter(has_text=TARGET_QUESTION).first.click()
    expect(page.locator("#compare-table")).to_contain_text("Model-Dowser", timeout=LONG)
    expect(page.locator("#compare-trained textarea")).not_to_have_value(re.compile(r"^$|press Compare"))


def test_closing_the_tab_ends_the_session(browser, app):
    sessions = app.studio.sessions
    before = len(sessions)
    context = browser.new_context()
    page = context.new_page()
    page.goto(app.url)
    expect(page.locator("#pair-status")).to_contain_text("ready", timeout=60_000)

    def settle(count: int) -> int:
        deadline = time.time() + 30  # generous: a loaded 2-core machine is slow to notice
        while len(sessions) != count and time.time() < deadline:
            time.sleep(0.1)
        return len(sessions)

    assert settle(before + 1) == before + 1  # the page's first poll opened its session
    context.close()
    assert settle(before) == before


def test_picking_the_counting_story_loads_its_fine_tune(browser, app, screenshots):
    """A page of its own: the story picker says what each fine-tune shows, and the demo
    button loads the chosen one (its fine-tuned checkpoint and its target examples)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(app.url)
    expect(page.locator("#pair-status")).to_contain_text("ready", timeout=60_000)
    expect(page.locator("#models-story-info")).to_contain_text("which shape or colour")
    page.locator("#models-story").get_by_text("Format forgetting: counting").click()
    expect(page.locator("#models-story-info")).to_contain_text("answer with numbers")
    page.locator("#models-use-demo").click()
    expect(page.locator("#pair-status")).to_contain_text("Format forgetting: counting", timeout=LONG)
    open_tab(page, "Compare")  # the counting fine-tune answers a counting example with a number
    page.locator("#compare-examples tbody tr").filter(has_text="how many").first.click()
    expect(page.locator("#compare-finetuned textarea")).to_have_value(re.compile(r"^(one|two|three)$"),
                                                                       timeout=LONG)
    page.screenshot(path=screenshots / "story-counting.png", full_page=True)
    context.close()


def test_a_method_shows_its_own_knobs_and_a_slider_move_merges_with_it(page, screenshots):
    open_tab(page, "Tailor")
    page.locator("#tailor-method input").click()
    page.get_by_role("option", name="Model Breadcrumbs").click()
    expect(page.locator("#tailor-method-info")).to_contain_text("drop the top gamma")
    expect(page.locator("#tailor-gamma")).to_be_visible()  # declared knobs: γ has its slider
    expect(page.locator("#tailor-alpha")).to_be_hidden()  # Model Tailor's alone
    expect(page.locator("#tailor-epsilon")).to_be_hidden()  # DELLA's
    job_box = page.locator("#tailor-job-id textarea")
    before = job_box.input_value()
    move_slider(page, "tailor-gamma", 0.2)
    gamma = float(page.locator("#tailor-gamma input[type=number]").input_value())
    keep = float(page.locator("#tailor-keep input[type=number]").input_value())  # earlier tests
    expect(job_box).not_to_have_value(before, timeout=LONG)
    expect(page.locator("#tailor-progress .mts-progress")).to_have_attribute("data-status", "done",
                                                                          timeout=LONG)
    expect(page.locator("#tailor-result")).to_contain_text(f"Model Breadcrumbs keep={keep:g} lam=1 gamma={gamma:g}")
    page.screenshot(path=screenshots / "tailor-breadcrumbs.png", full_page=True)
