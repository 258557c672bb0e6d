//! Batching: torch's `DataLoader` as `main.py`'s `DataModuleFromConfig` configures it
//! (`shuffle=True` for training, `batch_size`, `num_workers`, `drop_last=False`), with
//! `taming/data/utils.py`'s `custom_collate` stacking the examples.
//!
//! Unlike torch, everything random is a pure function of (seed, epoch, example index): the
//! epoch's permutation comes from a generator keyed by (seed, epoch), each example's crop and flip
//! from one keyed by (seed, epoch, example index). So batch `b` of epoch `e` is the same whichever
//! thread decodes it and whether or not the epoch started at batch 0, which is what resuming a
//! run in the middle of an epoch relies on; the batches before `start` are not decoded.
//!
//! Workers (threads) each build whole batches, as torch's do; at most `2 * workers` batches are
//! decoded ahead of the consumer (torch's `prefetch_factor = 2`), and batches are yielded in
//! order. A corrupt or unreadable file is reported once (`tracing::warn!`), counted, and its
//! example left out of the batch; a batch left empty is skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use candle_core::Device;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::dataset::{collate, Dataset, LoadError};
use crate::train::{Batch, BatchSource};
use crate::{Error, Result};

/// Stream tags keying the generators (so the permutation and the augmentations never share one).
const STREAM_SHUFFLE: u64 = 0x7368_7566_666c_6500; // "shuffle"
const STREAM_AUGMENT: u64 = 0x6175_676d_656e_7400; // "augment"
/// Separates these generators from the training step's (`train::step_rng`).
const DOMAIN: u64 = 0x7461_6d69_6e67_6461; // "tamingda"

fn keyed_rng(seed: u64, epoch: u64, index: u64, stream: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    key[16..24].copy_from_slice(&index.to_le_bytes());
    key[24..].copy_from_slice(&(stream ^ DOMAIN).to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Files left out so far (each reported once).
#[derive(Debug, Default)]
struct SkipLog {
    files: Mutex<BTreeSet<PathBuf>>,
}

impl SkipLog {
    fn record(&self, path: PathBuf, reason: &str) {
        let first = lock(&self.files).insert(path.clone());
        if first {
            tracing::warn!("skipping unreadable {}: {reason}", path.display());
        } else {
            tracing::debug!("skipping unreadable {} again: {reason}", path.display());
        }
    }
}

/// Batches of one dataset split, in a seeded order.
#[derive(Debug, Clone)]
pub struct Loader {
    dataset: Arc<Dataset>,
    batch_size: usize,
    workers: usize,
    shuffle: bool,
    seed: u64,
    skips: Arc<SkipLog>,
}

/// The workers' and the consumer's shared state.
#[derive(Default)]
struct PoolState {
    /// Next batch index a worker may take.
    next_claim: usize,
    /// Next batch index the consumer yields.
    next_yield: usize,
    ready: BTreeMap<usize, Result<Option<Batch>>>,
    cancelled: bool,
}

struct Pool {
    shared: Arc<(Mutex<PoolState>, Condvar)>,
    threads: Vec<JoinHandle<()>>,
}

/// The batches of one epoch from a start index, in order (CPU tensors).
pub struct Batches {
    loader: Loader,
    epoch: u64,
    next: usize,
    end: usize,
    pool: Option<Pool>,
    done: bool,
}

impl Loader {
    /// A loader over `dataset`; `num_workers` is capped at the available cores (0: decode on the
    /// consuming thread, no prefetch).
    pub fn new(
        dataset: Arc<Dataset>,
        batch_size: usize,
        num_workers: usize,
        shuffle: bool,
        seed: u64,
    ) -> Result<Self> {
        if batch_size == 0 {
            return Err(Error::invalid("batch_size must be at least 1"));
        }
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Ok(Self {
            dataset,
            batch_size,
            workers: num_workers.min(cores),
            shuffle,
            seed,
            skips: Arc::new(SkipLog::default()),
        })
    }

    /// The same loader with exactly `n` worker threads (not capped; 0 decodes inline). The
    /// batches do not depend on it.
    pub fn with_workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    pub fn num_workers(&self) -> usize {
        self.workers
    }

    pub fn shuffle(&self) -> bool {
        self.shuffle
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.dataset.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dataset.is_empty()
    }

    /// `ceil(len / batch_size)` (the last batch may be smaller).
    pub fn batches_per_epoch(&self) -> usize {
        self.len().div_ceil(self.batch_size)
    }

    /// Example indices of `epoch` in order: a seeded permutation when shuffling.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        if self.shuffle {
            order.shuffle(&mut keyed_rng(self.seed, epoch, 0, STREAM_SHUFFLE));
        }
        order
    }

    /// Example indices of batch `index` of `epoch` (empty past the end).
    pub fn batch_indices(&self, epoch: u64, index: usize) -> Vec<usize> {
        let order = self.order(epoch);
        let lo = index.saturating_mul(self.batch_size).min(order.len());
        let hi = lo.saturating_add(self.batch_size).min(order.len());
        order[lo..hi].to_vec()
    }

    /// Distinct files left out so far (corrupt or unreadable).
    pub fn skipped(&self) -> usize {
        lock(&self.skips.files).len()
    }

    /// The files left out so far.
    pub fn skipped_files(&self) -> Vec<PathBuf> {
        lock(&self.skips.files).iter().cloned().collect()
    }

    /// Decodes the examples `indices` of `epoch` into a batch (None when all were left out).
    fn build(&self, epoch: u64, indices: &[usize]) -> Result<Option<Batch>> {
        let mut samples = Vec::with_capacity(indices.len());
        for &i in indices {
            let mut rng = keyed_rng(self.seed, epoch, i as u64, STREAM_AUGMENT);
            let loaded = catch_unwind(AssertUnwindSafe(|| self.dataset.load(i, &mut rng)));
            match loaded {
                Ok(Ok(s)) => samples.push(s),
                Ok(Err(LoadError::Unreadable { path, reason })) => self.skips.record(path, &reason),
                Ok(Err(LoadError::Fatal(e))) => return Err(e),
                Err(_) => {
                    let path = self
                        .dataset
                        .example(i)
                        .map(|e| e.image.clone())
                        .unwrap_or_default();
                    self.skips.record(path, "the decoder panicked");
                }
            }
        }
        if samples.is_empty() {
            return Ok(None);
        }
        collate(&samples, self.dataset.kind()).map(Some)
    }

    /// Batch `index` of `epoch`, decoded on this thread (None when all its examples were left
    /// out or `index` is past the end).
    pub fn batch(&self, epoch: u64, index: usize) -> Result<Option<Batch>> {
        self.build(epoch, &self.batch_indices(epoch, index))
    }

    /// The batches of `epoch` from batch `start` on (CPU tensors), decoded ahead on the workers.
    pub fn epoch(&self, epoch: u64, start: usize) -> Batches {
        let end = self.batches_per_epoch();
        let start = start.min(end);
        let workers = self.workers.min(end - start);
        let pool = (workers > 0).then(|| self.spawn(epoch, start, end, workers));
        Batches {
            loader: self.clone(),
            epoch,
            next: start,
            end,
            pool,
            done: false,
        }
    }

    fn spawn(&self, epoch: u64, start: usize, end: usize, workers: usize) -> Pool {
        let state = PoolState {
            next_claim: start,
            next_yield: start,
            ..PoolState::default()
        };
        let shared = Arc::new((Mutex::new(state), Condvar::new()));
        let window = 2 * workers;
        let order = Arc::new(self.order(epoch));
        let threads = (0..workers)
            .map(|_| {
                let (loader, shared, order) = (self.clone(), shared.clone(), order.clone());
                std::thread::spawn(move || loader.work(epoch, end, window, &order, &shared))
            })
            .collect();
        Pool { shared, threads }
    }

    fn work(
        &self,
        epoch: u64,
        end: usize,
        window: usize,
        order: &[usize],
        shared: &(Mutex<PoolState>, Condvar),
    ) {
        let (m, cv) = shared;
        loop {
            let b = {
                let mut st = lock(m);
                loop {
                    if st.cancelled || st.next_claim >= end {
                        return;
                    }
                    if st.next_claim < st.next_yield + window {
                        break;
                    }
                    st = cv.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                st.next_claim += 1;
                st.next_claim - 1
            };
            let lo = (b * self.batch_size).min(order.len());
            let hi = (lo + self.batch_size).min(order.len());
            let result = catch_unwind(AssertUnwindSafe(|| self.build(epoch, &order[lo..hi])))
                .unwrap_or_else(|_| {
                    Err(Error::invalid(format!(
                        "a data worker panicked on batch {b} of epoch {epoch}"
                    )))
                });
            let mut st = lock(m);
            if st.cancelled {
                return;
            }
            st.ready.insert(b, result);
            cv.notify_all();
        }
    }
}

impl Iterator for Batches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done && self.next < self.end {
            let b = self.next;
            self.next += 1;
            let result = match &self.pool {
                None => self.loader.batch(self.epoch, b),
                Some(pool) => {
                    let (m, cv) = &*pool.shared;
                    let mut st = lock(m);
                    let r = loop {
                        if let Some(r) = st.ready.remove(&b) {
                            break r;
                        }
                        st = cv.wait(st).unwrap_or_else(|e| e.into_inner());
                    };
                    st.next_yield = b + 1;
                    cv.notify_all();
                    r
                }
            };
            match result {
                Ok(Some(batch)) => return Some(Ok(batch)),
                Ok(None) => {
                    tracing::warn!(
                        "batch {b} of epoch {} is empty (all its images were unreadable): skipped",
                        self.epoch
                    );
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        None
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            {
                let (m, cv) = &*pool.shared;
                lock(m).cancelled = true;
                cv.notify_all();
            }
            for t in pool.threads {
                // A worker only ends by returning (panics are caught), so joining cannot fail
                // in a way worth reporting.
                let _ = t.join();
            }
        }
    }
}

/// A [`Loader`] feeding the training loop: batches moved to `device`.
pub struct LoaderSource {
    loader: Loader,
    device: Device,
}

impl LoaderSource {
    pub fn new(loader: Loader, device: Device) -> Self {
        Self { loader, device }
    }

    /// Distinct files left out so far (corrupt or unreadable).
    pub fn skipped(&self) -> usize {
        self.loader.skipped()
    }

    pub fn loader(&self) -> &Loader {
        &self.loader
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}

impl BatchSource for LoaderSource {
    fn batches_per_epoch(&self) -> usize {
        self.loader.batches_per_epoch()
    }

    fn epoch(&self, epoch: u64, start: usize) -> Box<dyn Iterator<Item = Result<Batch>> + '_> {
        let device = self.device.clone();
        Box::new(self.loader.epoch(epoch, start).map(move |batch| {
            batch?
                .into_iter()
                .map(|(k, t)| Ok((k, t.to_device(&device)?)))
                .collect::<Result<Batch>>()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_rngs_differ_by_every_key() {
        use rand::Rng;
        let draw = |s, e, i, t| keyed_rng(s, e, i, t).random::<u64>();
        let base = draw(1, 2, 3, STREAM_AUGMENT);
        assert_eq!(base, draw(1, 2, 3, STREAM_AUGMENT));
        for other in [
            draw(0, 2, 3, STREAM_AUGMENT),
            draw(1, 0, 3, STREAM_AUGMENT),
            draw(1, 2, 0, STREAM_AUGMENT),
            draw(1, 2, 3, STREAM_SHUFFLE),
        ] {
            assert_ne!(base, other);
        }
    }
}
