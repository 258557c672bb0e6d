//! End-to-end test in a real browser: Debian's Chromium, headless, on loopback, driven over the
//! Chrome DevTools Protocol. It paints a stroke on the label canvas with mouse events, sets a
//! seed, presses Sample, waits for the image, reads its pixels back from the page, fetches the
//! label map the page submitted, and checks that `taming sample`'s pipeline gives the same pixels.
//! A second test uploads a label map through the file input (and a file that is not a PNG),
//! cancels a running job, and fills the queue to see the page's busy message.
//!
//! Without `chromium` on PATH the test is skipped (with the reason printed), unless env `CI` is
//! set: then it fails.

mod common;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine;
use image::RgbImage;
use serde_json::{json, Value};
use taming::sampling::SamplingOptions;
use taming_web::ServerConfig;
use tungstenite::{Message, WebSocket};

/// `chromium` (or `chromium-browser`) on PATH.
fn find_chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| [d.join("chromium"), d.join("chromium-browser")])
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A headless Chromium we started; killed when dropped.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    ws_url: String,
}

impl Browser {
    fn launch(exe: &PathBuf) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(exe);
        cmd.args([
            "--headless",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-pings",
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "--window-size=1280,1000",
            "--force-device-scale-factor=1",
        ]);
        cmd.arg(format!("--user-data-dir={}", profile.path().display()));
        if is_root() {
            cmd.arg("--no-sandbox");
        }
        cmd.arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut log = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(Ok(url.trim().to_string()));
                }
                log.push(line);
            }
            let _ = tx.send(Err(log.join("\n")));
        });
        let ws_url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(url)) => url,
            Ok(Err(log)) => {
                let _ = child.kill();
                panic!("chromium exited before listening:\n{log}");
            }
            Err(_) => {
                let _ = child.kill();
                panic!("chromium did not print its DevTools address within 60 s");
            }
        };
        Browser {
            child,
            _profile: profile,
            ws_url,
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal CDP client over the browser's websocket, with one attached page session.
struct Cdp {
    ws: WebSocket<TcpStream>,
    next_id: u64,
    session: Option<String>,
}

impl Cdp {
    fn connect(ws_url: &str) -> Cdp {
        let hostport = ws_url
            .strip_prefix("ws://")
            .and_then(|r| r.split('/').next())
            .unwrap_or_else(|| panic!("unexpected DevTools address {ws_url}"));
        let stream = TcpStream::connect(hostport).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let (ws, _) = tungstenite::client(ws_url, stream).unwrap();
        Cdp {
            ws,
            next_id: 1,
            session: None,
        }
    }

    fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(msg.to_string())).unwrap();
        loop {
            let m = self.ws.read().unwrap();
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["id"] == json!(id) {
                if let Some(e) = v.get("error") {
                    panic!("{method} failed: {e}");
                }
                return v["result"].clone();
            }
        }
    }

    /// Evaluates a JS expression in the page (awaiting promises) and returns its value.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expr, "awaitPromise": true, "returnByValue": true }),
        );
        if let Some(ex) = r.get("exceptionDetails") {
            panic!("JS `{expr}` threw: {ex}");
        }
        r["result"]["value"].clone()
    }

    fn mouse(&mut self, kind: &str, x: f64, y: f64, buttons: u32) {
        self.call(
            "Input.dispatchMouseEvent",
            json!({
                "type": kind, "x": x, "y": y, "button": "left", "buttons": buttons,
                "clickCount": if kind == "mouseMoved" { 0 } else { 1 },
            }),
        );
    }

    /// Clicks the centre of the element `selector` with real mouse events.
    fn click(&mut self, selector: &str) {
        let (x, y, w, h) = self.rect(selector);
        let (cx, cy) = (x + w / 2.0, y + h / 2.0);
        self.mouse("mouseMoved", cx, cy, 0);
        self.mouse("mousePressed", cx, cy, 1);
        self.mouse("mouseReleased", cx, cy, 0);
    }

    /// The viewport rectangle (x, y, w, h) of `selector`, scrolled into view.
    fn rect(&mut self, selector: &str) -> (f64, f64, f64, f64) {
        let r = self.eval(&format!(
            "(() => {{ const e = document.querySelector('{selector}'); e.scrollIntoView({{block: 'center'}}); \
             const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; }})()"
        ));
        let f = |i: usize| r[i].as_f64().unwrap();
        (f(0), f(1), f(2), f(3))
    }

    /// Waits until `document.body.dataset.state` is one of `states`; returns it.
    fn wait_state(&mut self, states: &[&str], timeout: Duration) -> String {
        let t0 = Instant::now();
        loop {
            let s = self.eval(
                "document.body && document.getElementById('message') ? document.body.dataset.state : ''",
            );
            let s = s.as_str().unwrap_or("").to_string();
            if states.contains(&s.as_str()) {
                return s;
            }
            if t0.elapsed() > timeout {
                let msg = self.eval("document.getElementById('message').textContent");
                panic!(
                    "page state `{s}` after {timeout:?}, waiting for {states:?}; message: {msg}"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn b64(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().expect("a base64 string"))
        .unwrap()
}

/// A server on a loopback port (its own runtime) and a headless Chromium showing its page.
struct Session {
    rt: tokio::runtime::Runtime,
    server: std::sync::Arc<taming_web::Server>,
    serving: tokio::task::JoinHandle<Result<(), taming_web::WebError>>,
    stop: tokio::sync::oneshot::Sender<()>,
    browser: Browser,
    cdp: Cdp,
    info: taming_web::ModelInfo,
    files: common::ModelFiles,
}

impl Session {
    /// Starts both and waits for the page to be ready; `None` when the test is skipped.
    fn start(config: ServerConfig) -> Option<Session> {
        let Some(chromium) = find_chromium() else {
            return common::skip(
                "chromium not found on PATH (apt-get install -y chromium); the browser test needs it",
            );
        };
        let files = common::model_files()?;
        let (server, info) = common::server(&files, config);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = std::sync::Arc::new(server);
        let serving = {
            let server = server.clone();
            rt.spawn(async move {
                server
                    .serve(listener, async {
                        let _ = stop_rx.await;
                    })
                    .await
            })
        };
        let browser = Browser::launch(&chromium);
        let mut cdp = Cdp::connect(&browser.ws_url);
        let target = cdp.call(
            "Target.createTarget",
            json!({ "url": format!("http://{addr}/") }),
        );
        let attached = cdp.call(
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
        );
        cdp.session = Some(attached["sessionId"].as_str().unwrap().to_string());
        cdp.wait_state(&["ready"], Duration::from_secs(60));
        Some(Session {
            rt,
            server,
            serving,
            stop,
            browser,
            cdp,
            info,
            files,
        })
    }

    /// Shuts the browser and the server down; gives back the model's files.
    fn finish(self) -> common::ModelFiles {
        let Session {
            rt,
            server,
            serving,
            stop,
            browser,
            cdp,
            files,
            ..
        } = self;
        drop(cdp);
        drop(browser);
        let _ = stop.send(());
        rt.block_on(serving).unwrap().unwrap();
        if let Ok(server) = std::sync::Arc::try_unwrap(server) {
            server.shutdown();
        }
        files
    }
}

#[test]
fn paint_sample_and_compare_with_the_pipeline() {
    let config = ServerConfig {
        port: 0,
        workers: 1,
        preview_interval: Duration::from_millis(20),
        ..ServerConfig::default()
    };
    let Some(mut session) = Session::start(config) else {
        return;
    };
    let n_labels = session.info.n_labels().expect("a label-to-image model");
    let (th, tw) = session.info.training_size;
    let cdp = &mut session.cdp;

    // pick the last label of the palette and paint a horizontal stroke across the middle
    let label = n_labels - 1;
    cdp.click(&format!("#palette [data-id=\"{label}\"]"));
    assert_eq!(cdp.eval("window.tamingDemo.current"), json!(label));
    let before = b64(&cdp.eval(
        "(() => { let s = ''; for (const v of window.tamingDemo.labels) s += String.fromCharCode(v); return btoa(s); })()",
    ));
    let (x, y, w, h) = cdp.rect("#labels");
    let cy = y + h / 2.0;
    cdp.mouse("mouseMoved", x + 0.1 * w, cy, 0);
    cdp.mouse("mousePressed", x + 0.1 * w, cy, 1);
    for i in 1..=20 {
        let px = x + (0.1 + 0.8 * i as f64 / 20.0) * w;
        cdp.mouse("mouseMoved", px, cy + (i % 3) as f64, 1);
    }
    cdp.mouse("mouseReleased", x + 0.9 * w, cy, 0);

    // a fixed seed, then Sample
    let seed = 4242u64;
    cdp.eval(&format!(
        "(() => {{ const s = document.getElementById('seed'); s.value = '{seed}'; \
         s.dispatchEvent(new Event('change')); }})()"
    ));
    cdp.click("#sample-btn");
    let state = cdp.wait_state(&["done", "failed", "error"], Duration::from_secs(180));
    assert_eq!(
        state,
        "done",
        "sampling in the page ended with `{state}`: {}",
        cdp.eval("document.getElementById('message').textContent")
    );

    // TAMING_WEB_SCREENSHOT=FILE.png keeps a picture of the page, for people
    if let Some(path) = std::env::var_os("TAMING_WEB_SCREENSHOT") {
        let shot = cdp.call("Page.captureScreenshot", json!({ "format": "png" }));
        std::fs::write(&path, b64(&shot["data"])).unwrap();
    }

    // the pixels the page shows
    let shown = cdp.eval(
        "(async () => { const img = document.getElementById('result'); await img.decode(); \
         const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight; \
         const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0); \
         const d = ctx.getImageData(0, 0, c.width, c.height).data; let s = ''; \
         for (let i = 0; i < d.length; i++) s += String.fromCharCode(d[i]); \
         return { w: c.width, h: c.height, src: img.getAttribute('src'), rgba: btoa(s) }; })()",
    );
    let (sw, sh) = (
        shown["w"].as_u64().unwrap() as u32,
        shown["h"].as_u64().unwrap() as u32,
    );
    assert_eq!((sh as usize, sw as usize), (th, tw), "shown image size");
    assert!(
        shown["src"].as_str().unwrap().ends_with("/result.png"),
        "the page shows {} rather than the result",
        shown["src"]
    );
    let rgba = b64(&shown["rgba"]);
    let shown_rgb = RgbImage::from_fn(sw, sh, |x, y| {
        let i = 4 * (y * sw + x) as usize;
        image::Rgb([rgba[i], rgba[i + 1], rgba[i + 2]])
    });

    // the label map the page submitted
    let submitted = b64(&cdp.eval(
        "(async () => { const r = await fetch(`/api/jobs/${window.tamingDemo.jobId}/labels.png`); \
         const b = new Uint8Array(await r.arrayBuffer()); let s = ''; \
         for (const v of b) s += String.fromCharCode(v); return btoa(s); })()",
    ));
    let dir = tempfile::tempdir().unwrap();
    let labels_path = dir.path().join("labels.png");
    std::fs::write(&labels_path, &submitted).unwrap();
    let labels = taming::image_io::load_labels(&labels_path).unwrap();
    assert_eq!(labels.dimensions(), (tw as u32, th as u32));
    // the stroke is in it: the middle row holds the painted label across most of the width
    let row = th as u32 / 2;
    let painted = (0..tw as u32)
        .filter(|&x| labels.get_pixel(x, row).0[0] as usize == label)
        .count();
    assert!(
        painted >= tw * 7 / 10,
        "the stroke is missing from the submitted label map: {painted} of {tw} pixels of row {row} hold label {label}"
    );
    assert_ne!(
        before,
        labels.as_raw().clone(),
        "painting did not change the label map"
    );

    let files = session.finish();

    // the same inputs through the pipeline of `taming sample`
    let model = common::load_model(&files);
    let expected = common::reference_sample(
        &model,
        &labels_path,
        (th, tw),
        SamplingOptions {
            seed,
            ..SamplingOptions::default()
        },
    );
    assert_eq!(
        common::differing_pixels(&shown_rgb, &expected),
        0,
        "the page's image differs from `taming sample`'s for the same label map and seed"
    );
}

/// The page's other paths: uploading a label map (and a file that is not one), cancelling a
/// running job (no result is left behind), and the busy message when the queue is full.
#[test]
fn upload_cancel_and_busy_in_the_page() {
    let config = ServerConfig {
        port: 0,
        workers: 1,
        queue: 1,
        preview_interval: Duration::from_millis(20),
        ..ServerConfig::default()
    };
    let Some(mut session) = Session::start(config) else {
        return;
    };
    let (th, tw) = session.info.training_size;
    let cdp = &mut session.cdp;
    let dir = tempfile::tempdir().unwrap();

    // upload: a label map PNG through the page's file input
    let upload = |cdp: &mut Cdp, path: &std::path::Path| {
        let input = cdp.call(
            "Runtime.evaluate",
            json!({ "expression": "document.getElementById('labels-file')" }),
        );
        cdp.eval("document.getElementById('message').textContent = ''");
        cdp.call(
            "DOM.setFileInputFiles",
            json!({ "files": [path.to_str().unwrap()], "objectId": input["result"]["objectId"] }),
        );
        let t0 = Instant::now();
        loop {
            let m = cdp.eval("document.getElementById('message').textContent");
            let m = m.as_str().unwrap_or("").to_string();
            if !m.is_empty() {
                let class = cdp.eval("document.getElementById('message').className");
                return (m, class.as_str() == Some("error"));
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "no message after the upload"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let n_labels = session.info.n_labels().expect("a label-to-image model") as u8;
    let labels = image::GrayImage::from_fn(tw as u32, th as u32, |x, y| {
        image::Luma([((x / 8 + y / 8) % n_labels as u32) as u8])
    });
    let good = dir.path().join("mine.png");
    labels.save(&good).unwrap();
    let (msg, error) = upload(cdp, &good);
    assert!(!error && msg.contains("mine.png"), "upload message: {msg}");
    let shown = b64(&cdp.eval(
        "(() => { let s = ''; for (const v of window.tamingDemo.labels) s += String.fromCharCode(v); return btoa(s); })()",
    ));
    assert_eq!(
        shown,
        labels.as_raw().clone(),
        "the page holds another label map than the upload"
    );
    let bad = dir.path().join("notes.png");
    std::fs::write(&bad, b"not a picture").unwrap();
    let (msg, error) = upload(cdp, &bad);
    assert!(error, "a file that is not a PNG was accepted: {msg}");
    let still = b64(&cdp.eval(
        "(() => { let s = ''; for (const v of window.tamingDemo.labels) s += String.fromCharCode(v); return btoa(s); })()",
    ));
    assert_eq!(still, shown, "a refused upload changed the label map");

    // cancel: a large image (sliding window, many tokens), cancelled while it runs
    let big = 4 * th.max(tw);
    cdp.eval(&format!(
        "(() => {{ for (const id of ['height', 'width']) {{ const e = document.getElementById(id); \
         e.value = '{big}'; e.dispatchEvent(new Event('change')); }} }})()"
    ));
    cdp.click("#sample-btn");
    cdp.wait_state(&["running"], Duration::from_secs(60));
    cdp.click("#cancel-btn");
    let state = cdp.wait_state(
        &["cancelled", "done", "failed", "error"],
        Duration::from_secs(60),
    );
    assert_eq!(state, "cancelled");
    let status = cdp.eval(
        "(async () => (await fetch(`/api/jobs/${window.tamingDemo.jobId}/result.png`)).status)()",
    );
    assert_eq!(status, json!(409), "a cancelled job left a result");
    assert_eq!(
        cdp.eval("document.getElementById('sample-btn').disabled"),
        json!(false)
    );

    // busy: one job running and one waiting fill the worker and the queue of one; the page's
    // Sample is then refused with the server's message
    let submit = format!(
        "(async () => {{ const fd = new FormData(); \
         fd.append('labels', await labelsBlob(), 'labels.png'); \
         fd.append('height', '{big}'); fd.append('width', '{big}'); \
         const r = await fetch('/api/jobs', {{ method: 'POST', body: fd }}); \
         return [r.status, (await r.json()).id || null]; }})()"
    );
    let first = cdp.eval(&submit);
    let second = cdp.eval(&submit);
    assert_eq!(
        (first[0].clone(), second[0].clone()),
        (json!(202), json!(202)),
        "{first} {second}"
    );
    cdp.click("#sample-btn");
    let state = cdp.wait_state(&["error", "queued", "running"], Duration::from_secs(30));
    let msg = cdp.eval("document.getElementById('message').textContent");
    assert_eq!(state, "error", "a third job was accepted: {msg}");
    assert!(
        msg.as_str().unwrap_or("").contains("busy"),
        "message: {msg}"
    );
    for job in [&first[1], &second[1]] {
        let st = cdp.eval(&format!(
            "(async () => (await fetch('/api/jobs/{}/cancel', {{ method: 'POST' }})).status)()",
            job.as_str().unwrap()
        ));
        assert_eq!(st, json!(200));
    }
    session.finish();
}
