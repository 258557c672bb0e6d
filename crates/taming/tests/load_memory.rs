//! Loading a checkpoint needs about its size in memory, not a multiple: the file is memory-mapped
//! and each tensor copied once out of the map. This test binary counts every heap allocation
//! (its own global allocator) and checks the peak while loading `vqgan_f4/model.ckpt` (72 MB,
//! mostly LPIPS and discriminator weights) against the bytes of the tensors it returns. The mapped
//! file itself is page cache, not heap, as it would be for a 4 GB checkpoint.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::SeqCst) + layout.size();
            PEAK.fetch_max(now, Ordering::SeqCst);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The vqgan_f4 fixture's checkpoint (skips, or fails under CI, when `../shared` is missing).
fn fixture() -> Option<PathBuf> {
    common::shared("fixtures/vqgan_f4").map(|d| d.join("model.ckpt"))
}

#[test]
fn loading_needs_about_the_tensors_bytes_once() {
    let Some(path) = fixture() else { return };
    let file_bytes = std::fs::metadata(&path).unwrap().len() as usize;
    let before = LIVE.load(Ordering::SeqCst);
    PEAK.store(before, Ordering::SeqCst);
    let sd = taming::checkpoint::StateDict::load(&path).unwrap();
    let peak = PEAK.load(Ordering::SeqCst) - before;
    let kept = LIVE.load(Ordering::SeqCst) - before;
    let tensor_bytes: usize = sd
        .tensors()
        .values()
        .map(|t| t.elem_count() * t.dtype().size_in_bytes())
        .sum();
    println!(
        "file {file_bytes} B, tensors {tensor_bytes} B, heap kept {kept} B, heap peak {peak} B"
    );
    assert!(
        tensor_bytes > 50_000_000,
        "the fixture should hold most of its bytes as tensors"
    );
    // one copy of the tensors plus bookkeeping; a second copy anywhere would double it
    assert!(
        (peak as f64) < 1.15 * tensor_bytes as f64 + 4e6,
        "peak heap {peak} B for {tensor_bytes} B of tensors"
    );
}
