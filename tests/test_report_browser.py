"""The demo and explain reports in a real browser (headless Chromium through selenium): no console
errors, every image decoded, the gallery pages and the tile zoom work; screenshots at desktop and
phone width are saved under the test's tmp_path."""
import shutil
from pathlib import Path

import pytest

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser", shutil.which("chromium") or "")
                 if p and Path(p).is_file()), None)
DRIVER = next((p for p in ("/usr/bin/chromedriver", shutil.which("chromedriver") or "") if p and Path(p).is_file()),
              None)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("no Chromium here: install Debian's chromium and chromium-driver (.ci/run does with apt-get)")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--allow-file-access-from-files"):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def _open(driver, path: Path, width: int = 1400):
    driver.set_window_size(width, 1000)
    driver.get(path.resolve().as_uri())
    driver.execute_script("return document.readyState")
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, 20).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"))


def _check_page(driver, tmp_path: Path, name: str) -> int:
    """No console errors, every image decoded, no page-wide horizontal scroll on a phone;
    screenshots saved. Returns the number of the report's own images (the zoom's excluded)."""
    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, errors
    images = driver.execute_script("return Array.from(document.images).map(i => [i.naturalWidth, i.alt])")
    assert images and all(w > 0 for w, _ in images), [alt for w, alt in images if w == 0]
    driver.save_screenshot(str(tmp_path / f"{name}-desktop.png"))
    driver.set_window_size(390, 844)
    overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 1, f"the page scrolls sideways by {overflow}px at phone width (only the grid should)"
    driver.save_screenshot(str(tmp_path / f"{name}-phone.png"))
    for shot in ("desktop", "phone"):
        assert (tmp_path / f"{name}-{shot}.png").stat().st_size > 10_000
    print(f"screenshots: {tmp_path}/{name}-desktop.png, {name}-phone.png")
    return driver.execute_script("return document.querySelectorAll('main img').length")


def test_demo_report_in_chromium(browser, tmp_path):
    from cnnviz_fast.demo import _methods, run_demo
    report = run_demo(tmp_path / "demo", n_images=2, progress=False)
    _open(browser, report)
    headers = browser.execute_script("return Array.from(document.querySelectorAll('.grid th .method'))"
                                     ".map(e => e.textContent)")
    assert headers == [name for name, _, _ in _methods()]
    assert browser.execute_script("return document.querySelectorAll('.grid .bar').length") == len(headers)
    # click a tile: it opens enlarged; Escape closes it
    browser.execute_script("document.querySelectorAll('img.tile')[3].click()")
    zoomed = browser.execute_script("var z = document.getElementById('zoom'); var i = z.querySelector('img');"
                                    "return [z.hidden, i.naturalWidth, i.getBoundingClientRect().width]")
    assert zoomed[0] is False and zoomed[1] > 0 and zoomed[2] >= 300
    from selenium.webdriver.common.keys import Keys
    browser.find_element("tag name", "body").send_keys(Keys.ESCAPE)
    assert browser.execute_script("return document.getElementById('zoom').hidden") is True
    # the grid, the two investigation figures, three synthesis and two SCOUTER figures
    assert _check_page(browser, tmp_path, "demo") == 2 * (1 + len(headers)) + 2 + 3 + 2


def test_explain_report_pages_in_chromium(browser, tmp_path):
    import cnnviz_fast as cf
    from cnnviz_fast.data import shapes
    from cnnviz_fast.viz import save_image

    data = shapes(26, seed=4)
    for i, (x, label) in enumerate(zip(data.images, data.labels)):
        save_image(x, tmp_path / "data" / data.class_names[label] / f"{i:02d}.png")
    (tmp_path / "data" / "star" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    cf.explain_dataset(tmp_path / "data", tmp_path / "store", ["grad_cam", "integrated_gradients:steps=4"],
                       workers=0, progress=False)
    _open(browser, tmp_path / "store" / "report.html")
    script = ("return Array.from(document.querySelectorAll('tbody.page')).map(p => "
              "[p.hidden, p.querySelectorAll('img').length])")
    assert browser.execute_script(script) == [[False, 36], [True, 36], [True, 6]]  # 12 + 12 + 2 rows x 3
    where = browser.find_element("css selector", ".pager .where")
    nxt, prev = (browser.find_element("css selector", f".pager .{c}") for c in ("next", "prev"))
    assert where.text == "page 1 of 3" and not prev.is_enabled()
    nxt.click()
    nxt.click()
    assert where.text == "page 3 of 3" and not nxt.is_enabled()
    assert [h for h, _ in browser.execute_script(script)] == [True, True, False]
    shown = browser.execute_script("return Array.from(document.querySelectorAll('tbody.page:not([hidden]) img'))"
                                   ".map(i => [i.naturalWidth, i.getBoundingClientRect().width])")
    assert len(shown) == 6 and all(w > 0 and box > 0 for w, box in shown)
    prev.click()
    assert where.text == "page 2 of 3"
    body = browser.find_element("tag name", "body").text
    assert "broken.jpg" in body and "Time per method" in body and "pred: " in body
    _check_page(browser, tmp_path, "explain")
