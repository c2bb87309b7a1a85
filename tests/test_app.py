"""
app.py: the JSON API through FastAPI's TestClient (bad input of every kind, each
followed by a request that succeeds), the batching worker, and the page in a
real browser (headless Chromium driven by Selenium) against the real server.

The browser test uses the tiny trained runs of the fixtures; DUOCAP_APP_RUNS
("RUN_A RUN_B") points it at other runs (the demo ones, for the README), and
DUOCAP_SCREENSHOT=docs/app.png keeps its screenshot there (else it goes to a
temporary folder).
"""

import io
import json
import os
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from corpora import png_header_only
from fastapi import HTTPException
from fastapi.testclient import TestClient
from PIL import Image

import app
import data
import decoding
from bench_app import Server
from conftest import InProcess, script_env
from decoding import caption_images

CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"


@pytest.fixture(scope="module")
def runs(trained_runs):
    return [trained_runs[variant][0] for variant in ("explained", "self_attention")]


@pytest.fixture(scope="module")
def workers(runs):
    return [app.RunWorker(run, batch_size=8) for run in runs]


LIMIT_MB, LIMIT_PIXELS = 0.2, 1_000_000


@pytest.fixture(scope="module")
def client(workers):
    api = app.create_app(
        workers, max_upload_mb=LIMIT_MB, max_pixels=LIMIT_PIXELS, examples=app.example_records(workers)
    )
    with TestClient(api) as c:
        yield c


def png(image):
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def test_image(splits):
    record = splits["test"][0]
    return record.image.read_bytes(), data.read_image(record.image)


def post(client, raw, name="image.png", **fields):
    return client.post("/api/caption", files={"image": (name, raw, "image/png")}, data=fields)


def assert_still_serving(client, test_image):
    r = post(client, test_image[0])
    assert r.status_code == 200, r.text
    assert len(r.json()["captions"]) == 2


# --- the API ---------------------------------------------------------------------------


def test_health_names_every_run_with_its_variant_and_the_versions(client, runs):
    health = client.get("/api/health").json()
    assert [(r["variant"], r["name"]) for r in health["runs"]] == [
        ("explained", runs[0].name),
        ("self_attention", runs[1].name),
    ]
    assert [r["label"] for r in health["runs"]] == [
        f"cross-attention · {runs[0].name}",
        f"self-attention · {runs[1].name}",
    ]
    assert health["versions"]["torch"] == torch.__version__
    assert health["versions"]["transformers"] == transformers.__version__
    assert health["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))


def test_captions_equal_offline_greedy_captioning_with_attention_per_token(client, workers, test_image):
    r = post(client, test_image[0], strategy="greedy")
    assert r.status_code == 200, r.text
    answer = r.json()
    assert (answer["width"], answer["height"]) == test_image[1].size
    for worker, run in zip(workers, answer["captions"]):
        expected = caption_images(worker.model, worker.processor, worker.tokenizer, [test_image[1]], strategy="greedy")[
            0
        ]
        assert run["caption"] == expected
        # one token string per generated token: the greedy tokens, re-decoded one by one
        state = worker.model.encode_images(
            pixel_values=worker.processor(images=[test_image[1]], return_tensors="pt")["pixel_values"]
        )
        ids = decoding.decode(worker.model, state, worker.tokenizer.eos_token_id, 30)  # the page's default length
        assert run["tokens"] == [worker.tokenizer.decode([t]) for t in ids[0]]
        rows, cols = run["grid"]
        assert rows * cols == worker.model.vision.config.image_size**2 // worker.model.vision.config.patch_size**2
        assert len(run["attention"]) == len(run["tokens"])
        for weights in run["attention"]:
            assert len(weights) == rows * cols and sum(weights) == pytest.approx(1, abs=1e-3)
        assert run["crop"] == [0, 0, 1, 1]  # a square image is seen whole
        assert run["seconds"] > 0 and run["batch_size"] >= 1


def test_a_wide_image_is_seen_in_its_centre(client):
    wide = Image.effect_noise((128, 64), 60).convert("RGB")
    r = post(client, png(wide))
    assert r.status_code == 200, r.text
    for run in r.json()["captions"]:
        assert run["crop"] == pytest.approx([0.25, 0, 0.5, 1])


@pytest.mark.parametrize(
    "fields",
    [
        {"strategy": "beam", "beams": "1"},
        {"strategy": "top-k", "top_k": "1", "temperature": "0.7"},
        {"strategy": "top-p", "top_p": "1e-6"},
    ],
    ids=["beam", "top-k", "top-p"],
)
def test_each_strategy_that_keeps_one_candidate_is_greedy(client, test_image, fields):
    greedy = post(client, test_image[0], strategy="greedy").json()["captions"]
    r = post(client, test_image[0], **fields)
    assert r.status_code == 200, r.text
    assert r.json()["decoding"]["strategy"] == fields["strategy"]
    assert [c["caption"] for c in r.json()["captions"]] == [c["caption"] for c in greedy]


def test_sampling_and_beams_caption_too(client, test_image):
    for fields in (
        {"strategy": "top-k", "top_k": "5", "temperature": "1.5"},
        {"strategy": "top-p", "top_p": "0.8"},
        {"strategy": "beam", "beams": "3"},
    ):
        r = post(client, test_image[0], max_new_tokens="5", **fields)
        assert r.status_code == 200, r.text
        assert all(len(c["tokens"]) <= 5 for c in r.json()["captions"])


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", "0"),
        ("temperature", "-1"),
        ("top_k", "0"),
        ("top_p", "0"),
        ("top_p", "1.5"),
        ("beams", "0"),
        ("beams", "17"),
        ("max_new_tokens", "0"),
        ("max_new_tokens", "101"),
        ("strategy", "nucleus"),
        ("top_k", "many"),
        ("temperature", "inf"),
        ("top_p", "nan"),
    ],
)
def test_out_of_range_decoding_gets_422_naming_the_field(client, test_image, field, value):
    r = post(client, test_image[0], **{field: value})
    assert r.status_code == 422, r.text
    assert [e["loc"][-1] for e in r.json()["detail"]] == [field]
    assert_still_serving(client, test_image)


def test_a_field_the_api_does_not_have_gets_422_naming_it(client, test_image):
    r = post(client, test_image[0], strategy="beam", beam="3")  # beams, misspelt
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("unknown field(s) beam; the fields are image, strategy")
    assert_still_serving(client, test_image)


def test_a_request_without_an_image_gets_422(client, test_image):
    r = client.post("/api/caption", data={"strategy": "greedy"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"][-1] == "image"
    assert_still_serving(client, test_image)


def test_an_upload_over_the_limit_gets_413_by_its_length(client, test_image):
    too_big = os.urandom(int(LIMIT_MB * 1e6) + 1)
    r = post(client, too_big)
    assert r.status_code == 413
    assert f"{LIMIT_MB:g} MB" in r.json()["detail"]
    assert_still_serving(client, test_image)


def test_a_streamed_upload_is_stopped_past_the_limit(client, test_image):
    """A chunked body declares no length: it is counted as it arrives, and reading stops."""

    def body():
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
        for _ in range(100):
            yield os.urandom(50_000)
        yield b"\r\n--b--\r\n"

    r = client.post("/api/caption", content=body(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_still_serving(client, test_image)


@pytest.mark.parametrize("problem", ["not an image", "truncated", "too many pixels", "too thin", "empty"])
def test_a_bad_image_gets_400_naming_the_problem(client, test_image, problem):
    raw = {
        "not an image": b"caption this, please",
        "truncated": test_image[0][: len(test_image[0]) // 2],
        # 4 megapixels of one colour compress to a few kilobytes: small upload, large decode
        "too many pixels": png(Image.new("L", (2000, 2000))),
        "too thin": png(Image.new("L", (5000, 10))),  # small, but 112,000 pixels wide once resized
        "empty": b"",
    }[problem]
    expected = {
        "not an image": "not an image file",
        "truncated": "truncated",
        "too many pixels": "over the limit of 1,000,000",
        "too thin": "5000 x 10 pixels: more than 100 times as long as it is wide",
        "empty": "empty",
    }[problem]
    r = post(client, raw, name="upload.png")
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith("upload.png: ") and expected in r.json()["detail"]
    assert_still_serving(client, test_image)


def test_a_failure_in_a_worker_is_a_500_and_the_worker_carries_on(client, workers, test_image, monkeypatch):
    def broken(jobs):
        raise RuntimeError("out of memory, say")

    monkeypatch.setattr(workers[1], "caption", broken)
    r = post(TestClient(client.app, raise_server_exceptions=False), test_image[0])  # as a real server answers
    assert r.status_code == 500
    assert "out of memory, say" in r.json()["detail"]
    monkeypatch.undo()
    assert_still_serving(client, test_image)


def test_a_request_that_fails_in_a_batch_fails_alone(runs, splits, monkeypatch):
    """One image the model cannot caption (out of memory, say) in a batch of four: the other
    three still get their captions."""
    worker = app.RunWorker(runs[0], batch_size=4, max_wait_s=0.5)
    images = [data.read_image(r.image) for r in splits["test"][:4]]
    caption, batches = worker.caption, []

    def fails_on_the_second(jobs):
        batches.append(len(jobs))
        if any(job.image is images[1] for job in jobs):
            raise RuntimeError("out of memory, say")
        return caption(jobs)

    monkeypatch.setattr(worker, "caption", fails_on_the_second)
    futures = [worker.submit(im, app.Decoding()) for im in images]
    with pytest.raises(RuntimeError, match="out of memory"):
        futures[1].result(timeout=20)
    alone = [
        caption_images(worker.model, worker.processor, worker.tokenizer, [im], strategy="greedy")[0] for im in images
    ]
    assert [futures[k].result(timeout=20).caption for k in (0, 2, 3)] == [alone[k] for k in (0, 2, 3)]
    assert batches[0] == 4, "the four were tried as one batch first"


def test_a_pixel_limit_above_pillows_own_is_the_one_that_holds(workers, monkeypatch):
    """--max-pixels 100,000,000: a 9,500 x 9,500 header (90 M pixels, past Pillow's default bomb
    limit of 89 M) is read as an image, not refused as a bomb; its missing body is what fails."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored afterwards
    app.create_app(workers, max_pixels=100_000_000)
    with pytest.raises(HTTPException) as e:
        app.open_upload(png_header_only(9500, 9500), "big.png", 100_000_000)
    assert e.value.status_code == 400 and "decompression bomb" not in e.value.detail, e.value.detail


def test_test_images_are_served_by_index_only(client, workers, splits):
    examples = client.get("/api/examples").json()
    expected = splits["test"][:6]
    assert [e["reference"] for e in examples] == [r.captions[0] for r in expected]
    for e, record in zip(examples, expected):
        assert client.get(e["url"]).content == record.image.read_bytes()
    assert client.get(f"/api/examples/{len(examples)}").status_code == 404
    assert client.get("/api/examples/-1").status_code == 404
    assert client.get("/api/examples/..%2F..%2Fconfig.json").status_code in (404, 422)


def test_each_test_image_is_listed_once_however_the_runs_name_their_data(workers, shapes_dir, splits, tmp_path):
    (tmp_path / "link").symlink_to(shapes_dir)
    copy = shutil.copytree(shapes_dir, tmp_path / "copy")
    spellings = [shapes_dir, shapes_dir, tmp_path / "link", copy, f"{shapes_dir}/../{shapes_dir.name}"]
    same_data = [
        SimpleNamespace(label=f"run {i}", config=dict(workers[0].config, data_dir=str(d)))
        for i, d in enumerate(spellings)
    ]
    examples = app.example_records(same_data)
    assert [r.image for r in examples] == [r.image for r in splits["test"][:6]]
    with TestClient(app.create_app([], examples=examples)) as c:
        assert len(c.get("/api/examples").json()) == 6


def test_the_docs_describe_both_endpoints_and_the_limits(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "/api/health" in spec["paths"] and "/api/caption" in spec["paths"]
    decoding = spec["components"]["schemas"]["Decoding"]["properties"]
    assert decoding["temperature"]["exclusiveMinimum"] == 0
    assert (decoding["beams"]["minimum"], decoding["beams"]["maximum"]) == (1, 16)
    assert set(spec["paths"]["/api/caption"]["post"]["responses"]) >= {"200", "400", "413", "422"}


def test_the_page_is_served_from_its_files_wherever_the_server_starts(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # web/ is found beside app.py, not in the working directory
    with TestClient(app.create_app([])) as c:
        page, script, style = c.get("/"), c.get("/static/app.js"), c.get("/static/style.css")
    assert page.status_code == script.status_code == style.status_code == 200
    assert page.headers["content-type"].startswith("text/html") and '<input type="file"' in page.text
    assert '<script src="/static/app.js">' in page.text and 'href="/static/style.css"' in page.text
    assert "javascript" in script.headers["content-type"] and "/api/caption" in script.text
    assert style.headers["content-type"].startswith("text/css")
    assert page.text == (app.WEB / "index.html").read_text()


class FormFields(HTMLParser):
    """{name: attributes} of a page's input and select elements, and the select's options."""

    def __init__(self):
        super().__init__()
        self.fields, self.options = {}, []

    def handle_starttag(self, tag, attrs):
        if tag in ("input", "select") and dict(attrs).get("name"):
            self.fields[dict(attrs)["name"]] = dict(attrs)

    def handle_data(self, text):
        if self.lasttag == "option" and text.strip():
            self.options.append(text.strip())


def test_the_page_form_starts_at_the_api_defaults_and_limits():
    form = FormFields()
    form.feed((app.WEB / "index.html").read_text())
    schema = app.Decoding.model_json_schema()["properties"]
    assert set(form.fields) == set(schema)
    assert form.options == schema["strategy"]["enum"]
    for name, field in schema.items():
        if name == "strategy":
            continue
        attrs = form.fields[name]
        assert float(attrs["value"]) == field["default"], name
        for attr, bound in (("min", "minimum"), ("max", "maximum")):
            if bound in field:
                assert float(attrs[attr]) == field[bound], (name, attr)


# --- batching ---------------------------------------------------------------------------


def test_concurrent_requests_with_the_same_settings_share_one_batch(runs, splits):
    worker = app.RunWorker(runs[1], batch_size=4, max_wait_s=0.5)
    images = [data.read_image(r.image) for r in splits["test"][:4]]
    greedy, beam = app.Decoding(strategy="greedy"), app.Decoding(strategy="beam", beams=2)
    futures = [worker.submit(im, greedy) for im in images[:2]] + [worker.submit(images[2], beam)]
    futures += [worker.submit(im, greedy) for im in images[2:]]
    results = [f.result(timeout=60) for f in futures]
    assert [r.batch_size for r in results] == [4, 4, 1, 4, 4]
    alone = [
        caption_images(worker.model, worker.processor, worker.tokenizer, [im], strategy="greedy")[0] for im in images
    ]
    assert [r.caption for r in results[:2] + results[3:]] == alone
    assert (
        results[2].caption
        == caption_images(worker.model, worker.processor, worker.tokenizer, [images[2]], strategy="beam", beams=2)[0]
    )


def test_requests_share_a_batch_only_when_the_settings_their_strategy_uses_agree():
    d = app.Decoding
    assert d(temperature=0.5, top_k=3, top_p=0.5, beams=2).batch_key() == d().batch_key()  # greedy uses none
    for a, b in [
        (d(max_new_tokens=5), d()),
        (d(strategy="beam", max_new_tokens=5), d(strategy="beam")),
        (d(strategy="beam", beams=2), d(strategy="beam", beams=3)),
        (d(strategy="top-k", top_k=5), d(strategy="top-k")),
        (d(strategy="top-k", temperature=0.5), d(strategy="top-k")),
        (d(strategy="top-p", top_p=0.5), d(strategy="top-p")),
        (d(strategy="top-p", temperature=0.5), d(strategy="top-p")),
        (d(strategy="top-k"), d(strategy="top-p")),
    ]:
        assert a.batch_key() != b.batch_key(), (a, b)


def test_concurrent_requests_for_different_lengths_each_get_the_caption_of_their_own(runs, splits):
    worker = app.RunWorker(runs[0], batch_size=8, max_wait_s=0.5)
    images = [data.read_image(r.image) for r in splits["test"][:5]]
    lengths = [30, 2, 5, 30, 2]
    futures = [worker.submit(im, app.Decoding(max_new_tokens=n)) for im, n in zip(images, lengths)]
    results = [f.result(timeout=60) for f in futures]
    alone = [
        caption_images(worker.model, worker.processor, worker.tokenizer, [im], strategy="greedy", max_new_tokens=n)[0]
        for im, n in zip(images, lengths)
    ]
    # the lengths make a difference to these captions, so a request decoded at another's length shows
    assert all(len(r.tokens) == n for r, n in zip(results, lengths) if n < 30)
    assert [r.caption for r in results] == alone
    assert [r.batch_size for r in results] == [2, 2, 1, 2, 2]


def test_a_cancelled_request_is_dropped_and_the_rest_of_its_batch_decoded(runs, splits):
    worker = app.RunWorker(runs[0], batch_size=4, max_wait_s=0.5)
    image = data.read_image(splits["test"][0].image)
    kept, dropped = worker.submit(image, app.Decoding()), worker.submit(image, app.Decoding())
    assert dropped.cancel()  # its batch is still waiting for company
    assert kept.result(timeout=60).batch_size == 1
    assert worker.submit(image, app.Decoding()).result(timeout=60).caption == kept.result().caption


def test_without_batching_each_request_is_decoded_alone(runs, splits):
    worker = app.RunWorker(runs[0], batch_size=1, max_wait_s=0.5)
    image = data.read_image(splits["test"][0].image)
    futures = [worker.submit(image, app.Decoding()) for _ in range(3)]
    assert [f.result(timeout=60).batch_size for f in futures] == [1, 1, 1]


# --- the page in a real browser -----------------------------------------------------------


def browser_runs(request):
    named = os.environ.get("DUOCAP_APP_RUNS")
    return [Path(p).resolve() for p in named.split()] if named else request.getfixturevalue("runs")


def start_generate(runs, images, cache):
    """generate.py --strategy greedy on the images, for each run (in this process, when waited for:
    the page's server is the fresh process here)."""
    # at the page's default length (generate.py's follows the run)
    return {
        run: InProcess(
            ["generate.py", "--checkpoint", run, "--strategy", "greedy", "--max-new-tokens", "30", *images], cache
        )
        for run in runs
    }


def captions_of(scripts):
    """{run: {image path: caption}} from generate.py's path<TAB>caption lines."""
    return {
        run: dict(line.split("\t", 1) for line in script.ok().splitlines() if "\t" in line)
        for run, script in scripts.items()
    }


def wait_for(driver, condition, seconds, server):
    """condition's value once truthy; on a timeout, a failure with what the page and server said."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, seconds).until(condition)
    except TimeoutException:
        error = driver.execute_script("return document.getElementById('error').textContent")
        pytest.fail(f"the page did not get there in {seconds}s; its error: {error!r}; the server:\n{server.output()}")


def chrome():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which("chromium") and Path(CHROMEDRIVER).exists()):
        pytest.fail(f"the browser test needs Chromium and its driver at {CHROMEDRIVER}: {INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,820"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_in_a_browser_the_page_captions_like_generate_and_shows_attention(request, duocap_cache, tmp_path):
    from selenium.webdriver.common.by import By

    runs = browser_runs(request)
    config = json.loads((runs[0] / "config.json").read_text())
    images = [str(r.image) for r in data.splits_for(config, strict=False)["test"][:6]]
    driver = chrome()
    generating = start_generate(runs, images, duocap_cache)
    try:
        with Server(runs, env=script_env(duocap_cache)) as server:
            expected = captions_of(generating)
            # an image every run has words for, so that there is a word to click
            image = next((i for i in images if all(expected[run][i] for run in runs)), None)
            assert image, f"every test image got an empty caption from some run: {expected}"
            driver.get(server.url)
            wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#examples img"), 20, server)
            (tmp_path / "notes.txt").write_text("not a picture")
            driver.find_element(By.ID, "file").send_keys(str(tmp_path / "notes.txt"))
            error = wait_for(
                driver,
                lambda d: d.find_element(By.ID, "error").is_displayed() and d.find_element(By.ID, "error").text,
                20,
                server,
            )
            assert error.startswith("notes.txt: not an image file")
            driver.find_element(By.ID, "file").send_keys(image)
            cards = wait_for(
                driver,
                lambda d: (
                    d.find_elements(By.CSS_SELECTOR, ".card .caption span")
                    and d.find_elements(By.CSS_SELECTOR, ".card")
                ),
                30,
                server,
            )
            assert len(cards) == len(runs)
            assert not driver.find_element(By.ID, "error").is_displayed()
            shown = [card.find_element(By.CSS_SELECTOR, ".caption") for card in cards]
            assert [c.get_attribute("data-caption") for c in shown] == [expected[run][image] for run in runs]
            # the words shown are the caption's tokens (a random test LM's byte-level tokens can split a
            # character, which only the whole caption decodes; a real model's words read the same)
            tokens = [[s.text for s in c.find_elements(By.CSS_SELECTOR, "span")] for c in shown]
            assert all(tokens) and all(len(t) >= len(expected[run][image].split()) // 4 for t, run in zip(tokens, runs))

            for card in cards:
                canvas = card.find_element(By.TAG_NAME, "canvas")
                assert not canvas.is_displayed()
                card.find_elements(By.CSS_SELECTOR, ".caption span")[-1].click()
                assert canvas.is_displayed()
                painted = driver.execute_script(
                    "const c = arguments[0], px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                    "let n = 0; for (let i = 3; i < px.length; i += 4) n += px[i] > 0; return n / (px.length / 4);",
                    canvas,
                )
                assert painted > 0.9, f"the attention map covers {painted:.0%} of the image"
            driver.execute_script("window.scrollTo(0, 0)")
            screenshot = Path(os.environ.get("DUOCAP_SCREENSHOT") or tmp_path / "app.png")
            assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 0
    finally:
        driver.quit()
