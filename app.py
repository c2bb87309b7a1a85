"""
Caption images in a browser, every run side by side.

    python app.py --runs runs/explained-demo runs/self_attention-demo [--host 127.0.0.1] [--port 8000]

One page, web/ (drop an image or click a test image; change the decoding and
caption again; click a word to see where each variant looked for it), and a JSON API:
POST /api/caption and GET /api/health, documented at /docs.

Each run has a worker thread of its own, so the model never runs on the event
loop. Requests queue there and are decoded together, KV-cached: those with the
same decoding settings, up to --batch-size, waiting at most --max-wait-ms for
company. --no-batching decodes one request at a time.
"""

import argparse
import asyncio
import collections
import concurrent.futures
import io
import math
import os
import platform
import queue
import threading
import time
from pathlib import Path
from typing import Annotated, Literal

import torch
import transformers
import uvicorn
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

# the project's API, all in one place
import data
from decoding import decode
from runs import LABELS, load_run

MB = 1_000_000
# One run computes at a time. Small models are bound by Python, not arithmetic: two runs decoding at
# once fight over the GIL (on 2 cores, a batch of 8 for each demo run: 150-280 ms at once, 135-160 in turn).
COMPUTE = threading.Lock()
WEB = Path(__file__).resolve().parent / "web"  # the page: index.html and the files it loads from /static


# --- what goes in and out --------------------------------------------------------


class Decoding(BaseModel):
    """How to decode: form fields sent beside the image."""

    model_config = ConfigDict(frozen=True, allow_inf_nan=False)
    strategy: Literal["greedy", "top-k", "top-p", "beam"] = "greedy"
    temperature: float = Field(1.0, gt=0, description="top-k and top-p: divides the logits")
    top_k: int = Field(50, ge=1, description="top-k: sample among this many most likely tokens")
    top_p: float = Field(
        0.9, gt=0, le=1, description="top-p: sample among the most likely tokens that reach this probability"
    )
    beams: int = Field(4, ge=1, le=16, description="beam: captions kept at each step")
    max_new_tokens: int = Field(30, ge=1, le=100, description="the longest caption, in tokens")

    def batch_key(self):
        """The settings this strategy uses: requests that agree on them can share a batch."""
        used = {"greedy": (), "top-k": ("temperature", "top_k"), "top-p": ("temperature", "top_p"), "beam": ("beams",)}[
            self.strategy
        ]
        return (self.strategy, self.max_new_tokens, *(getattr(self, name) for name in used))


class RunCaption(BaseModel):
    run: str = Field(description="the run's label: its variant and run name")
    variant: str
    caption: str
    tokens: list[str] = Field(description="the caption's tokens, each decoded on its own")
    attention: list[list[float]] = Field(
        description="per token: where the model looked when it wrote it, a weight per image patch "
        "(row-major over `grid`, summing to 1)"
    )
    grid: tuple[int, int] = Field(description="rows and columns of image patches")
    crop: tuple[float, float, float, float] = Field(
        description="x, y, width and height of the part of the image the patches cover, as fractions of its size"
    )
    seconds: float = Field(description="from the request reaching this run's queue to its caption")
    batch_size: int = Field(description="how many requests were decoded in this one batch")


class CaptionResponse(BaseModel):
    width: int
    height: int
    decoding: Decoding
    captions: list[RunCaption]


class RunInfo(BaseModel):
    label: str
    variant: str
    name: str


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    runs: list[RunInfo]
    versions: dict[str, str]
    batch_size: int
    max_upload_mb: float
    max_pixels: int


class Example(BaseModel):
    index: int
    url: str
    reference: str


class Problem(BaseModel):
    detail: str


# --- uploads -------------------------------------------------------------------------


class UploadLimit:
    """413 for a request body over max_bytes: by its Content-Length before reading any of it,
    and by counting while it streams in, since a chunked body declares no length."""

    def __init__(self, app, max_bytes):
        self.app, self.max_bytes = app, max_bytes

    def too_large(self):
        return f"the upload is over the limit of {self.max_bytes / MB:g} MB"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_bytes:
            return await JSONResponse({"detail": self.too_large()}, 413)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, self.too_large())
            return message

        await self.app(scope, limited_receive, send)


class NamedUpload(io.BytesIO):
    """Uploaded bytes that data.read_image's errors name by the client's file name (they
    format whatever they were given as the path). Nothing is opened by that name."""

    def __init__(self, raw, name):
        super().__init__(raw)
        self.name = name

    def __str__(self):
        return self.name


def open_upload(raw, name, max_pixels):
    """The upload as an RGB image, decoded as generate.py reads a file; a 400 naming the problem.
    The pixel count is read from the header, before anything is decoded."""
    if not raw:
        raise HTTPException(400, f"{name}: the file is empty")
    try:
        with Image.open(io.BytesIO(raw)) as im:
            width, height = im.size
    except UnidentifiedImageError:
        raise HTTPException(400, f"{name}: not an image file: its format is none that Pillow reads") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise HTTPException(400, f"{name}: cannot read the image header ({e})") from None
    if width * height > max_pixels:
        raise HTTPException(
            400,
            f"{name}: {width} x {height} pixels is over the limit of {max_pixels:,} "
            "(refused as a possible decompression bomb)",
        )
    try:
        return data.read_image(NamedUpload(raw, name))
    except data.DataError as e:
        raise HTTPException(400, str(e)) from None


def patch_box(processor, width, height):
    """(x, y, w, h) as fractions of the image: the part the vision tower's patches cover.
    CLIP's processor scales the shortest side to `size` and keeps a centred `crop_size`,
    so of a non-square image it sees the middle only."""
    edge = processor.size.get("shortest_edge") if processor.do_resize else None
    if not (edge and processor.do_center_crop):
        return 0.0, 0.0, 1.0, 1.0
    scale = edge / min(width, height)
    w = min(1.0, processor.crop_size.get("width") / (width * scale))
    h = min(1.0, processor.crop_size.get("height") / (height * scale))
    return (1 - w) / 2, (1 - h) / 2, w, h


# --- a run and its worker --------------------------------------------------------------


class Job:
    def __init__(self, image, decoding):
        self.image, self.decoding, self.key = image, decoding, decoding.batch_key()
        self.future = concurrent.futures.Future()
        self.start = time.perf_counter()


class RunWorker:
    """One run: its model, and the thread that decodes its queued requests in batches."""

    def __init__(self, run_dir, batch_size=16, max_wait_s=0.005, device="cpu"):
        self.model, self.processor, self.tokenizer, self.config = load_run(run_dir)
        self.model.to(device)
        self.device = device
        self.variant, self.name = self.config["variant"], Path(run_dir).resolve().name
        self.label = f"{LABELS[self.variant]} · {self.name}"
        self.batch_size, self.max_wait_s = batch_size, max_wait_s
        self.queue, self.backlog = queue.Queue(), collections.deque()
        self.generator = torch.Generator(device).manual_seed(0)
        threading.Thread(target=self.serve, name=f"run {self.name}", daemon=True).start()

    def submit(self, image, decoding):
        """A concurrent.futures.Future of this run's RunCaption for a PIL image."""
        job = Job(image, decoding)
        self.queue.put(job)
        return job.future

    def serve(self):
        while True:
            # a request whose client has gone was cancelled: it is dropped, not decoded
            jobs = [job for job in self.next_batch() if job.future.set_running_or_notify_cancel()]
            if not jobs:
                continue
            try:
                with COMPUTE:
                    results = self.caption(jobs)
            except Exception as e:  # the worker carries on; each request gets its own outcome
                if len(jobs) == 1:
                    jobs[0].future.set_exception(e)
                    continue
                for job in jobs:  # one request's image may be what failed: the others on their own
                    try:
                        with COMPUTE:
                            (result,) = self.caption([job])
                    except Exception as e:
                        job.future.set_exception(e)
                    else:
                        job.future.set_result(result)
            else:
                for job, result in zip(jobs, results):
                    job.future.set_result(result)

    def next_batch(self):
        """The oldest job and up to batch_size - 1 others with its settings, taken from those
        set aside earlier and those arriving within max_wait_s; the rest wait their turn."""
        first = self.backlog.popleft() if self.backlog else self.queue.get()
        batch = [first]
        for job in [j for j in self.backlog if j.key == first.key][: self.batch_size - 1]:
            self.backlog.remove(job)
            batch.append(job)
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.batch_size:
            try:
                job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            (batch if job.key == first.key else self.backlog).append(job)
        return batch

    @torch.no_grad()
    def caption(self, jobs):
        decoding = jobs[0].decoding
        pixels = self.processor(images=[j.image for j in jobs], return_tensors="pt")["pixel_values"]
        state = self.model.encode_images(pixel_values=pixels.to(self.device))
        rows = decode(self.model, state, self.tokenizer.eos_token_id, generator=self.generator, **decoding.model_dump())
        maps = self.attention(state, rows)
        return [self.result(job, tokens, weights, len(jobs)) for job, tokens, weights in zip(jobs, rows, maps)]

    def attention(self, state, rows):
        """Per caption, [tokens, patches]: row t is where the model looked as it wrote token t,
        read at the position holding [EOS] + tokens[:t] (as compare.py plots it). Shorter
        captions are padded at the end, which no earlier position attends to."""
        longest = max(map(len, rows))
        if longest == 0:
            return [torch.zeros(0, 0) for _ in rows]
        ids = torch.full((len(rows), longest), self.tokenizer.eos_token_id, dtype=torch.long)
        for i, tokens in enumerate(rows):
            ids[i, 1 : len(tokens)] = torch.tensor(tokens[:-1], dtype=torch.long)
        weights = self.model.image_attention(state, ids.to(self.device)).float().cpu()
        return [weights[i, : len(tokens)] for i, tokens in enumerate(rows)]

    def result(self, job, tokens, weights, batch_size):
        side = math.isqrt(weights.shape[-1])  # CLIP's patches tile a square
        return RunCaption(
            run=self.label,
            variant=self.variant,
            caption=" ".join(self.tokenizer.decode(tokens, skip_special_tokens=True).split()),
            tokens=[self.tokenizer.decode([t]) for t in tokens],
            attention=[[round(w, 4) for w in row] for row in weights.tolist()],
            grid=(side, side),
            crop=patch_box(self.processor, *job.image.size),
            seconds=time.perf_counter() - job.start,
            batch_size=batch_size,
        )


def example_records(workers, per_source=6):
    """A few test-split records of each distinct data source the runs were trained on, each image
    once: known by its bytes, as runs can name the same data by different paths or hold copies of it."""
    examples, seen = [], set()
    for worker in workers:
        try:
            records = data.splits_for(worker.config, strict=False).get("test", [])[:per_source]
            digests = [data.file_digest(r.image) for r in records]
        except (OSError, ValueError) as e:  # the data moved or is gone: the page works without examples
            print(f"no test images for {worker.label}: {e}")
            continue
        for r, digest in zip(records, digests):
            if digest not in seen:
                seen.add(digest)
                examples.append(r)
    return examples


# --- the app ---------------------------------------------------------------------------


def create_app(workers, max_upload_mb=10.0, max_pixels=40_000_000, examples=()):
    # open_upload checks max_pixels itself; Pillow's own bomb limit must not cap a larger one
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS, max_pixels)
    app = FastAPI(title="duocap", summary="Caption an image with every loaded run, side by side.", description=__doc__)
    app.add_middleware(UploadLimit, max_bytes=int(max_upload_mb * MB))
    examples = list(examples)

    @app.exception_handler(Exception)
    async def failed(request, e):
        return JSONResponse({"detail": f"captioning failed: {type(e).__name__}: {e}"}, 500)

    app.mount("/static", StaticFiles(directory=WEB), name="static")

    @app.get("/", response_class=FileResponse, include_in_schema=False)
    def page():
        return FileResponse(WEB / "index.html")

    @app.get("/api/health", response_model=Health)
    def health():
        """Which runs are loaded, their variants, the library versions and the limits."""
        return Health(
            runs=[RunInfo(label=w.label, variant=w.variant, name=w.name) for w in workers],
            versions={
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            batch_size=workers[0].batch_size if workers else 1,
            max_upload_mb=max_upload_mb,
            max_pixels=max_pixels,
        )

    @app.get("/api/examples", response_model=list[Example])
    def list_examples():
        """Test images from the runs' data, served by index."""
        return [
            Example(index=i, url=f"/api/examples/{i}", reference=r.captions[0] if r.captions else "")
            for i, r in enumerate(examples)
        ]

    @app.get("/api/examples/{index}", response_class=FileResponse, responses={404: {"model": Problem}})
    def example_image(index: int):
        if not 0 <= index < len(examples):
            raise HTTPException(404, f"no test image {index}: there are {len(examples)}")
        return FileResponse(examples[index].image)

    @app.post(
        "/api/caption",
        response_model=CaptionResponse,
        responses={
            400: {"model": Problem, "description": "not an image, truncated, or too many pixels"},
            413: {"model": Problem, "description": "an upload over the size limit"},
        },
    )
    async def caption(
        request: Request,
        image: Annotated[UploadFile, File(description="the image: PNG, JPEG, WebP, ...")],
        decoding: Annotated[Decoding, Form()],
    ):
        """Every run's caption of the image, its tokens, where it looked for each, and how long it took."""
        # a misspelt field (beam for beams) would otherwise leave its default in place unsaid;
        # Decoding cannot forbid extra fields itself, since the image is a field of the same form
        unknown = sorted(set((await request.form()).keys()) - {"image", *Decoding.model_fields})
        if unknown:
            raise HTTPException(
                422, f"unknown field(s) {', '.join(unknown)}; the fields are image, {', '.join(Decoding.model_fields)}"
            )
        picture = await run_in_threadpool(open_upload, await image.read(), image.filename or "upload", max_pixels)
        captions = await asyncio.gather(*(asyncio.wrap_future(w.submit(picture, decoding)) for w in workers))
        return CaptionResponse(width=picture.width, height=picture.height, decoding=decoding, captions=captions)

    return app


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN_DIR", help="run directories written by training")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=16, help="most requests decoded together per run")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    p.add_argument("--no-batching", action="store_true", help="decode one request at a time (batch size 1)")
    p.add_argument("--max-upload-mb", type=float, default=10.0)
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="refuse images with more pixels than this")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--threads", type=int, help="torch threads (default: the CPU cores shared out among the runs, at least 1)"
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    batch_size = 1 if args.no_batching else args.batch_size
    # every run decodes on a thread of its own, in parallel: more threads each would oversubscribe the cores
    torch.set_num_threads(args.threads or max(1, len(os.sched_getaffinity(0)) // len(args.runs)))
    workers = []
    for run_dir in args.runs:
        try:
            workers.append(RunWorker(run_dir, batch_size, args.max_wait_ms / 1000, args.device))
        except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: torch refusing --device
            raise SystemExit(f"error: cannot load {run_dir} on {args.device}: {e}") from None
        print(f"loaded {workers[-1].label} from {run_dir}")
    app = create_app(workers, args.max_upload_mb, args.max_pixels, example_records(workers))
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
