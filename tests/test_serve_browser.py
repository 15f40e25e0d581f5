"""`segearth serve` in a real browser: headless Debian Chromium (chromium + chromium-driver, which .ci/run installs
when missing; no browser is downloaded at run time) driven by Selenium opens the page on 127.0.0.1, submits
without an image (a message appears), uploads a toy scene, types an instruction, submits and waits for the
overlay image and the answer; the screenshot is saved under the test's tmp_path. Missing Chromium fails the
test: CI must run it."""
from __future__ import annotations

import shutil
import urllib.request

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from test_serve import INSTRUCTION, served  # noqa: F401 (the fixture: a steered tiny model being served)

from segearth_jax.predict import palette

WAIT_S = 120   # the first request compiles the model


def chromium_paths() -> tuple[str, str]:
  browser = shutil.which("chromium") or shutil.which("chromium-browser")
  driver = shutil.which("chromedriver")
  if not (browser and driver):
    pytest.fail("needs Debian's chromium and chromium-driver on PATH (apt-get install -y chromium chromium-driver)")
  return browser, driver


@pytest.fixture(scope="module")
def browser():
  binary, driver_path = chromium_paths()
  options = webdriver.ChromeOptions()
  options.binary_location = binary
  for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--window-size=1280,1100"):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=Service(driver_path), options=options)   # no Selenium Manager download
  yield driver
  driver.quit()


def page_text(driver) -> str:
  return driver.find_element(By.TAG_NAME, "body").text


def test_upload_type_submit_shows_overlay_and_answer(served, browser, tmp_path):  # noqa: F811
  wait = WebDriverWait(browser, WAIT_S)
  browser.get(served["server"].url)
  wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#segment-button"))
  assert "Weights" in page_text(browser) and served["weights"] in page_text(browser)

  browser.find_element(By.CSS_SELECTOR, "#segment-button").click()            # no image yet
  wait.until(lambda d: "Upload an image first" in page_text(d))

  browser.find_element(By.CSS_SELECTOR, "#image-in input[type=file]").send_keys(served["image"])
  wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image-in a, #image-in .file-preview"))
  browser.find_element(By.CSS_SELECTOR, "#instruction-in textarea").send_keys(INSTRUCTION)
  browser.find_element(By.CSS_SELECTOR, "#segment-button").click()

  overlay = wait.until(lambda d: [e for e in d.find_elements(By.CSS_SELECTOR, "#overlay-out img")
                                  if e.get_attribute("src") and e.get_property("naturalWidth") > 0])
  assert overlay[0].get_property("naturalWidth") >= 256                       # the scene, with its legend
  marked = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#answer-out .textspan.hl"))
  assert [e.text for e in marked] == ["[SEG]", "[SEG]"]                         # the two masks' tokens
  colours = [e.value_of_css_property("background-color") for e in marked]
  assert colours == [f"rgba({r}, {g}, {b}, 1)" for r, g, b in palette(2)]     # each its mask's colour
  assert "1: " in browser.find_element(By.CSS_SELECTOR, "#answer-out").text   # the phrase legend
  link = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#files-out a[download="masks.zip"]'))[0]
  with urllib.request.urlopen(link.get_attribute("href")) as r:
    assert r.read(4) == b"PK\x03\x04"                                          # the masks' zip downloads
  shot = tmp_path / "serve.png"
  assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
