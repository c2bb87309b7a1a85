const $ = (id) => document.getElementById(id);
const USES = { greedy: [], "top-k": ["temperature", "top_k"], "top-p": ["temperature", "top_p"], beam: ["beams"] };
let current = null, imageUrl = null, limits = null;

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function describe(detail) {  // FastAPI's errors: a string, or a list of field problems
  if (!Array.isArray(detail)) return String(detail);
  return detail.map((d) => `${d.loc.slice(1).join(".") || "request"}: ${d.msg}`).join("\n");
}

function syncFields() {
  const used = USES[$("strategy").value];
  for (const name of ["temperature", "top_k", "top_p", "beams"]) $(name).disabled = !used.includes(name);
}

function useFile(file) {
  if (!file) return;
  if (limits && file.size > limits.max_upload_mb * 1e6) {
    showError(`${file.name}: ${(file.size / 1e6).toFixed(1)} MB is over the limit of ${limits.max_upload_mb} MB`);
    return;
  }
  current = file;
  if (imageUrl) URL.revokeObjectURL(imageUrl);
  imageUrl = URL.createObjectURL(file);
  $("again").disabled = false;
  caption();
}

async function caption() {
  if (!current) return;
  const body = new FormData($("decoding"));
  body.append("image", current, current.name);
  showError("");
  $("again").disabled = true;
  $("status").textContent = "captioning…";
  try {
    const response = await fetch("/api/caption", { method: "POST", body });
    const answer = await response.json().catch(() => ({ detail: `${response.status} ${response.statusText}` }));
    if (!response.ok) throw new Error(describe(answer.detail));
    render(answer);
    $("status").textContent = `${current.name}: ${answer.width} × ${answer.height}`;
  } catch (e) {
    $("status").textContent = "";
    showError(e instanceof TypeError ? `could not reach the server: ${e.message}` : e.message);
  } finally {
    $("again").disabled = false;
  }
}

function render(answer) {
  const results = $("results");
  results.replaceChildren();
  for (const run of answer.captions) {
    const card = document.createElement("article");
    card.className = "card panel";
    card.dataset.variant = run.variant;
    card.innerHTML = `<h2></h2><div class="frame"><img alt=""><canvas hidden></canvas></div>
      <p class="caption"></p><p class="meta"></p><p class="hint">Click a word to see where this variant looked.</p>`;
    card.querySelector("h2").textContent = card.querySelector("h2").title = run.run;
    const img = card.querySelector("img"), canvas = card.querySelector("canvas");
    img.onload = () => { if (img.naturalWidth < 160) img.style.imageRendering = "pixelated"; };
    img.src = imageUrl;
    const text = card.querySelector(".caption");
    text.dataset.caption = run.caption;  // the decoded caption; the spans below are its tokens, one by one
    run.tokens.forEach((token, t) => {
      if (/^\s/.test(token)) text.append(" ");
      const word = document.createElement("span");
      word.textContent = token.trim();
      word.onclick = () => {
        text.querySelectorAll(".active").forEach((s) => s.classList.remove("active"));
        word.classList.add("active");
        drawHeat(canvas, img, run.attention[t], run.grid, run.crop);
        card.querySelector(".hint").textContent =
          `Where it looked as it wrote “${word.textContent}”: brighter is more attention.`;
      };
      text.append(word);
    });
    if (!run.tokens.length) text.textContent = "(empty caption)";
    card.querySelector(".meta").textContent =
      `${(run.seconds * 1000).toFixed(0)} ms` +
      (run.batch_size > 1 ? ` · decoded in a batch of ${run.batch_size}` : "");
    results.append(card);
  }
}

// inferno-like: black, purple, red, orange, pale yellow
const STOPS = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];
function colour(v) {
  const x = Math.min(Math.max(v, 0), 1) * (STOPS.length - 1), i = Math.min(Math.floor(x), STOPS.length - 2), f = x - i;
  const [r, g, b] = STOPS[i].map((c, k) => Math.round(c + f * (STOPS[i + 1][k] - c)));
  return `rgba(${r}, ${g}, ${b}, 0.6)`;
}

function drawHeat(canvas, img, weights, grid, crop) {
  const w = img.clientWidth, h = img.clientHeight, [rows, cols] = grid;
  canvas.width = w;
  canvas.height = h;
  canvas.hidden = false;
  const ctx = canvas.getContext("2d"), top = Math.max(...weights) || 1;
  const cellW = (crop[2] * w) / cols, cellH = (crop[3] * h) / rows;
  for (let r = 0; r < rows; r++)
    for (let c = 0; c < cols; c++) {
      ctx.fillStyle = colour(weights[r * cols + c] / top);
      // whole pixels, so neighbouring cells leave no seams
      const x0 = Math.round(crop[0] * w + c * cellW), x1 = Math.round(crop[0] * w + (c + 1) * cellW);
      const y0 = Math.round(crop[1] * h + r * cellH), y1 = Math.round(crop[1] * h + (r + 1) * cellH);
      ctx.fillRect(x0, y0, x1 - x0, y1 - y0);
    }
}

async function loadExamples() {
  const examples = await (await fetch("/api/examples")).json();
  for (const ex of examples) {
    const thumb = document.createElement("img");
    thumb.src = ex.url;
    thumb.title = ex.reference;
    thumb.alt = `test image ${ex.index}`;
    thumb.onclick = async () => {
      const response = await fetch(ex.url);
      if (!response.ok) return showError(describe((await response.json()).detail));
      const blob = await response.blob();
      useFile(new File([blob], `test image ${ex.index}`, { type: blob.type }));
    };
    $("examples").append(thumb);
  }
}

async function start() {
  try {
    limits = await (await fetch("/api/health")).json();
    $("runs").textContent = limits.runs.map((r) => r.label).join("  |  ");
    await loadExamples();
  } catch (e) {
    showError(`could not reach the server: ${e.message}`);
  }
}

$("file").onchange = (e) => useFile(e.target.files[0]);
$("strategy").onchange = syncFields;
$("decoding").onsubmit = (e) => { e.preventDefault(); caption(); };
const drop = $("drop");
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); useFile(e.dataTransfer.files[0]); };
syncFields();
start();
