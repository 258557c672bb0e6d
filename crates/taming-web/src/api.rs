//! The HTTP routes: the embedded page, model info, label map checks and examples, and jobs
//! (submit, status, server-sent events, cancel, result).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::multipart::{Multipart, MultipartError, MultipartRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use image::GrayImage;
use serde::Deserialize;
use taming::image_io::{self, Interpolation};
use taming::pipeline::Keep;
use taming::sampling::SamplingOptions;
use tokio_stream::wrappers::ReceiverStream;

use crate::jobs::{Job, JobInput};
use crate::model_info::Task;
use crate::upload::{self, Limits};
use crate::{AppState, WebError};

const INDEX_HTML: &str = include_str!("static/index.html");
const APP_JS: &str = include_str!("static/app.js");
const STYLE_CSS: &str = include_str!("static/style.css");

type App = State<Arc<AppState>>;

/// The router of the demo.
pub fn router(state: Arc<AppState>) -> Router {
    // two uploads and the form fields
    let body_limit = state.config.max_upload_bytes.saturating_mul(2) + (64 << 10);
    Router::new()
        .route(
            "/",
            get(|| async { page("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/app.js",
            get(|| async { page("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/style.css",
            get(|| async { page("text/css; charset=utf-8", STYLE_CSS) }),
        )
        .route("/api/info", get(info))
        .route("/api/example", get(example))
        .route("/api/labels", post(check_labels))
        .route("/api/jobs", post(create_job))
        .route("/api/jobs/{id}", get(job_status))
        .route("/api/jobs/{id}/events", get(job_events))
        .route("/api/jobs/{id}/cancel", post(cancel_job))
        .route("/api/jobs/{id}/result.png", get(job_result))
        .route("/api/jobs/{id}/labels.png", get(job_labels))
        .fallback(|| async { WebError::NotFound("no such page".into()) })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

fn page(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

fn png_response(bytes: Vec<u8>, filename: &str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/png".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("inline; filename=\"{filename}\""),
            ),
        ],
        bytes,
    )
        .into_response()
}

fn limits(state: &AppState) -> Limits {
    Limits {
        max_bytes: state.config.max_upload_bytes,
        max_side: state.config.max_upload_side,
    }
}

async fn info(State(state): App) -> Json<serde_json::Value> {
    let c = &state.config;
    Json(serde_json::json!({
        "model": state.info,
        "limits": {
            "max_upload_bytes": c.max_upload_bytes,
            "max_upload_side": c.max_upload_side,
            "max_output_side": c.max_output_side,
            "queue": c.queue,
            "workers": c.workers,
        },
    }))
}

/// A label map as JSON: size and ids (one byte per pixel, raster order) in base64.
fn labels_json(labels: &GrayImage) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "width": labels.width(),
        "height": labels.height(),
        "labels": base64::engine::general_purpose::STANDARD.encode(labels.as_raw()),
    }))
}

/// Checks an output size against the model and the server's limit.
fn check_size(state: &AppState, h: usize, w: usize) -> Result<(), WebError> {
    let f = state.info.factor;
    let max = state.config.max_output_side;
    for (name, v) in [("height", h), ("width", w)] {
        if v == 0 || v % f != 0 {
            return Err(WebError::BadRequest(format!(
                "{name}: {v} is not a positive multiple of the model's downsampling factor {f}"
            )));
        }
        if v > max {
            return Err(WebError::BadRequest(format!(
                "{name}: {v} exceeds the server's limit of {max} pixels"
            )));
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct ExampleQuery {
    seed: Option<u64>,
    width: Option<usize>,
    height: Option<usize>,
}

async fn example(
    State(state): App,
    q: Result<Query<ExampleQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<serde_json::Value>, WebError> {
    let Query(q) = q.map_err(|e| WebError::BadRequest(format!("example: {e}")))?;
    if state.info.n_labels().is_none() {
        return Err(WebError::BadRequest(
            "this model does not take a label map".into(),
        ));
    }
    let (th, tw) = state.info.training_size;
    let (h, w) = (q.height.unwrap_or(th), q.width.unwrap_or(tw));
    check_size(&state, h, w)?;
    let seed = q.seed.unwrap_or(0);
    let map =
        tokio::task::spawn_blocking(move || state.info.example_labels(seed, w as u32, h as u32))
            .await
            .map_err(|e| WebError::Internal(format!("example: {e}")))?;
    Ok(labels_json(&map))
}

/// A parsed multipart form: files and text fields.
#[derive(Default)]
struct Form {
    files: HashMap<String, Bytes>,
    fields: HashMap<String, String>,
}

const FILE_FIELDS: &[&str] = &["labels", "image"];
const TEXT_FIELDS: &[&str] = &[
    "seed",
    "temperature",
    "top_k",
    "top_p",
    "height",
    "width",
    "class",
    "keep_rows",
];

fn multipart_error(e: MultipartError, limit: usize) -> WebError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        WebError::TooLarge(format!("the request is larger than {limit} bytes"))
    } else {
        WebError::BadRequest(format!("cannot read the form: {}", e.body_text()))
    }
}

async fn read_form(
    state: &AppState,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Form, WebError> {
    let limit = state.config.max_upload_bytes.saturating_mul(2) + (64 << 10);
    let mut mp = multipart.map_err(|e| {
        WebError::BadRequest(format!(
            "expected a multipart/form-data request: {}",
            e.body_text()
        ))
    })?;
    let mut form = Form::default();
    while let Some(field) = mp
        .next_field()
        .await
        .map_err(|e| multipart_error(e, limit))?
    {
        let name = field.name().unwrap_or("").to_string();
        if FILE_FIELDS.contains(&name.as_str()) {
            let bytes = field.bytes().await.map_err(|e| multipart_error(e, limit))?;
            form.files.insert(name, bytes);
        } else if TEXT_FIELDS.contains(&name.as_str()) {
            let text = field.text().await.map_err(|e| multipart_error(e, limit))?;
            form.fields.insert(name, text.trim().to_string());
        } else {
            return Err(WebError::BadRequest(format!(
                "unknown form field `{name}` (known: {}, {})",
                FILE_FIELDS.join(", "),
                TEXT_FIELDS.join(", ")
            )));
        }
    }
    Ok(form)
}

impl Form {
    /// A number field; None when absent or empty.
    fn num<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, WebError> {
        match self.fields.get(name).map(String::as_str) {
            None | Some("") => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| WebError::BadRequest(format!("{name}: `{v}` is not a valid number"))),
        }
    }
}

async fn check_labels(
    State(state): App,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<Json<serde_json::Value>, WebError> {
    let form = read_form(&state, multipart).await?;
    let n = state.info.n_labels().ok_or_else(|| {
        WebError::BadRequest("labels: this model does not take a label map".into())
    })?;
    let bytes = form
        .files
        .get("labels")
        .cloned()
        .ok_or_else(|| WebError::BadRequest("labels: no file uploaded".into()))?;
    let size = match (form.num::<usize>("height")?, form.num::<usize>("width")?) {
        (Some(h), Some(w)) => {
            check_size(&state, h, w)?;
            Some((h, w))
        }
        _ => None,
    };
    let lim = limits(&state);
    let map = tokio::task::spawn_blocking(move || -> Result<GrayImage, WebError> {
        let labels = upload::decode_labels("labels", &bytes, lim, n)?;
        Ok(match size {
            Some((h, w)) => image_io::fit(&labels, h as u32, w as u32, Interpolation::Nearest)?,
            None => labels,
        })
    })
    .await
    .map_err(|e| WebError::Internal(format!("labels: {e}")))??;
    Ok(labels_json(&map))
}

/// Validates a job form into the worker's inputs (this decodes and fits the uploads).
fn job_input(state: &AppState, form: &Form) -> Result<JobInput, WebError> {
    let info = &state.info;
    let (th, tw) = info.training_size;
    let h = form.num::<usize>("height")?.unwrap_or(th);
    let w = form.num::<usize>("width")?.unwrap_or(tw);
    check_size(state, h, w)?;
    let options = SamplingOptions {
        temperature: form.num("temperature")?.unwrap_or(1.0),
        top_k: form.num::<usize>("top_k")?.filter(|k| *k > 0),
        top_p: form.num("top_p")?,
        greedy: false,
        seed: form.num("seed")?.unwrap_or(0),
    };
    options.validate()?;
    let lim = limits(state);
    let labels =
        match (&info.task, form.files.get("labels")) {
            (Task::Labels { n_labels }, Some(bytes)) => {
                let labels = upload::decode_labels("labels", bytes, lim, *n_labels)?;
                // as `taming sample --segmentation` fits its label map
                Some(image_io::fit(
                    &labels,
                    h as u32,
                    w as u32,
                    Interpolation::Nearest,
                )?)
            }
            (Task::Labels { .. }, None) => return Err(WebError::BadRequest(
                "labels: this model needs a label map (form field `labels`, a PNG of label ids)"
                    .into(),
            )),
            (_, Some(_)) => {
                return Err(WebError::BadRequest(
                    "labels: this model does not take a label map".into(),
                ))
            }
            (_, None) => None,
        };
    let class = match &info.task {
        Task::Class { n_classes } => {
            let k: usize = form
                .num("class")?
                .ok_or_else(|| WebError::BadRequest("class: this model needs a class id".into()))?;
            if k >= *n_classes {
                return Err(WebError::BadRequest(format!(
                    "class: {k} is out of range: the model has {n_classes} classes (0..={})",
                    n_classes - 1
                )));
            }
            Some(k)
        }
        _ => None,
    };
    if let Task::Unsupported { describe } = &info.task {
        return Err(WebError::BadRequest(format!(
            "this model is conditioned on {describe}, which the web demo cannot provide; use \
             `taming sample`"
        )));
    }
    let complete = match form.files.get("image") {
        Some(bytes) => {
            let img = upload::decode_png("image", bytes, lim)?.to_rgb8();
            let img = image_io::fit(&img, h as u32, w as u32, Interpolation::Bicubic)?;
            let grid_h = h / info.factor;
            let keep = match form.num::<usize>("keep_rows")? {
                Some(n) if n > grid_h => {
                    return Err(WebError::BadRequest(format!(
                        "keep_rows: {n} is more than the {grid_h} latent rows of a {h}-pixel-high image"
                    )))
                }
                Some(n) => Keep::Rows(n),
                None => Keep::TopHalf,
            };
            Some((img, keep))
        }
        None => None,
    };
    Ok(JobInput {
        size: (h, w),
        labels,
        class,
        complete,
        options,
    })
}

async fn create_job(
    State(state): App,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<(StatusCode, Json<crate::Status>), WebError> {
    let form = read_form(&state, multipart).await?;
    let st = state.clone();
    let (input, form) = tokio::task::spawn_blocking(move || {
        let input = job_input(&st, &form);
        (input, form)
    })
    .await
    .map_err(|e| WebError::Internal(format!("job: {e}")))?;
    let input = input?;
    let submitted = form.files.get("labels").map(|b| b.to_vec());
    let job = state.jobs.create(input, submitted);
    if let Err(busy) = state.queue.push(job.clone()) {
        state.jobs.forget(&job.id);
        return Err(WebError::Busy(format!(
            "the server is busy: {} job(s) are waiting, the queue holds {}; try again in a moment",
            busy.waiting, state.config.queue
        )));
    }
    tracing::info!("job {} queued", job.id);
    Ok((StatusCode::ACCEPTED, Json(job.status())))
}

fn find_job(state: &AppState, id: &str) -> Result<Arc<Job>, WebError> {
    state
        .jobs
        .get(id)
        .ok_or_else(|| WebError::NotFound(format!("no job `{id}` (it may have been forgotten)")))
}

async fn job_status(
    State(state): App,
    Path(id): Path<String>,
) -> Result<Json<crate::Status>, WebError> {
    Ok(Json(find_job(&state, &id)?.status()))
}

async fn job_events(State(state): App, Path(id): Path<String>) -> Result<Response, WebError> {
    let job = find_job(&state, &id)?;
    let mut rx = job.subscribe();
    let mut shutdown = state.shutdown_signal();
    let (tx, out) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let status = rx.borrow_and_update().clone();
            let last = status.state.is_final();
            let ev = Event::default()
                .event("status")
                .json_data(&status)
                .unwrap_or_else(|e| Event::default().event("error").data(e.to_string()));
            if tx.send(Ok(ev)).await.is_err() || last {
                break;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { break },
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
    });
    let stream: ReceiverStream<Result<Event, Infallible>> = ReceiverStream::new(out);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn cancel_job(
    State(state): App,
    Path(id): Path<String>,
) -> Result<Json<crate::Status>, WebError> {
    let job = find_job(&state, &id)?;
    job.cancel();
    if state.queue.remove(&id) {
        // it never reached a worker
        job.cancel_waiting();
    }
    Ok(Json(job.status()))
}

async fn job_result(State(state): App, Path(id): Path<String>) -> Result<Response, WebError> {
    let job = find_job(&state, &id)?;
    let png = job.result().ok_or_else(|| {
        WebError::Conflict(format!(
            "job `{id}` has no result: it is {:?}",
            job.status().state
        ))
    })?;
    Ok(png_response(png.to_vec(), &format!("taming-{id}.png")))
}

async fn job_labels(State(state): App, Path(id): Path<String>) -> Result<Response, WebError> {
    let job = find_job(&state, &id)?;
    let png = job
        .submitted_labels
        .clone()
        .ok_or_else(|| WebError::NotFound(format!("job `{id}` had no label map")))?;
    Ok(png_response(png, &format!("labels-{id}.png")))
}
