//! Sampling jobs: a bounded queue in front of a pool of worker threads that run
//! [`taming::pipeline::sample`], publish progress and partial decodes (previews) through a
//! `watch` channel per job, and keep the finished PNG.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine;
use candle_core::{Device, Tensor};
use image::{DynamicImage, GrayImage, RgbImage};
use serde::Serialize;
use taming::cond_stage::coordinate_map;
use taming::cond_transformer::Net2NetTransformer;
use taming::image_io::{self, LabelShift};
use taming::pipeline::{self, Condition, Keep, PipelineProgress, SampleRequest};
use taming::sampling::{Control, SamplingOptions};
use tokio::sync::watch;

use crate::model_info::{ModelInfo, Task};
use crate::upload::encode_png;
use crate::WebError;

/// Locks a mutex, recovering the data when another thread panicked while holding it (the job
/// data stays consistent: every update is a single assignment).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl State {
    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        matches!(self, State::Done | State::Failed | State::Cancelled)
    }
}

/// A job's status as the page sees it (JSON; also every server-sent event).
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub id: String,
    pub state: State,
    /// Place in the queue (1 = next), 0 when not waiting.
    pub position: usize,
    /// Tokens sampled so far, of `total`.
    pub done: usize,
    pub total: usize,
    /// Output size (H, W) in pixels.
    pub size: (usize, usize),
    /// The error (failed) or a note.
    pub message: Option<String>,
    /// The latest partial decode, as a PNG data URL (running jobs only).
    pub preview: Option<String>,
    /// Whether the sliding window is used.
    pub sliding: bool,
    /// Seconds since the job started running.
    pub seconds: f64,
}

/// The validated inputs of a job.
#[derive(Debug, Clone)]
pub struct JobInput {
    /// Output size (H, W) in pixels.
    pub size: (usize, usize),
    /// The label map, already fitted to `size` (label-map models).
    pub labels: Option<GrayImage>,
    /// The class (class-conditional models).
    pub class: Option<usize>,
    /// Image completion: the image fitted to `size` and the part to keep.
    pub complete: Option<(RgbImage, Keep)>,
    pub options: SamplingOptions,
}

/// One sampling job.
pub struct Job {
    pub id: String,
    input: Mutex<Option<JobInput>>,
    /// The label map PNG as the page submitted it.
    pub submitted_labels: Option<Vec<u8>>,
    cancel: AtomicBool,
    status: watch::Sender<Status>,
    result: Mutex<Option<Arc<Vec<u8>>>>,
}

impl Job {
    fn new(id: String, input: JobInput, submitted_labels: Option<Vec<u8>>) -> Self {
        let status = Status {
            id: id.clone(),
            state: State::Queued,
            position: 0,
            done: 0,
            total: 0,
            size: input.size,
            message: None,
            preview: None,
            sliding: false,
            seconds: 0.0,
        };
        Job {
            id,
            input: Mutex::new(Some(input)),
            submitted_labels,
            cancel: AtomicBool::new(false),
            status: watch::Sender::new(status),
            result: Mutex::new(None),
        }
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// A receiver of status updates.
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// Asks the job to stop (at the next token when running).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    fn update(&self, f: impl FnOnce(&mut Status)) {
        self.status.send_modify(f);
    }

    fn finish(&self, state: State, message: Option<String>) {
        self.update(|s| {
            s.state = state;
            s.position = 0;
            s.preview = None;
            s.message = message;
        });
    }

    /// Marks a job that was removed from the queue before it ran as cancelled.
    pub fn cancel_waiting(&self) {
        self.finish(State::Cancelled, None);
    }

    /// The finished PNG, if any.
    pub fn result(&self) -> Option<Arc<Vec<u8>>> {
        lock(&self.result).clone()
    }
}

/// The queue is full.
#[derive(Debug)]
pub struct Busy {
    pub waiting: usize,
}

struct QueueInner {
    jobs: VecDeque<Arc<Job>>,
    closed: bool,
}

/// A bounded FIFO of waiting jobs.
pub struct Queue {
    inner: Mutex<QueueInner>,
    cv: Condvar,
    capacity: usize,
}

impl Queue {
    pub fn new(capacity: usize) -> Self {
        Queue {
            inner: Mutex::new(QueueInner {
                jobs: VecDeque::new(),
                closed: false,
            }),
            cv: Condvar::new(),
            capacity,
        }
    }

    fn renumber(inner: &QueueInner) {
        for (i, j) in inner.jobs.iter().enumerate() {
            j.update(|s| s.position = i + 1);
        }
    }

    /// Appends a job, or says the queue is full (or closed).
    pub fn push(&self, job: Arc<Job>) -> Result<(), Busy> {
        let mut q = lock(&self.inner);
        if q.closed || q.jobs.len() >= self.capacity {
            return Err(Busy {
                waiting: q.jobs.len(),
            });
        }
        q.jobs.push_back(job);
        Self::renumber(&q);
        drop(q);
        self.cv.notify_one();
        Ok(())
    }

    /// The next job; blocks while the queue is empty; None once closed.
    pub fn pop(&self) -> Option<Arc<Job>> {
        let mut q = lock(&self.inner);
        loop {
            if q.closed {
                return None;
            }
            if let Some(j) = q.jobs.pop_front() {
                Self::renumber(&q);
                return Some(j);
            }
            q = self.cv.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Removes a waiting job (cancelled before it started); false when it is not waiting.
    pub fn remove(&self, id: &str) -> bool {
        let mut q = lock(&self.inner);
        let before = q.jobs.len();
        q.jobs.retain(|j| j.id != id);
        let removed = q.jobs.len() != before;
        Self::renumber(&q);
        removed
    }

    /// Number of waiting jobs.
    pub fn len(&self) -> usize {
        lock(&self.inner).jobs.len()
    }

    /// Whether no job is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Refuses new jobs and wakes the workers so that they exit; returns the jobs that waited.
    pub fn close(&self) -> Vec<Arc<Job>> {
        let mut q = lock(&self.inner);
        q.closed = true;
        let left = q.jobs.drain(..).collect();
        drop(q);
        self.cv.notify_all();
        left
    }
}

/// Jobs by id, and their ids oldest first.
#[derive(Default)]
struct JobTable {
    map: HashMap<String, Arc<Job>>,
    order: VecDeque<String>,
}

/// All jobs the server knows (running, waiting and the latest finished ones).
pub struct Registry {
    jobs: Mutex<JobTable>,
    keep: usize,
    counter: AtomicU64,
    hasher: RandomState,
}

impl Registry {
    pub fn new(keep: usize) -> Self {
        Registry {
            jobs: Mutex::new(JobTable::default()),
            keep: keep.max(1),
            counter: AtomicU64::new(0),
            hasher: RandomState::new(),
        }
    }

    /// A new, hard-to-guess job id.
    pub fn new_id(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::SeqCst);
        let mut h = self.hasher.build_hasher();
        h.write_u64(n);
        format!("{:016x}{:04x}", h.finish(), n & 0xffff)
    }

    /// Makes a job and remembers it, forgetting the oldest finished jobs beyond `keep`.
    pub fn create(&self, input: JobInput, submitted_labels: Option<Vec<u8>>) -> Arc<Job> {
        let job = Arc::new(Job::new(self.new_id(), input, submitted_labels));
        let mut g = lock(&self.jobs);
        let JobTable { map, order } = &mut *g;
        map.insert(job.id.clone(), job.clone());
        order.push_back(job.id.clone());
        while order.len() > self.keep {
            let Some(pos) = order.iter().position(|id| {
                map.get(id)
                    .is_none_or(|j| j.status.borrow().state.is_final())
            }) else {
                break;
            };
            if let Some(id) = order.remove(pos) {
                map.remove(&id);
            }
        }
        job
    }

    /// Forgets a job (its submission was refused).
    pub fn forget(&self, id: &str) {
        let mut g = lock(&self.jobs);
        g.map.remove(id);
        g.order.retain(|i| i != id);
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        lock(&self.jobs).map.get(id).cloned()
    }

    /// Cancels every job.
    pub fn cancel_all(&self) {
        for j in lock(&self.jobs).map.values() {
            j.cancel();
        }
    }
}

/// What a worker needs.
pub struct WorkerContext {
    pub model: Arc<Net2NetTransformer>,
    pub info: ModelInfo,
    pub queue: Arc<Queue>,
    /// Least time between two previews (it grows when decoding is slow).
    pub preview_interval: Duration,
}

/// A worker: runs jobs until the queue is closed.
pub fn worker_loop(ctx: &WorkerContext) {
    while let Some(job) = ctx.queue.pop() {
        if job.cancelled() {
            job.finish(State::Cancelled, None);
            continue;
        }
        let started = Instant::now();
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_job(ctx, &job, started)));
        let seconds = started.elapsed().as_secs_f64();
        job.update(|s| s.seconds = seconds);
        match outcome {
            Ok(Ok(true)) => {
                tracing::info!("job {} done in {seconds:.1} s", job.id);
                job.finish(State::Done, None)
            }
            Ok(Ok(false)) => job.finish(State::Cancelled, None),
            Ok(Err(e)) => {
                tracing::warn!("job {} failed: {e}", job.id);
                job.finish(State::Failed, Some(e.to_string()));
            }
            Err(_) => {
                tracing::error!("job {} panicked", job.id);
                job.finish(
                    State::Failed,
                    Some("internal error while sampling (see the server log)".into()),
                );
            }
        }
    }
}

/// The model's device.
pub fn model_device(model: &Net2NetTransformer) -> Device {
    model.first_stage().quant_conv().weight().device().clone()
}

/// The pipeline request of a job's inputs: the same tensors `taming sample` builds from
/// `--segmentation` / `--class` / `--coord` / `--complete` (label maps and images are already
/// fitted to the output size, as `taming sample` fits them).
pub fn sample_request(
    model: &Net2NetTransformer,
    task: &Task,
    input: &JobInput,
) -> Result<SampleRequest, WebError> {
    let device = model_device(model);
    let (h, w) = input.size;
    let condition = match task {
        Task::Labels { n_labels } => {
            let labels = input.labels.as_ref().ok_or_else(|| {
                WebError::BadRequest("labels: this model needs a label map".into())
            })?;
            let (_, onehot) = image_io::labels_to_onehot(
                labels,
                *n_labels,
                LabelShift::None,
                Path::new("labels"),
                &device,
            )?;
            Condition::Spatial(onehot)
        }
        Task::Class { .. } => Condition::Class(
            input
                .class
                .ok_or_else(|| WebError::BadRequest("class: this model needs a class".into()))?,
        ),
        Task::Unconditional => Condition::None,
        Task::Coord => Condition::Spatial(coordinate_map(h, w, &device)?),
        Task::Unsupported { describe } => {
            return Err(WebError::BadRequest(format!(
                "this model is conditioned on {describe}, which the web demo cannot provide; use \
                 `taming sample`"
            )))
        }
    };
    let complete = match &input.complete {
        Some((img, keep)) => Some((image_io::rgb_to_tensor(img, &device)?, keep.clone())),
        None => None,
    };
    Ok(SampleRequest {
        condition,
        size: input.size,
        complete,
        batch: 1,
        options: input.options.clone(),
    })
}

/// Decodes the tokens so far; positions not yet sampled are greyed out when known.
fn preview(
    model: &Net2NetTransformer,
    p: &PipelineProgress,
    grey_from: Option<usize>,
) -> Result<String, WebError> {
    let (gh, gw) = p.grid;
    let row = p.raster.first().cloned().unwrap_or_default();
    let t = Tensor::from_vec(row, (1, gh * gw), &model_device(model))?;
    let img = model.first_stage().decode_indices(&t, p.grid)?;
    let mut rgb = image_io::tensor_to_rgb(&img.get(0)?)?;
    if let Some(from) = grey_from {
        let (fh, fw) = (rgb.height() as usize / gh, rgb.width() as usize / gw);
        for pos in from..gh * gw {
            let (gi, gj) = (pos / gw, pos % gw);
            for y in gi * fh..(gi + 1) * fh {
                for x in gj * fw..(gj + 1) * fw {
                    let px = rgb.get_pixel_mut(x as u32, y as u32);
                    let v = (px.0[0] as u16 + px.0[1] as u16 + px.0[2] as u16) / 3;
                    let g = (v / 4 + 96) as u8;
                    px.0 = [g, g, g];
                }
            }
        }
    }
    let png = encode_png(&DynamicImage::ImageRgb8(rgb))?;
    Ok(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    ))
}

/// Runs one job; Ok(false) when cancelled.
fn run_job(ctx: &WorkerContext, job: &Job, started: Instant) -> Result<bool, WebError> {
    let input = lock(&job.input)
        .take()
        .ok_or_else(|| WebError::Internal("the job has no inputs".into()))?;
    let model = &*ctx.model;
    let req = sample_request(model, &ctx.info.task, &input)?;
    req.options.validate()?;
    let grid = pipeline::latent_grid(model, req.size)?;
    let (th, tw) = model.training_grid();
    let sliding_guess = grid.0 > th || grid.1 > tw;
    job.update(|s| {
        s.state = State::Running;
        s.position = 0;
        s.total = grid.0 * grid.1;
        s.sliding = sliding_guess;
    });
    // in raster order (no permuter, nothing kept) the first `done` positions are the known ones
    let raster_order = input.complete.is_none() && model.permuter().is_identity();
    let mut last_preview = Instant::now();
    let mut interval = ctx.preview_interval;
    let mut preview_failed = false;
    let out = pipeline::sample(model, &req, &mut |p| {
        if job.cancelled() {
            return Control::Cancel;
        }
        let now = Instant::now();
        let want_preview = !preview_failed && now.duration_since(last_preview) >= interval;
        let image = if want_preview && p.done < p.total {
            let t0 = Instant::now();
            let r = preview(model, p, raster_order.then_some(p.done));
            // previews take at most about a third of the time
            interval = ctx.preview_interval.max(t0.elapsed() * 2);
            last_preview = Instant::now();
            match r {
                Ok(url) => Some(url),
                Err(e) => {
                    tracing::warn!("job {}: cannot decode a preview: {e}", job.id);
                    preview_failed = true;
                    None
                }
            }
        } else {
            None
        };
        let seconds = started.elapsed().as_secs_f64();
        if image.is_some() || p.done == p.total || p.done % 16 == 0 {
            job.update(|s| {
                s.done = p.done;
                s.total = p.total;
                s.seconds = seconds;
                if image.is_some() {
                    s.preview = image;
                }
            });
        }
        Control::Continue
    })?;
    if out.cancelled {
        return Ok(false);
    }
    let images = out
        .images
        .ok_or_else(|| WebError::Internal("sampling returned no image".into()))?;
    let rgb = image_io::tensor_to_rgb(&images.get(0)?)?;
    let png = encode_png(&DynamicImage::ImageRgb8(rgb))?;
    *lock(&job.result) = Some(Arc::new(png));
    job.update(|s| {
        s.done = s.total;
        s.sliding = out.sliding;
    });
    Ok(true)
}
