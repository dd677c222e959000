"""The web page of `vladkit serve` in a real browser: Debian's headless Chromium, driven
by Selenium through chromedriver. Skipped, saying why, where either is missing
(`apt-get install chromium chromium-driver`; .ci/run installs them)."""

from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("starlette", reason="vladkit serve needs the serve extra (pip install 'vladkit[serve]')")
pytest.importorskip("uvicorn", reason="vladkit serve needs the serve extra (pip install 'vladkit[serve]')")
pytest.importorskip("selenium", reason="the browser test needs selenium (the test extra)")

from _serve_support import attacked, build_index  # noqa: E402
from vladkit.app.serve.server import serve_in_thread  # noqa: E402
from vladkit.app.serve.web import create_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def browser():
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            pytest.skip(f"no {path}: apt-get install {package}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # given, so that Selenium never looks for (or fetches) a browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,900", "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-browser")
    built = build_index(root, n_images=24)
    with serve_in_thread(create_app(built["index"], max_concurrency=2)) as url:
        yield {"url": url, "root": root, **built}


def _wait_for_results(driver, previous_serial=None, timeout=60):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def done(driver):
        results = driver.find_element(By.ID, "results")
        state, serial = results.get_attribute("data-state"), results.get_attribute("data-serial")
        if state == "error":
            raise AssertionError(driver.find_element(By.ID, "status").text)
        return state == "ready" and serial != previous_serial and serial

    serial = WebDriverWait(driver, timeout).until(done)
    items = driver.find_elements(By.CSS_SELECTOR, "#results li.result")
    # Every thumbnail loaded (naturalWidth > 0 once decoded).
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
    return serial, items


def test_upload_shows_the_original_first_and_a_click_searches_with_it(browser, site):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    query = attacked(site["paths"][9], site["root"] / "query.jpg")
    browser.get(site["url"] + "/")
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    assert "24 images" in browser.find_element(By.ID, "info").text
    assert browser.find_element(By.ID, "rerank-label").is_displayed()  # the index has re-ranking features
    # Starting at README's depth for an exact index, not at 0: the first search is re-ranked.
    assert browser.find_element(By.ID, "rerank").get_attribute("value") == "100"

    browser.find_element(By.ID, "file").send_keys(str(query))
    serial, items = _wait_for_results(browser)
    assert len(items) == 10
    assert items[0].get_attribute("data-id") == site["paths"][9]
    assert items[0].get_attribute("data-rank") == "1"
    assert float(items[0].get_attribute("data-score")) > float(items[1].get_attribute("data-score"))
    assert int(items[0].get_attribute("data-inliers")) >= 8
    assert "results in" in browser.find_element(By.ID, "status").text
    assert browser.find_element(By.ID, "query-image").is_displayed()

    # Fewer results, with re-ranking: the inliers are shown.
    browser.find_element(By.ID, "top").clear()
    browser.find_element(By.ID, "top").send_keys("4")
    browser.find_element(By.ID, "rerank").clear()
    browser.find_element(By.ID, "rerank").send_keys("20")
    browser.find_element(By.ID, "file").send_keys(str(query))
    serial, items = _wait_for_results(browser, serial)
    assert len(items) == 4 and items[0].get_attribute("data-id") == site["paths"][9]
    assert int(items[0].get_attribute("data-inliers")) >= 8
    assert "inliers" in items[0].text

    # Clicking a result searches with that indexed image: it comes back first.
    second = items[1].get_attribute("data-id")
    items[1].click()
    serial, items = _wait_for_results(browser, serial)
    assert items[0].get_attribute("data-id") == second
    assert os.path.basename(second) in browser.find_element(By.ID, "query-caption").text + second

    # A file that is not an image: the server's reason is shown, the page keeps working.
    bad = site["root"] / "notes.jpg"
    bad.write_text("not an image at all")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.ID, "results").get_attribute("data-state") == "error")
    assert "not an image" in browser.find_element(By.ID, "status").text
    browser.find_element(By.ID, "file").send_keys(str(query))
    _wait_for_results(browser, serial)

    browser.save_screenshot(str(site["root"] / "page.png"))
    # No script or style was refused by the Content-Security-Policy, no script error.
    problems = [entry["message"] for entry in browser.get_log("browser")
                if entry["level"] == "SEVERE" and "/api/search" not in entry["message"]]
    assert not problems, problems
