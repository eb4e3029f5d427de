"""The agent's page in a real browser: Debian's chromium, headless, driven by Selenium through
Debian's chromedriver (scripts/setup_env.sh installs both). An operator opens the page of an
agent counting a real clip, clicks two points on the live view, applies the line, and sees it
counted. The screenshot goes to the test's folder, and to $EDGE_PAGE_SCREENSHOT when set
(`EDGE_PAGE_SCREENSHOT=docs/agent-page.jpg` makes the one in the docs; the type follows the name).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

import cv2
import pytest
import yaml

from edge_testkit.agent import CameraAgent, start_camera_agent
from edge_testkit.processes import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CHROMIUM = os.environ.get("EDGE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("EDGE_CHROMEDRIVER", "/usr/bin/chromedriver")
ZONE = {"id": "left", "polygon": [[0.0, 0.3], [0.3, 0.3], [0.3, 1.0], [0.0, 1.0]]}


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for path in (CHROMIUM, CHROMEDRIVER):
        assert Path(path).is_file(), f"{path} missing: scripts/setup_env.sh installs chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # Headless as root in a closed network: no sandbox, no GPU, no background calls to Google.
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1000,1050", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def agent(tmp_path: Path, model_path: Path, footage) -> Iterator[CameraAgent]:
    running = start_camera_agent(tmp_path, footage("PETS09-S2L1"), model_path, zones=[ZONE])
    try:
        yield running
    finally:
        running.close()
        print(running.proc.output()[-3000:])


def test_two_clicks_on_the_live_view_make_a_line_that_counts(browser, agent: CameraAgent, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver = browser
    driver.get(agent.url + "/")
    card = wait_for(lambda: driver.find_elements(By.ID, f"camera-{agent.camera_id}"), 30,
                    message="the camera's card")[0]
    image = card.find_element(By.CSS_SELECTOR, "img.view")
    wait_for(lambda: driver.execute_script("return arguments[0].naturalWidth", image) > 0, 60,
             message="the live view showing a frame")
    assert driver.execute_script("return arguments[0].naturalWidth", image) == 768  # PETS09-S2L1, full size

    canvas = card.find_element(By.CSS_SELECTOR, "canvas.clicks")
    height = canvas.size["height"]
    # Selenium offsets are from the element's centre: two points on the vertical middle line.
    for dy in (-0.25 * height, 0.45 * height):
        ActionChains(driver).move_to_element_with_offset(canvas, 0, int(dy)).click().perform()
    yaml_text = card.find_element(By.CSS_SELECTOR, "pre.yaml").text
    points = [float(v) for v in re.findall(r"[01]\.\d+|[01](?=[,\]])", yaml_text.split("points:")[1])]
    assert points == pytest.approx([0.5, 0.25, 0.5, 0.95], abs=0.01), yaml_text
    line_id = card.find_element(By.CSS_SELECTOR, "input.line-id")
    line_id.clear()
    line_id.send_keys("walkway")
    card.find_element(By.CSS_SELECTOR, "button.apply").click()

    message = card.find_element(By.CSS_SELECTOR, ".message")
    wait_for(lambda: message.text.startswith("applied"), 30, message=lambda: f"apply answered {message.text!r}")
    on_disk = yaml.safe_load(agent.config_path.read_text())
    assert [line["id"] for line in on_disk["cameras"][0]["lines"]] == ["walkway"]

    def counted() -> int:
        # Read in one script: the page rebuilds its counter rows every second.
        shown = driver.execute_script(
            "const row = arguments[0].querySelector(\"tr[data-line='walkway']\");"
            "return row ? [row.querySelector('.in').textContent, row.querySelector('.out').textContent] : null;",
            card)
        return int(shown[0]) + int(shown[1]) if shown else 0

    wait_for(counted, 150, interval=0.5, message="a crossing of the new line on the page")
    status = agent.api.status()["cameras"][agent.camera_id]["counts"]["walkway"]
    assert status["in"] + status["out"] >= counted() > 0

    driver.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "agent-page.png"
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if target := os.environ.get("EDGE_PAGE_SCREENSHOT"):
        assert cv2.imwrite(target, cv2.imread(str(shot)), [cv2.IMWRITE_JPEG_QUALITY, 85])
