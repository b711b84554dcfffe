"""The page at / in a real headless Chromium (Debian's chromium + chromium-driver, via Selenium):
choose an image, see the top-k classes with probabilities and the latency."""

from __future__ import annotations

import shutil
import tempfile

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and DRIVER),
                       reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"),
]


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (dev extra)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=900,900"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(drv, cond, timeout=20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, timeout).until(lambda d: cond(d))


def test_drop_an_image_and_see_the_top_k(browser, start_server, serve_data, tmp_path):
    from selenium.webdriver.common.by import By

    key = "page-key-" + "z" * 20
    server = start_server(key=key.encode(), topk=3)
    img = sorted((serve_data / "c1").glob("*.png"))[0]
    browser.get(server.url + "/")
    assert browser.title == "transfer serve"
    # without the key the page says what is missing
    _wait(browser, lambda d: "api key" in d.find_element(By.ID, "model").text.lower())
    browser.find_element(By.ID, "key").send_keys(key)
    browser.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
    _wait(browser, lambda d: "3 classes" in d.find_element(By.ID, "model").text)
    browser.find_element(By.ID, "file").send_keys(str(img))
    _wait(browser, lambda d: d.find_element(By.ID, "timing").get_attribute("data-ms"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#top tbody tr")
    assert len(rows) == 3
    classes = [r.find_element(By.CSS_SELECTOR, "td.cls").text for r in rows]
    probs = [float(r.find_element(By.CSS_SELECTOR, "td.p").text.rstrip(" %")) for r in rows]
    assert sorted(classes) == ["c0", "c1", "c2"] and probs == sorted(probs, reverse=True)
    assert classes[0] == "c1" and 99 < sum(probs) < 101
    assert "latency" in browser.find_element(By.ID, "timing").text
    assert float(browser.find_element(By.ID, "timing").get_attribute("data-ms")) > 0
    browser.save_screenshot(str(tmp_path / "page.png"))
    # a file that is no image: the error and its hint are shown, nothing crashes
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    _wait(browser, lambda d: "415" in d.find_element(By.ID, "name").text)
    assert "not an image" in browser.find_element(By.ID, "name").text
    # the page loaded nothing from anywhere but the server
    urls = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(u.startswith(server.url) for u in urls), urls
