//! A counting global allocator and hostile-input generators, shared by the allocation-bound
//! tests of `cairn-protocol` and `cairn-kafka` (each includes this file with `#[path]` and
//! declares the allocator as its `#[global_allocator]`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Records the largest single allocation while tracking is on.
pub struct Counting;

static TRACKING: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so `System`'s
// guarantees hold; the only extra work is two relaxed atomic operations, which neither allocate
// nor unwind.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if TRACKING.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` through `alloc`/`realloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if TRACKING.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged; `ptr` came from `System` with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// The largest single allocation `f` makes.
pub fn largest_allocation(f: impl FnOnce()) -> usize {
    LARGEST.store(0, Ordering::Relaxed);
    TRACKING.store(true, Ordering::Relaxed);
    f();
    TRACKING.store(false, Ordering::Relaxed);
    LARGEST.load(Ordering::Relaxed)
}

/// xorshift: deterministic inputs without a dependency on the allocator under test.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Random bytes with 0xff runs planted, so counts and lengths near 2^32-1 are common.
pub fn hostile(rng: &mut Rng) -> Vec<u8> {
    let len = (rng.next() % 512) as usize;
    let mut bytes = rng.bytes(len);
    for _ in 0..(rng.next() % 4) {
        if bytes.len() >= 4 {
            let at = (rng.next() as usize) % (bytes.len() - 3);
            bytes[at..at + 4].copy_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        }
    }
    bytes
}
