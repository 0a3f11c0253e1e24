"""stream_mode "denoise" over HTTP and the /playground page in a real headless Chromium.

One server (with an API key) serves both. The browser tests need Debian's ``chromium`` and
``chromium-driver`` (scripts/test.sh installs them) and are skipped without them. Set
``PLAYGROUND_SCREENSHOT=path.png`` to also write the side-by-side screenshot there (the README's
image, docs/images/playground.png, is made that way).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import TINY_LLADA

KEY = "playground-test-key"
PROMPT = "Copy the list: d i f f u s i o n s e r v e r s"
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def server(server_factory):
    return server_factory("--model", str(TINY_LLADA), "--api-key", KEY)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0, timeout=120)


def _chat_text(client, algorithm: str, **extra) -> str:
    out = client.chat.completions.create(
        model="tiny-llada",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=MAX_TOKENS,
        seed=0,
        extra_body={"algorithm": algorithm, **extra},
    )
    return out.choices[0].message.content


# ------------------------------------------------------------------ the event stream over HTTP


@pytest.mark.parametrize("algorithm", ["llada", "dual_cache", "dinfer_blockwise"])
def test_denoise_stream_folds_to_the_committed_text(client, server, algorithm):
    """Every committed position appears in exactly one event; the folded canvas is the completion;
    the text is the same as in committed mode; the openai client reads the stream unchanged."""
    body = {"algorithm": algorithm, "temperature": 0.7, "block_length": 8, "stream_mode": "denoise"}
    stream = client.chat.completions.create(
        model="tiny-llada",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=MAX_TOKENS,
        seed=5,
        stream=True,
        extra_body=body,
    )
    text, steps, finish = "", [], None
    for chunk in stream:
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        finish = choice.finish_reason or finish
        if getattr(choice, "denoise", None) is not None:
            steps.append(choice.denoise)
    committed_mode = client.chat.completions.create(
        model="tiny-llada",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=MAX_TOKENS,
        seed=5,
        stream=True,
        extra_body={k: v for k, v in body.items() if k != "stream_mode"},
    )
    assert text == "".join(c.choices[0].delta.content or "" for c in committed_mode)
    assert finish in ("stop", "length") and len(steps) >= 2
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    canvas: dict[int, list] = {}
    for s in steps:
        for pos, token, piece, conf in s["committed"]:
            assert pos not in canvas and isinstance(token, int) and isinstance(piece, str)
            assert 0 <= pos < s["canvas_length"] and isinstance(conf, float)
            canvas[pos] = [token, piece]
    tokens = []
    for pos in range(len(canvas)):
        if pos not in canvas or canvas[pos][1] in ("<|eot_id|>", "<|endoftext|>"):
            break
        tokens.append(canvas[pos][0])
    tok = _tokenizer()
    assert tok.decode(tokens[:MAX_TOKENS]) == text


def _tokenizer():
    from dllm_serve.models.tokenizer import ChatTokenizer

    return ChatTokenizer(TINY_LLADA)


def test_completions_denoise_with_two_choices(server):
    body = {
        "model": "tiny-llada",
        "prompt": "a b c",
        "max_tokens": 8,
        "n": 2,
        "seed": 1,
        "stream": True,
        "stream_mode": "denoise",
    }
    seen: dict[int, int] = {0: 0, 1: 0}
    with httpx.stream(
        "POST", server.v1 + "/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as r:
        assert r.status_code == 200
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    for data in lines[:-1]:
        chunk = json.loads(data)
        assert chunk["object"] == "text_completion"
        for choice in chunk["choices"]:
            if "denoise" in choice:
                seen[choice["index"]] += 1
                assert choice["text"] == ""
    assert seen[0] >= 1 and seen[1] >= 1


def test_denoise_needs_stream_and_a_known_mode(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    for body, param in (
        ({"model": "tiny-llada", "prompt": "a", "stream_mode": "denoise"}, "stream_mode"),
        ({"model": "tiny-llada", "prompt": "a", "stream": True, "stream_mode": "tokens"}, "stream_mode"),
    ):
        r = httpx.post(server.v1 + "/completions", json=body, headers=headers, timeout=30)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
    assert httpx.get(server.base_url + "/health", timeout=5).status_code == 200


def test_playground_files_are_public(server):
    r = httpx.get(server.base_url + "/playground", follow_redirects=True, timeout=10)
    assert r.status_code == 200 and "dllm-serve playground" in r.text
    assert httpx.get(server.base_url + "/playground/config.json").json() == {"api_key_required": True}
    for name in ("playground.js", "playground.css"):
        assert httpx.get(f"{server.base_url}/playground/{name}").status_code == 200
    assert "http://" not in r.text and "https://" not in r.text  # no external resources
    assert httpx.get(server.v1 + "/algorithms").status_code == 401  # the API itself is not


# ------------------------------------------------------------------ the page in Chromium

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (scripts/test.sh installs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for drivers online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1366,900",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait(predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _open_and_connect(driver, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.get(server.base_url + "/playground")
    status = driver.find_element(By.ID, "server-status")
    _wait(lambda: "API key" in status.text, 30, "the page to ask for the key")
    assert not driver.find_element(By.ID, "run").is_enabled()
    driver.find_element(By.ID, "api-key").send_keys(KEY, Keys.ENTER)  # keyboard only
    _wait(lambda: driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready"), 30, "connect")


def _set(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def _select(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    Select(driver.find_element(By.ID, element_id)).select_by_value(value)


def _run_and_wait(driver, lanes: list[str]) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "run").click()
    for lane in lanes:
        root = driver.find_element(By.ID, lane)
        _wait(lambda r=root: r.get_attribute("data-status") in ("done", "error"), 180, lane)
        error = root.find_element(By.CSS_SELECTOR, ".error").text
        assert root.get_attribute("data-status") == "done", error


def _output(driver, lane: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, f"#{lane} .output").get_attribute("textContent")


def _canvas_at(driver, lane: str, step: int) -> str:
    return driver.execute_script(
        """const root = document.getElementById(arguments[0]);
        const scrub = root.querySelector('.scrub');
        scrub.value = String(arguments[1]);
        scrub.dispatchEvent(new Event('input'));
        return root.querySelector('canvas').toDataURL();""",
        lane,
        step,
    )


def test_playground_runs_and_replays_with_the_api_text(browser, server, client):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _open_and_connect(browser, server)
    _set(browser, "prompt", PROMPT)
    _set(browser, "max-tokens", str(MAX_TOKENS))
    _select(browser, "algorithm-a", "llada")
    _run_and_wait(browser, ["lane-a"])
    lane = browser.find_element(By.ID, "lane-a")
    assert _output(browser, "lane-a") == _chat_text(client, "llada")
    assert int(lane.get_attribute("data-frames")) >= 2  # drawn live, step by step
    steps = int(lane.find_element(By.CSS_SELECTOR, ".scrub").get_attribute("max"))
    frames = {_canvas_at(browser, "lane-a", k) for k in (1, 2, steps // 2, steps)}
    assert len(frames) == 4, "intermediate canvases must differ from each other and the final one"
    # Replay by keyboard: the slider steps back with the arrow key.
    scrub = lane.find_element(By.CSS_SELECTOR, ".scrub")
    _canvas_at(browser, "lane-a", steps)
    scrub.send_keys(Keys.ARROW_LEFT)
    assert lane.find_element(By.CSS_SELECTOR, ".shown").text == f"{steps - 1} / {steps}"
    browser.find_element(By.CSS_SELECTOR, 'input[name="colour"][value="confidence"]').click()
    assert _canvas_at(browser, "lane-a", steps) not in frames  # the other colouring

    # Raw completion (the chat template written out), with a parameter changed in the preset's form.
    raw = _tokenizer().hf.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    browser.find_element(By.CSS_SELECTOR, 'input[name="mode"][value="completion"]').click()
    _set(browser, "prompt", raw)
    _select(browser, "algorithm-a", "dual_cache")
    browser.find_element(By.CSS_SELECTOR, "#settings-a summary").send_keys(Keys.ENTER)
    threshold = browser.find_element(By.CSS_SELECTOR, '#settings-a input[name="threshold"]')
    assert threshold.get_attribute("value") == "0.9"  # the preset's default, from /v1/algorithms
    threshold.clear()
    threshold.send_keys("0.5")
    _run_and_wait(browser, ["lane-a"])
    api = client.completions.create(
        model="tiny-llada",
        prompt=raw,
        max_tokens=MAX_TOKENS,
        seed=0,
        extra_body={"algorithm": "dual_cache", "threshold": 0.5},
    )
    assert api.choices[0].text and _output(browser, "lane-a") == api.choices[0].text
    assert int(lane.find_element(By.CSS_SELECTOR, ".forwards").text) == api.diffusion["forwards"]
    assert _console_errors(browser) == []


def test_playground_side_by_side(browser, server, client, tmp_path):
    from selenium.webdriver.common.by import By

    _open_and_connect(browser, server)
    _set(browser, "prompt", PROMPT)
    _set(browser, "max-tokens", str(MAX_TOKENS))
    _select(browser, "algorithm-a", "llada")
    _select(browser, "algorithm-b", "dual_cache")
    _run_and_wait(browser, ["lane-a", "lane-b"])
    for lane, algorithm in (("lane-a", "llada"), ("lane-b", "dual_cache")):
        assert _output(browser, lane) == _chat_text(client, algorithm)

    def counter(lane: str, name: str) -> int:
        return int(browser.find_element(By.CSS_SELECTOR, f"#{lane} .{name}").text)

    forwards = [counter(lane, "forwards") for lane in ("lane-a", "lane-b")]
    assert forwards[1] < forwards[0]  # the cached preset's threshold rule takes fewer forwards
    refreshes = [counter(lane, "refreshes") for lane in ("lane-a", "lane-b")]
    assert refreshes[0] == 0 and refreshes[1] >= 1  # no cache at all vs a cache built per block
    _canvas_at(browser, "lane-a", 12)  # a mid-run state on the left, the finished one on the right
    shot = tmp_path / "playground.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("PLAYGROUND_SCREENSHOT"):
        Path(os.environ["PLAYGROUND_SCREENSHOT"]).write_bytes(shot.read_bytes())
    assert _console_errors(browser) == []
