//! Decoding hostile bytes never allocates more than one datagram's worth.
//!
//! A counting allocator records the peak heap use of the decoding thread
//! while each input is decoded.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use natter_wire::{
    ClientMessage, FrameKind, HandshakeMessage, PunchMessage, ServerMessage, MAX_DATAGRAM, VERSION,
};
use proptest::prelude::*;

struct PeakAllocator;

thread_local! {
    // Per thread, so the test harness's other threads do not count.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for PeakAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = LIVE.try_with(|live| {
            live.set(live.get() + layout.size() as isize);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(live.get())));
        });
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let _ = LIVE.try_with(|live| live.set(live.get() - layout.size() as isize));
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: PeakAllocator = PeakAllocator;

/// Peak heap bytes allocated while running `f`, above what was live before.
fn peak_during(f: impl FnOnce()) -> usize {
    let base = LIVE.with(Cell::get);
    PEAK.with(|peak| peak.set(base));
    f();
    (PEAK.with(Cell::get) - base) as usize
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    #[test]
    fn decoding_never_allocates_more_than_a_datagram(
        mut bytes in proptest::collection::vec(any::<u8>(), 2..MAX_DATAGRAM),
        kind in 0..4u8,
    ) {
        bytes[0] = [
            FrameKind::ToServer,
            FrameKind::FromServer,
            FrameKind::Punch,
            FrameKind::Handshake,
        ][kind as usize] as u8;
        bytes[1] = VERSION;
        let peak = peak_during(|| match kind {
            0 => drop(std::hint::black_box(ClientMessage::decode(&bytes))),
            1 => drop(std::hint::black_box(ServerMessage::decode(&bytes))),
            2 => drop(std::hint::black_box(PunchMessage::decode(&bytes))),
            _ => drop(std::hint::black_box(HandshakeMessage::decode(&bytes))),
        });
        prop_assert!(peak <= MAX_DATAGRAM, "decoding allocated {} bytes", peak);
    }
}
