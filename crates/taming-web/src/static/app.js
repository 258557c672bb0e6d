// taming-rs demo page: paint a label map, sample, watch the previews stream in.
'use strict';

const $ = (id) => document.getElementById(id);
const BOX = 384; // display size of the canvases, CSS pixels

// Page state; exposed for tests and the curious as window.tamingDemo.
const app = {
  info: null,
  task: null,
  w: 0,
  h: 0,
  labels: null, // Uint8Array of label ids, raster order
  current: 0, // selected label
  jobId: null,
  source: null,
  completeFile: null,
};
window.tamingDemo = app;

function setState(s) {
  document.body.dataset.state = s;
}

function showMessage(text, isError) {
  const m = $('message');
  m.textContent = text || '';
  m.className = isError ? 'error' : '';
}

async function jsonOrError(resp) {
  let body = {};
  try {
    body = await resp.json();
  } catch (e) {
    body = {};
  }
  if (!resp.ok) throw new Error(body.error || `HTTP ${resp.status} ${resp.statusText}`);
  return body;
}

function decodeB64(s) {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function displaySize(el, w, h) {
  const scale = BOX / Math.max(w, h);
  el.style.width = `${Math.round(w * scale)}px`;
  el.style.height = `${Math.round(h * scale)}px`;
}

// ---- label map -----------------------------------------------------------------------------

function buildPalette() {
  const pal = $('palette');
  pal.textContent = '';
  for (const l of app.info.model.labels) {
    const b = document.createElement('button');
    b.type = 'button';
    b.className = 'swatch';
    b.setAttribute('role', 'radio');
    b.dataset.id = l.id;
    const i = document.createElement('i');
    i.style.background = `rgb(${l.color.join(',')})`;
    b.append(i, document.createTextNode(l.name));
    b.addEventListener('click', () => selectLabel(l.id));
    pal.append(b);
  }
  selectLabel(0);
}

function selectLabel(id) {
  app.current = id;
  for (const b of $('palette').children) {
    b.setAttribute('aria-checked', String(Number(b.dataset.id) === id));
  }
}

function setLabels(w, h, ids) {
  app.w = w;
  app.h = h;
  app.labels = ids;
  const c = $('labels');
  c.width = w;
  c.height = h;
  displaySize(c, w, h);
  const brush = $('brush');
  brush.max = String(Math.max(8, Math.round(Math.max(w, h) / 4)));
  if (!brush.dataset.touched) brush.value = String(Math.max(1, Math.round(Math.max(w, h) / 16)));
  $('brush-value').textContent = `${brush.value} px`;
  render();
}

function render() {
  const c = $('labels');
  const ctx = c.getContext('2d');
  const img = ctx.createImageData(app.w, app.h);
  const colors = app.info.model.labels.map((l) => l.color);
  for (let i = 0; i < app.labels.length; i++) {
    const col = colors[app.labels[i]] || [255, 0, 255];
    img.data[4 * i] = col[0];
    img.data[4 * i + 1] = col[1];
    img.data[4 * i + 2] = col[2];
    img.data[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

// Resamples the label map to the output size (nearest neighbour).
function resizeLabels(h, w) {
  if (!app.labels) {
    setLabels(w, h, new Uint8Array(w * h));
    return;
  }
  if (w === app.w && h === app.h) return;
  const out = new Uint8Array(w * h);
  for (let y = 0; y < h; y++) {
    const sy = Math.min(app.h - 1, Math.floor(((y + 0.5) * app.h) / h));
    for (let x = 0; x < w; x++) {
      const sx = Math.min(app.w - 1, Math.floor(((x + 0.5) * app.w) / w));
      out[y * w + x] = app.labels[sy * app.w + sx];
    }
  }
  setLabels(w, h, out);
}

function paintDisc(cx, cy) {
  const r = Number($('brush').value) / 2;
  const x0 = Math.max(0, Math.floor(cx - r));
  const x1 = Math.min(app.w - 1, Math.ceil(cx + r));
  const y0 = Math.max(0, Math.floor(cy - r));
  const y1 = Math.min(app.h - 1, Math.ceil(cy + r));
  for (let y = y0; y <= y1; y++) {
    for (let x = x0; x <= x1; x++) {
      const dx = x + 0.5 - cx;
      const dy = y + 0.5 - cy;
      if (dx * dx + dy * dy <= Math.max(r * r, 0.5)) app.labels[y * app.w + x] = app.current;
    }
  }
}

function wirePainting() {
  const c = $('labels');
  let last = null;
  const toMap = (e) => {
    const rect = c.getBoundingClientRect();
    return [((e.clientX - rect.left) / rect.width) * app.w, ((e.clientY - rect.top) / rect.height) * app.h];
  };
  const strokeTo = (p) => {
    const step = Math.max(0.5, Number($('brush').value) / 4);
    const [x0, y0] = last || p;
    const n = Math.max(1, Math.ceil(Math.hypot(p[0] - x0, p[1] - y0) / step));
    for (let i = 1; i <= n; i++) paintDisc(x0 + ((p[0] - x0) * i) / n, y0 + ((p[1] - y0) * i) / n);
    last = p;
    render();
  };
  c.addEventListener('pointerdown', (e) => {
    if (e.button !== 0) return;
    c.setPointerCapture(e.pointerId);
    last = null;
    strokeTo(toMap(e));
  });
  c.addEventListener('pointermove', (e) => {
    if (last) strokeTo(toMap(e));
  });
  const end = () => {
    last = null;
  };
  c.addEventListener('pointerup', end);
  c.addEventListener('pointercancel', end);
  $('brush').addEventListener('input', () => {
    $('brush').dataset.touched = '1';
    $('brush-value').textContent = `${$('brush').value} px`;
  });
  $('fill-btn').addEventListener('click', () => {
    app.labels.fill(app.current);
    render();
  });
  $('example-btn').addEventListener('click', () => loadExample(Number($('example-seed').value) || 0));
  $('labels-file').addEventListener('change', uploadLabels);
  $('labels-download').addEventListener('click', async (e) => {
    e.preventDefault();
    const url = URL.createObjectURL(await labelsBlob());
    const a = document.createElement('a');
    a.href = url;
    a.download = 'labels.png';
    a.click();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  });
}

async function loadExample(seed) {
  const [h, w] = outputSize();
  try {
    const m = await jsonOrError(await fetch(`/api/example?seed=${seed}&width=${w}&height=${h}`));
    setLabels(m.width, m.height, decodeB64(m.labels));
  } catch (e) {
    showMessage(`example: ${e.message}`, true);
  }
}

async function uploadLabels() {
  const f = $('labels-file').files[0];
  if (!f) return;
  const [h, w] = outputSize();
  const fd = new FormData();
  fd.append('labels', f, f.name);
  fd.append('height', String(h));
  fd.append('width', String(w));
  try {
    const m = await jsonOrError(await fetch('/api/labels', { method: 'POST', body: fd }));
    setLabels(m.width, m.height, decodeB64(m.labels));
    showMessage(`loaded ${f.name}`);
  } catch (e) {
    showMessage(e.message, true);
  }
  $('labels-file').value = '';
}

// The label map as a PNG whose pixels hold the label ids (what `taming sample --segmentation` reads).
function labelsBlob() {
  const c = document.createElement('canvas');
  c.width = app.w;
  c.height = app.h;
  const ctx = c.getContext('2d');
  const img = ctx.createImageData(app.w, app.h);
  for (let i = 0; i < app.labels.length; i++) {
    const v = app.labels[i];
    img.data[4 * i] = v;
    img.data[4 * i + 1] = v;
    img.data[4 * i + 2] = v;
    img.data[4 * i + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  return new Promise((resolve, reject) =>
    c.toBlob((b) => (b ? resolve(b) : reject(new Error('cannot encode the label map'))), 'image/png'),
  );
}

// ---- sampling ------------------------------------------------------------------------------

function outputSize() {
  return [Number($('height').value), Number($('width').value)];
}

function sizeChanged() {
  const m = app.info.model;
  const [h, w] = outputSize();
  const [th, tw] = m.training_size;
  const ok = h > 0 && w > 0 && h % m.factor === 0 && w % m.factor === 0;
  $('size-note').textContent = !ok
    ? `sizes are multiples of ${m.factor}`
    : h > th || w > tw
      ? `larger than the training size ${th}x${tw}: sliding window`
      : '';
  if (ok && app.task === 'labels') resizeLabels(h, w);
}

function busy(on) {
  $('sample-btn').disabled = on || app.task === 'unsupported';
  $('cancel-btn').disabled = !on;
}

async function sample() {
  if (app.source) app.source.close();
  const fd = new FormData();
  const field = (name, id) => {
    const v = $(id).value.trim();
    if (v !== '') fd.append(name, v);
  };
  if (app.task === 'labels') fd.append('labels', await labelsBlob(), 'labels.png');
  if (app.task === 'class') field('class', 'class');
  field('seed', 'seed');
  field('temperature', 'temperature');
  field('top_k', 'top-k');
  field('top_p', 'top-p');
  field('height', 'height');
  field('width', 'width');
  if (app.completeFile) {
    fd.append('image', app.completeFile, app.completeFile.name);
    field('keep_rows', 'keep-rows');
  }
  showMessage('');
  $('download').hidden = true;
  busy(true);
  setState('submitting');
  let st;
  try {
    st = await jsonOrError(await fetch('/api/jobs', { method: 'POST', body: fd }));
  } catch (e) {
    showMessage(e.message, true);
    busy(false);
    setState('error');
    return;
  }
  app.jobId = st.id;
  update(st);
  follow(st.id);
}

function follow(id) {
  const es = new EventSource(`/api/jobs/${id}/events`);
  app.source = es;
  es.addEventListener('status', (ev) => {
    const st = JSON.parse(ev.data);
    if (st.id !== app.jobId) return;
    update(st);
    if (['done', 'failed', 'cancelled'].includes(st.state)) es.close();
  });
  es.onerror = () => {
    if (es.readyState === EventSource.CLOSED && app.jobId === id) {
      showMessage('lost the connection to the server', true);
      busy(false);
      setState('error');
    }
  };
}

function update(st) {
  const p = $('progress');
  p.max = Math.max(1, st.total);
  p.value = st.done;
  const result = $('result');
  const [h, w] = st.size;
  displaySize(result, w, h);
  switch (st.state) {
    case 'queued':
      $('progress-text').textContent = `waiting in the queue (position ${st.position})`;
      setState('queued');
      break;
    case 'running':
      $('progress-text').textContent =
        `${st.done}/${st.total} tokens${st.sliding ? ' (sliding window)' : ''}, ${st.seconds.toFixed(1)} s`;
      if (st.preview) result.src = st.preview;
      setState('running');
      break;
    case 'done': {
      const url = `/api/jobs/${st.id}/result.png`;
      $('progress-text').textContent = `done: ${st.total} tokens in ${st.seconds.toFixed(1)} s`;
      result.onload = () => {
        result.onload = null;
        setState('done');
      };
      result.src = url;
      const a = $('download');
      a.href = url;
      a.download = `taming-seed${$('seed').value || 0}.png`;
      a.hidden = false;
      busy(false);
      break;
    }
    case 'failed':
      $('progress-text').textContent = 'failed';
      showMessage(st.message || 'sampling failed', true);
      busy(false);
      setState('failed');
      break;
    case 'cancelled':
      $('progress-text').textContent = 'cancelled';
      busy(false);
      setState('cancelled');
      break;
    default:
      break;
  }
}

async function cancel() {
  if (!app.jobId) return;
  try {
    await jsonOrError(await fetch(`/api/jobs/${app.jobId}/cancel`, { method: 'POST' }));
  } catch (e) {
    showMessage(e.message, true);
  }
}

function wireSettings() {
  $('sample-btn').addEventListener('click', sample);
  $('cancel-btn').addEventListener('click', cancel);
  $('random-seed').addEventListener('click', () => {
    $('seed').value = String(Math.floor(Math.random() * 1e9));
  });
  $('height').addEventListener('change', sizeChanged);
  $('width').addEventListener('change', sizeChanged);
  $('complete-file').addEventListener('change', () => {
    const f = $('complete-file').files[0] || null;
    app.completeFile = f;
    const img = $('complete-preview');
    img.hidden = !f;
    if (f) img.src = URL.createObjectURL(f);
  });
  $('complete-clear').addEventListener('click', () => {
    app.completeFile = null;
    $('complete-file').value = '';
    $('complete-preview').hidden = true;
  });
}

async function init() {
  try {
    app.info = await jsonOrError(await fetch('/api/info'));
  } catch (e) {
    showMessage(`cannot load the model info: ${e.message}`, true);
    setState('error');
    return;
  }
  const m = app.info.model;
  app.task = m.task.kind;
  $('model-desc').textContent = `${m.description}; trained at ${m.training_size[0]}x${m.training_size[1]}`;
  const [th, tw] = m.training_size;
  for (const [id, v] of [
    ['height', th],
    ['width', tw],
  ]) {
    const el = $(id);
    el.min = String(m.factor);
    el.step = String(m.factor);
    el.max = String(app.info.limits.max_output_side);
    el.value = String(v);
  }
  wireSettings();
  if (app.task === 'labels') {
    $('paint-section').hidden = false;
    buildPalette();
    wirePainting();
    setLabels(tw, th, new Uint8Array(tw * th));
    await loadExample(0);
  } else if (app.task === 'class') {
    $('class-row').hidden = false;
    $('class').max = String(m.task.n_classes - 1);
  } else if (app.task === 'unsupported') {
    showMessage(`this model is conditioned on ${m.task.describe}, which this page cannot provide`, true);
  }
  busy(false);
  setState('ready');
}

init();
