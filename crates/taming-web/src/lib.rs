//! The interactive web demo of taming-rs, served by `taming serve`.
//!
//! A single page (HTML, JavaScript and CSS embedded in the binary: nothing is read from disk but
//! the model's own files) lets a person paint a label map with the model's palette (or upload one,
//! or start from an example), choose the seed, temperature, top-k, top-p and output size, press
//! Sample and watch the image build up: the server streams progress and partial decodes as
//! server-sent events. Jobs can be cancelled; the result downloads as PNG. Image completion keeps
//! the top rows of an uploaded image and samples the rest. Models that are not label-to-image
//! (class-conditional, unconditional, coordinate-conditioned) get the same page without the
//! painting tools.
//!
//! Sampling runs on a pool of worker threads ([`jobs`]) behind a bounded queue: when it is full,
//! new jobs are refused with HTTP 503 and a JSON message. Uploads are checked ([`upload`]): PNG
//! only, a size and a pixel limit, label ids below the model's label count.
//!
//! HTTP API (all errors are JSON `{"error": "..."}`):
//! - `GET /`, `/app.js`, `/style.css`: the page;
//! - `GET /api/info`: the model (task, palette, sizes) and the limits;
//! - `GET /api/example?seed=&width=&height=`: an example label map (JSON, ids in base64);
//! - `POST /api/labels` (multipart `labels` PNG, `width`, `height`): a checked label map, fitted
//!   to the size as `taming sample --segmentation` fits it (JSON, ids in base64);
//! - `POST /api/jobs` (multipart: `labels` PNG, `image` PNG to complete, `keep_rows`, `class`,
//!   `seed`, `temperature`, `top_k`, `top_p`, `height`, `width`): 202 with the job's status;
//! - `GET /api/jobs/{id}`: status; `GET /api/jobs/{id}/events`: status as server-sent events
//!   until the job ends; `POST /api/jobs/{id}/cancel`;
//! - `GET /api/jobs/{id}/result.png`, `GET /api/jobs/{id}/labels.png` (the label map as
//!   submitted).

pub mod api;
pub mod jobs;
pub mod model_info;
pub mod upload;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use taming::cond_transformer::Net2NetTransformer;
use tokio::sync::watch;

pub use jobs::{JobInput, State, Status};
pub use model_info::{ModelInfo, Task};

/// Errors of the web demo; each becomes an HTTP status and a JSON message.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    /// The request or an upload is invalid (400).
    #[error("{0}")]
    BadRequest(String),
    /// The request body exceeds the limit (413).
    #[error("{0}")]
    TooLarge(String),
    /// The queue is full (503).
    #[error("{0}")]
    Busy(String),
    /// No such job or page (404).
    #[error("{0}")]
    NotFound(String),
    /// The job is not in a state that allows this (409).
    #[error("{0}")]
    Conflict(String),
    /// A failure of the server (500).
    #[error("{0}")]
    Internal(String),
    /// The server cannot start (bad configuration, address in use, unreadable labels.txt).
    #[error("{0}")]
    Setup(String),
}

impl WebError {
    pub fn status(&self) -> StatusCode {
        match self {
            WebError::BadRequest(_) => StatusCode::BAD_REQUEST,
            WebError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            WebError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            WebError::NotFound(_) => StatusCode::NOT_FOUND,
            WebError::Conflict(_) => StatusCode::CONFLICT,
            WebError::Internal(_) | WebError::Setup(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<taming::Error> for WebError {
    fn from(e: taming::Error) -> Self {
        match e {
            taming::Error::Invalid(_) | taming::Error::Image { .. } => {
                WebError::BadRequest(e.to_string())
            }
            other => WebError::Internal(other.to_string()),
        }
    }
}

impl From<candle_core::Error> for WebError {
    fn from(e: candle_core::Error) -> Self {
        WebError::Internal(e.to_string())
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!("{self}");
        }
        (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response()
    }
}

/// Settings of the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on (127.0.0.1 by default: loopback only).
    pub host: String,
    /// Port (0: any free port).
    pub port: u16,
    /// Sampling threads. 0 starts none: jobs wait forever (for tests of the queue).
    pub workers: usize,
    /// Jobs that may wait for a worker; more are refused with 503.
    pub queue: usize,
    /// Largest upload, in bytes.
    pub max_upload_bytes: usize,
    /// Largest upload width and height, in pixels.
    pub max_upload_side: u32,
    /// Largest output height and width, in pixels.
    pub max_output_side: usize,
    /// Least time between two partial decodes of a running job.
    pub preview_interval: Duration,
    /// Finished jobs kept for download (the oldest are forgotten).
    pub keep_jobs: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            workers: 1,
            queue: 4,
            max_upload_bytes: 4 << 20,
            max_upload_side: 2048,
            max_output_side: 512,
            preview_interval: Duration::from_millis(300),
            keep_jobs: 64,
        }
    }
}

/// Shared state of the handlers.
pub struct AppState {
    pub model: Arc<Net2NetTransformer>,
    pub info: ModelInfo,
    pub config: ServerConfig,
    pub queue: Arc<jobs::Queue>,
    pub jobs: jobs::Registry,
    shutdown: watch::Sender<bool>,
}

impl AppState {
    /// A receiver that changes when the server shuts down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Stops taking jobs, cancels all, ends the event streams.
    pub fn begin_shutdown(&self) {
        self.shutdown.send_replace(true);
        for j in self.queue.close() {
            j.cancel();
        }
        self.jobs.cancel_all();
    }
}

/// The demo server: shared state and worker threads.
pub struct Server {
    state: Arc<AppState>,
    workers: Vec<JoinHandle<()>>,
}

impl Server {
    /// Starts the worker threads for `model`.
    pub fn new(
        model: Net2NetTransformer,
        info: ModelInfo,
        config: ServerConfig,
    ) -> Result<Self, WebError> {
        if config.max_output_side < info.factor {
            return Err(WebError::Setup(format!(
                "max output size {} is smaller than the model's downsampling factor {}",
                config.max_output_side, info.factor
            )));
        }
        if config.queue == 0 {
            return Err(WebError::Setup(
                "the queue must hold at least one job".into(),
            ));
        }
        let model = Arc::new(model);
        let queue = Arc::new(jobs::Queue::new(config.queue));
        let keep = config.keep_jobs.max(config.queue + config.workers + 8);
        let state = Arc::new(AppState {
            model: model.clone(),
            info: info.clone(),
            config: config.clone(),
            queue: queue.clone(),
            jobs: jobs::Registry::new(keep),
            shutdown: watch::Sender::new(false),
        });
        let ctx = Arc::new(jobs::WorkerContext {
            model,
            info,
            queue,
            preview_interval: config.preview_interval,
        });
        let mut workers = Vec::new();
        for i in 0..config.workers {
            let ctx = ctx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("taming-web-worker-{i}"))
                .spawn(move || jobs::worker_loop(&ctx))
                .map_err(|e| WebError::Setup(format!("cannot start a worker thread: {e}")))?;
            workers.push(handle);
        }
        Ok(Server { state, workers })
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// The HTTP routes.
    pub fn router(&self) -> Router {
        api::router(self.state.clone())
    }

    /// Serves on `listener` until `signal` completes, then shuts down: open event streams end,
    /// jobs are cancelled; connections get a few seconds to finish.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), WebError> {
        let state = self.state.clone();
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let graceful = axum::serve(listener, self.router()).with_graceful_shutdown(async move {
            signal.await;
            state.begin_shutdown();
            stop_tx.send_replace(true);
        });
        let deadline = async move {
            let _ = stop_rx.wait_for(|s| *s).await;
            tokio::time::sleep(Duration::from_secs(3)).await;
        };
        tokio::select! {
            r = graceful => r.map_err(|e| WebError::Internal(format!("server error: {e}"))),
            _ = deadline => {
                tracing::info!("closing the connections still open");
                Ok(())
            }
        }
    }

    /// Stops the workers (cancelling the running jobs) and waits for them.
    pub fn shutdown(mut self) {
        self.stop();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }

    fn stop(&self) {
        self.state.begin_shutdown();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs the demo until Ctrl-C: binds `config.host:config.port`, prints the address, serves.
pub fn run(
    model: Net2NetTransformer,
    info: ModelInfo,
    config: ServerConfig,
) -> Result<(), WebError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| WebError::Setup(format!("cannot start the async runtime: {e}")))?;
    let addr = format!("{}:{}", config.host, config.port);
    let server = Server::new(model, info, config)?;
    let result = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| WebError::Setup(format!("cannot listen on {addr}: {e}")))?;
        let local: SocketAddr = listener
            .local_addr()
            .map_err(|e| WebError::Setup(format!("cannot listen on {addr}: {e}")))?;
        println!("taming serve: open http://{local}/ (Ctrl-C stops)");
        server
            .serve(listener, async {
                if let Err(e) = tokio::signal::ctrl_c().await {
                    tracing::warn!("cannot wait for Ctrl-C: {e}");
                    std::future::pending::<()>().await;
                }
                eprintln!("stopping...");
            })
            .await
    });
    // cancels the jobs without waiting for the workers: a job still encoding its condition
    // would hold the exit up, and the process ends with this function's caller anyway
    drop(server);
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}
