//! The `palisade` binary: parse the command line and hand off.

#[global_allocator]
static ALLOC: Allocator = Allocator;

/// mimalloc, asked through its plain entry points whenever the alignment is one every mimalloc
/// block has (8 bytes): its aligned entry points, which the `mimalloc` crate always uses, take
/// a generic slow path whenever the page's free list is empty.
struct Allocator;

/// The alignment every mimalloc block has.
const BLOCK_ALIGN: usize = 8;

// SAFETY: every call goes to mimalloc, which meets `Layout`'s size and alignment: its plain
// entry points return 8-byte-aligned blocks, and larger alignments use its aligned ones.
unsafe impl std::alloc::GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_malloc, mi_malloc_aligned};
        // SAFETY: mimalloc accepts any size; the alignment is a power of two (Layout).
        unsafe {
            if layout.align() <= BLOCK_ALIGN {
                mi_malloc(layout.size()).cast()
            } else {
                mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        use libmimalloc_sys::{mi_zalloc, mi_zalloc_aligned};
        // SAFETY: as in `alloc`.
        unsafe {
            if layout.align() <= BLOCK_ALIGN {
                mi_zalloc(layout.size()).cast()
            } else {
                mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { libmimalloc_sys::mi_free(ptr.cast()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        use libmimalloc_sys::{mi_realloc, mi_realloc_aligned};
        // SAFETY: `ptr` came from this allocator with `layout`'s alignment, kept here.
        unsafe {
            if layout.align() <= BLOCK_ALIGN {
                mi_realloc(ptr.cast(), new).cast()
            } else {
                mi_realloc_aligned(ptr.cast(), new, layout.align()).cast()
            }
        }
    }
}

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (mimalloc.h), which the Rust
/// bindings do not name.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// How long mimalloc keeps freed pages before returning them to the OS. Its default (1 s) lets
/// a cache that evicts as fast as it fills hold up to a second of freed bodies in RSS.
const PURGE_DELAY_MS: std::ffi::c_long = 10;

fn main() -> std::process::ExitCode {
    // SAFETY: setting an option is allowed at any time and only changes when pages are purged.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    palisade::cli::main()
}
