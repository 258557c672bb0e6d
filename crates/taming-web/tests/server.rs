//! Server tests without a browser: upload checks, the bounded queue, and a sample whose PNG
//! equals the library pipeline's for the same inputs.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use image::{DynamicImage, GrayImage, Luma, RgbImage};
use taming::sampling::SamplingOptions;
use taming_web::ServerConfig;
use tower::ServiceExt;

const BOUNDARY: &str = "----taming-test-boundary";

/// A multipart/form-data body: (name, Some(file bytes) or text).
fn multipart(parts: &[(&str, Part)]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, part) in parts {
        write!(body, "--{BOUNDARY}\r\n").unwrap();
        match part {
            Part::File(bytes) => {
                write!(
                    body,
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{name}.png\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )
                .unwrap();
                body.extend_from_slice(bytes);
            }
            Part::Text(t) => {
                write!(
                    body,
                    "Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{t}"
                )
                .unwrap();
            }
        }
        body.extend_from_slice(b"\r\n");
    }
    write!(body, "--{BOUNDARY}--\r\n").unwrap();
    body
}

enum Part {
    File(Vec<u8>),
    Text(String),
}

fn text(s: impl ToString) -> Part {
    Part::Text(s.to_string())
}

async fn call(app: &Router, req: Request<Body>) -> (StatusCode, Vec<u8>) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, body)
}

async fn post_form(app: &Router, uri: &str, parts: &[(&str, Part)]) -> (StatusCode, Vec<u8>) {
    let req = Request::post(uri)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={BOUNDARY}"),
        )
        .body(Body::from(multipart(parts)))
        .unwrap();
    call(app, req).await
}

async fn get(app: &Router, uri: &str) -> (StatusCode, Vec<u8>) {
    call(app, Request::get(uri).body(Body::empty()).unwrap()).await
}

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

fn error_of(body: &[u8]) -> String {
    json(body)["error"]
        .as_str()
        .expect("an `error` message")
        .to_string()
}

fn png(img: DynamicImage) -> Vec<u8> {
    taming_web::upload::encode_png(&img).unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn bad_uploads_are_refused_with_a_message() {
    let Some(files) = common::model_files() else {
        return;
    };
    let config = ServerConfig {
        workers: 0,
        max_upload_bytes: 20_000,
        max_upload_side: 300,
        ..ServerConfig::default()
    };
    let (server, info) = common::server(&files, config);
    let n = info.n_labels().expect("a label-to-image model");
    let (th, tw) = info.training_size;
    let app = server.router();
    let bad_id = format!("label id {n}");
    rt().block_on(async {
        let cases: Vec<(&str, Vec<u8>, Vec<&str>)> = vec![
            (
                "jpeg",
                {
                    let mut b = Vec::new();
                    DynamicImage::ImageRgb8(RgbImage::new(8, 8))
                        .write_to(&mut std::io::Cursor::new(&mut b), image::ImageFormat::Jpeg)
                        .unwrap();
                    b
                },
                vec!["labels", "not a PNG", "JPEG"],
            ),
            (
                "text",
                b"0 0 1 1\n2 2 3 3\n".to_vec(),
                vec!["labels", "not a PNG", "text"],
            ),
            (
                "too many bytes",
                {
                    let mut b = png(DynamicImage::ImageLuma8(GrayImage::new(4, 4)));
                    b.resize(20_001, 0);
                    b
                },
                vec!["labels", "too large", "20001 bytes"],
            ),
            (
                "too many pixels",
                png(DynamicImage::ImageLuma8(GrayImage::new(301, 8))),
                vec!["labels", "301x8"],
            ),
            (
                "label id out of range",
                {
                    let mut g = GrayImage::new(tw as u32, th as u32);
                    g.put_pixel(3, 2, Luma([n as u8]));
                    png(DynamicImage::ImageLuma8(g))
                },
                vec!["labels", &bad_id, "(x=3, y=2)"],
            ),
        ];
        for (what, bytes, expect) in cases {
            for uri in ["/api/jobs", "/api/labels"] {
                let (status, body) = post_form(
                    &app,
                    uri,
                    &[("labels", Part::File(bytes.clone())), ("seed", text(1))],
                )
                .await;
                assert_eq!(status, StatusCode::BAD_REQUEST, "{what} at {uri}");
                let msg = error_of(&body);
                for e in &expect {
                    assert!(msg.contains(e), "{what} at {uri}: `{msg}` lacks `{e}`");
                }
            }
        }
        // a bad image to complete and bad fields name themselves too
        let labels = png(DynamicImage::ImageLuma8(GrayImage::new(
            tw as u32, th as u32,
        )));
        let (status, body) = post_form(
            &app,
            "/api/jobs",
            &[
                ("labels", Part::File(labels.clone())),
                ("image", Part::File(b"GIF89a....".to_vec())),
            ],
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            error_of(&body).contains("image: not a PNG"),
            "{}",
            error_of(&body)
        );
        for (field, value, expect) in [
            ("temperature", "0", "temperature"),
            ("seed", "abc", "seed"),
            ("height", "30", "height"),
            ("top_p", "1.5", "top-p"),
        ] {
            let (status, body) = post_form(
                &app,
                "/api/jobs",
                &[("labels", Part::File(labels.clone())), (field, text(value))],
            )
            .await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{field}={value}");
            assert!(error_of(&body).contains(expect), "{}", error_of(&body));
        }
        // not multipart at all
        let (status, body) = call(
            &app,
            Request::post("/api/jobs")
                .header("content-type", "application/json")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(error_of(&body).contains("multipart"));
    });
    server.shutdown();
}

#[test]
fn a_full_queue_answers_busy() {
    let Some(files) = common::model_files() else {
        return;
    };
    // no worker: queued jobs stay queued
    let config = ServerConfig {
        workers: 0,
        queue: 2,
        ..ServerConfig::default()
    };
    let (server, info) = common::server(&files, config);
    let (th, tw) = info.training_size;
    let labels = png(DynamicImage::ImageLuma8(GrayImage::new(
        tw as u32, th as u32,
    )));
    let app = server.router();
    rt().block_on(async {
        let mut ids = Vec::new();
        for i in 0..2 {
            let (status, body) =
                post_form(&app, "/api/jobs", &[("labels", Part::File(labels.clone()))]).await;
            assert_eq!(
                status,
                StatusCode::ACCEPTED,
                "{}",
                String::from_utf8_lossy(&body)
            );
            let st = json(&body);
            assert_eq!(st["state"], "queued");
            assert_eq!(st["position"], i + 1);
            ids.push(st["id"].as_str().unwrap().to_string());
        }
        let (status, body) =
            post_form(&app, "/api/jobs", &[("labels", Part::File(labels.clone()))]).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(error_of(&body).contains("busy"), "{}", error_of(&body));
        // cancelling a waiting job frees its place and moves the next one up
        let (status, body) = call(
            &app,
            Request::post(format!("/api/jobs/{}/cancel", ids[0]))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json(&body)["state"], "cancelled");
        let (_, body) = get(&app, &format!("/api/jobs/{}", ids[1])).await;
        assert_eq!(json(&body)["position"], 1);
        let (status, _) =
            post_form(&app, "/api/jobs", &[("labels", Part::File(labels.clone()))]).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        // no result yet; unknown jobs are 404 with a message
        let (status, body) = get(&app, &format!("/api/jobs/{}/result.png", ids[1])).await;
        assert_eq!(status, StatusCode::CONFLICT, "{}", error_of(&body));
        let (status, body) = get(&app, "/api/jobs/nope").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(error_of(&body).contains("nope"));
    });
    server.shutdown();
}

#[test]
fn a_sample_equals_the_library_pipeline() {
    let Some(files) = common::model_files() else {
        return;
    };
    let config = ServerConfig {
        workers: 1,
        preview_interval: Duration::from_millis(1),
        ..ServerConfig::default()
    };
    let (server, info) = common::server(&files, config);
    let (th, tw) = info.training_size;
    let app = server.router();
    // the page, its script and the model info are served
    let example_labels = rt().block_on(async {
        let (status, body) = get(&app, "/").await;
        assert_eq!(status, StatusCode::OK);
        assert!(String::from_utf8_lossy(&body).contains("/app.js"));
        let (status, _) = get(&app, "/app.js").await;
        assert_eq!(status, StatusCode::OK);
        let (status, body) = get(&app, "/api/info").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json(&body)["model"]["task"]["kind"], "labels");
        let (status, body) =
            get(&app, &format!("/api/example?seed=3&width={tw}&height={th}")).await;
        assert_eq!(status, StatusCode::OK);
        let ex = json(&body);
        assert_eq!(ex["width"], tw);
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(ex["labels"].as_str().unwrap())
            .unwrap()
    });
    let labels = GrayImage::from_raw(tw as u32, th as u32, example_labels).unwrap();
    let labels_png = png(DynamicImage::ImageLuma8(labels));
    let (seed, top_k) = (7u64, 20usize);
    let result = rt().block_on(async {
        let (status, body) = post_form(
            &app,
            "/api/jobs",
            &[
                ("labels", Part::File(labels_png.clone())),
                ("seed", text(seed)),
                ("top_k", text(top_k)),
                ("temperature", text("1.0")),
                ("height", text(th)),
                ("width", text(tw)),
            ],
        )
        .await;
        assert_eq!(
            status,
            StatusCode::ACCEPTED,
            "{}",
            String::from_utf8_lossy(&body)
        );
        let id = json(&body)["id"].as_str().unwrap().to_string();
        let t0 = Instant::now();
        loop {
            let (_, body) = get(&app, &format!("/api/jobs/{id}")).await;
            let st = json(&body);
            match st["state"].as_str().unwrap() {
                "done" => break,
                "failed" | "cancelled" => panic!("job ended: {st}"),
                _ => {}
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "job too slow: {st}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // the event stream of a finished job is its final status, then it ends
        let (status, body) = get(&app, &format!("/api/jobs/{id}/events")).await;
        assert_eq!(status, StatusCode::OK);
        let events = String::from_utf8_lossy(&body).to_string();
        assert!(
            events.contains("event: status") && events.contains("\"state\":\"done\""),
            "{events}"
        );
        let (status, submitted) = get(&app, &format!("/api/jobs/{id}/labels.png")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(submitted, labels_png);
        let (status, body) = get(&app, &format!("/api/jobs/{id}/result.png")).await;
        assert_eq!(status, StatusCode::OK);
        body
    });
    let served = image::load_from_memory_with_format(&result, image::ImageFormat::Png)
        .unwrap()
        .to_rgb8();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("labels.png");
    std::fs::write(&path, &labels_png).unwrap();
    let model = common::load_model(&files);
    let expected = common::reference_sample(
        &model,
        &path,
        (th, tw),
        SamplingOptions {
            seed,
            top_k: Some(top_k),
            ..SamplingOptions::default()
        },
    );
    assert_eq!(
        common::differing_pixels(&served, &expected),
        0,
        "the served image differs from the library pipeline's"
    );
    server.shutdown();
}

/// Waits until the job's status satisfies `pred`; returns that status.
async fn wait_for(
    app: &Router,
    id: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let (_, body) = get(app, &format!("/api/jobs/{id}")).await;
        let st = json(&body);
        if pred(&st) {
            return st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "waited too long for {what}: {st}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[test]
fn a_running_job_streams_previews_and_cancels() {
    let Some(files) = common::model_files() else {
        return;
    };
    let config = ServerConfig {
        workers: 1,
        preview_interval: Duration::from_millis(1),
        ..ServerConfig::default()
    };
    let (server, info) = common::server(&files, config);
    let (th, tw) = info.training_size;
    // larger than the training size: the sliding window, long enough to cancel midway
    let (h, w) = ((2 * th).max(128), (2 * tw).max(128));
    let labels = png(DynamicImage::ImageLuma8(GrayImage::new(w as u32, h as u32)));
    let app = server.router();
    rt().block_on(async {
        let (status, body) = post_form(
            &app,
            "/api/jobs",
            &[
                ("labels", Part::File(labels)),
                ("height", text(h)),
                ("width", text(w)),
            ],
        )
        .await;
        assert_eq!(
            status,
            StatusCode::ACCEPTED,
            "{}",
            String::from_utf8_lossy(&body)
        );
        let id = json(&body)["id"].as_str().unwrap().to_string();
        let st = wait_for(&app, &id, "a preview", |st| {
            st["state"] == "done" || st["preview"].is_string()
        })
        .await;
        assert_eq!(
            st["state"], "running",
            "the job ended before a preview: {st}"
        );
        assert_eq!(st["sliding"], true);
        let url = st["preview"].as_str().unwrap();
        use base64::Engine;
        let preview = base64::engine::general_purpose::STANDARD
            .decode(url.strip_prefix("data:image/png;base64,").unwrap())
            .unwrap();
        let preview = image::load_from_memory(&preview).unwrap();
        assert_eq!((preview.width(), preview.height()), (w as u32, h as u32));
        let (status, _) = call(
            &app,
            Request::post(format!("/api/jobs/{id}/cancel"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let st = wait_for(&app, &id, "the cancellation", |st| st["state"] != "running").await;
        assert_eq!(st["state"], "cancelled", "{st}");
        assert!(st["done"].as_u64().unwrap() < st["total"].as_u64().unwrap());
    });
    server.shutdown();
}

#[test]
fn image_completion_equals_the_library_pipeline() {
    let Some(files) = common::model_files() else {
        return;
    };
    let (server, info) = common::server(&files, ServerConfig::default());
    let (th, tw) = info.training_size;
    let labels = info.example_labels(5, tw as u32, th as u32);
    let labels_png = png(DynamicImage::ImageLuma8(labels));
    // an image of another size: fitted (bicubic) to the output size, as `taming sample --complete`
    let picture = RgbImage::from_fn(tw as u32 + 10, th as u32 + 6, |x, y| {
        image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
    });
    let picture_png = png(DynamicImage::ImageRgb8(picture));
    let keep_rows = th / info.factor / 4;
    let result = rt().block_on(async {
        let app = server.router();
        let (status, body) = post_form(
            &app,
            "/api/jobs",
            &[
                ("labels", Part::File(labels_png.clone())),
                ("image", Part::File(picture_png.clone())),
                ("keep_rows", text(keep_rows)),
                ("seed", text(11)),
            ],
        )
        .await;
        assert_eq!(
            status,
            StatusCode::ACCEPTED,
            "{}",
            String::from_utf8_lossy(&body)
        );
        let id = json(&body)["id"].as_str().unwrap().to_string();
        let st = wait_for(&app, &id, "the end", |st| {
            st["state"] != "running" && st["state"] != "queued"
        })
        .await;
        assert_eq!(st["state"], "done", "{st}");
        get(&app, &format!("/api/jobs/{id}/result.png")).await.1
    });
    let served = image::load_from_memory(&result).unwrap().to_rgb8();
    // the library pipeline with the inputs `taming sample --segmentation L --complete P
    // --keep-rows N --seed 11` builds
    let dir = tempfile::tempdir().unwrap();
    let (lp, pp) = (dir.path().join("l.png"), dir.path().join("p.png"));
    std::fs::write(&lp, &labels_png).unwrap();
    std::fs::write(&pp, &picture_png).unwrap();
    let model = common::load_model(&files);
    let device = candle_core::Device::Cpu;
    use taming::image_io::{self, Interpolation, LabelShift};
    let l = image_io::load_labels(&lp).unwrap();
    let (_, onehot) =
        image_io::labels_to_onehot(&l, info.n_labels().unwrap(), LabelShift::None, &lp, &device)
            .unwrap();
    let img = image_io::fit(
        &image_io::load_rgb(&pp).unwrap(),
        th as u32,
        tw as u32,
        Interpolation::Bicubic,
    )
    .unwrap();
    let req = taming::pipeline::SampleRequest {
        condition: taming::pipeline::Condition::Spatial(onehot),
        size: (th, tw),
        complete: Some((
            image_io::rgb_to_tensor(&img, &device).unwrap(),
            taming::pipeline::Keep::Rows(keep_rows),
        )),
        batch: 1,
        options: SamplingOptions {
            seed: 11,
            ..SamplingOptions::default()
        },
    };
    let out = taming::pipeline::sample(&model, &req, &mut |_| taming::sampling::Control::Continue)
        .unwrap();
    let expected = image_io::tensor_to_rgb(&out.images.unwrap().get(0).unwrap()).unwrap();
    assert_eq!(common::differing_pixels(&served, &expected), 0);
    server.shutdown();
}

#[test]
fn class_and_unconditional_models_work_without_a_label_map() {
    for (name, kind) in [
        ("transformer_class", "class"),
        ("transformer_uncond", "unconditional"),
    ] {
        let Some(files) = common::fixture_files(name) else {
            return;
        };
        let (server, info) = common::server(&files, ServerConfig::default());
        let app = server.router();
        rt().block_on(async {
            let (_, body) = get(&app, "/api/info").await;
            assert_eq!(json(&body)["model"]["task"]["kind"], kind, "{name}");
            let (status, body) = get(&app, "/api/example").await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{name}");
            assert!(error_of(&body).contains("label map"));
            let labels = png(DynamicImage::ImageLuma8(GrayImage::new(8, 8)));
            let (status, body) =
                post_form(&app, "/api/jobs", &[("labels", Part::File(labels))]).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{name}");
            assert!(error_of(&body).contains("does not take a label map"));
            let mut form = vec![("seed", text(3))];
            if let taming_web::Task::Class { n_classes } = info.task {
                let (status, body) =
                    post_form(&app, "/api/jobs", &[("class", text(n_classes))]).await;
                assert_eq!(status, StatusCode::BAD_REQUEST);
                assert!(
                    error_of(&body).contains("out of range"),
                    "{}",
                    error_of(&body)
                );
                form.push(("class", text(n_classes - 1)));
            }
            let (status, body) = post_form(&app, "/api/jobs", &form).await;
            assert_eq!(
                status,
                StatusCode::ACCEPTED,
                "{}",
                String::from_utf8_lossy(&body)
            );
            let id = json(&body)["id"].as_str().unwrap().to_string();
            let st = wait_for(&app, &id, "the end", |st| {
                st["state"] != "running" && st["state"] != "queued"
            })
            .await;
            assert_eq!(st["state"], "done", "{name}: {st}");
            let (status, body) = get(&app, &format!("/api/jobs/{id}/result.png")).await;
            assert_eq!(status, StatusCode::OK);
            let img = image::load_from_memory(&body).unwrap();
            assert_eq!(
                (img.height() as usize, img.width() as usize),
                info.training_size
            );
        });
        server.shutdown();
    }
}
